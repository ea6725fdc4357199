"""UniPC (Zhao et al. 2023, arXiv:2302.04867): unified predictor-corrector multistep solver in lambda."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .config import unsupported
from .parameterization import vp_x0
from .schedule import add_noise_vp, vp_alpha_sigma, vp_lambda, vp_multistep_schedule


class UniPCHistory(NamedTuple):
    """x0 predictions of the last ``solver_order`` steps (oldest first), the sample the last predictor
    started from, that predictor's order, and how many steps ran."""

    x0s: tuple[np.ndarray, ...] = ()
    last_sample: np.ndarray | None = None
    last_order: int = 0
    lower_order_nums: int = 0


def _unipc_terms(x: np.ndarray, m0: np.ndarray, m_prev: Sequence[np.ndarray], sigma_t: np.float32,
                 sigma_s0: np.float32, sigma_prev: Sequence[np.float32], solver_type: str):
    """Shared part of UniP/UniC (predict-x0 form): x_t_ (the DDIM step), alpha_t B(h),
    the divided differences D1s = (m_i - m0)/r_i, their ratios r_i and hh = -h."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma_t)
    lambda_t = vp_lambda(alpha_t, sigma_t)
    alpha_s0, sigma_s0 = vp_alpha_sigma(sigma_s0)
    lambda_s0 = vp_lambda(alpha_s0, sigma_s0)
    h = lambda_t - lambda_s0
    rks, D1s = [], []
    for mi, sigma_si in zip(m_prev, sigma_prev):
        rk = (vp_lambda(*vp_alpha_sigma(sigma_si)) - lambda_s0) / h
        rks.append(rk)
        D1s.append((mi - m0) / rk)
    hh = -h
    h_phi_1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    return x_t_, alpha_t * B_h, D1s, np.array(rks + [1], dtype=np.float32), hh, B_h


def unipc_rhos(rks: np.ndarray, hh: np.float32, B_h: np.float32, order: int) -> np.ndarray:
    """Solve UniPC's order conditions R rho = b, R_ik = r_k^(i-1), b_i = i! h phi_(i+1)(h) / B(h)."""
    h_phi_k = np.expm1(hh) / hh - 1
    R, b, factorial_i = [], [], 1
    for i in range(1, order + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - np.float32(1 / factorial_i)
    return np.linalg.solve(np.stack(R), np.array(b, dtype=np.float32))


def _weighted(rhos: np.ndarray, D1s: list[np.ndarray]):
    """sum_k rho_k D1s[k] (diffusers' einsum 'k,bkc...->bc...'); 0 when there are no differences."""
    total = 0
    for rho, d in zip(rhos, D1s):
        total = total + rho * d
    return total


def unipc_predictor(x: np.ndarray, x0s: tuple[np.ndarray, ...], sigmas: np.ndarray, j: int, order: int,
                    solver_type: str) -> np.ndarray:
    """UniP-p predictor from sigma_j to sigma_j+1 (Zhao et al. 2023); diffusers multistep_uni_p_bh_update."""
    m0 = x0s[-1]
    if sigmas[j + 1] == 0 and order == 1:
        # lambda_t = +inf: the step lands exactly on x0. diffusers computes x0 - alpha_t*B(h)*0, which
        # is NaN for bh1 (B(h) = -inf); the limit, and bh2's value, is x0.
        return m0
    m_prev = [x0s[-(i + 1)] for i in range(1, order)]
    sigma_prev = [sigmas[j - i] for i in range(1, order)]
    x_t_, alpha_B_h, D1s, rks, hh, B_h = _unipc_terms(x, m0, m_prev, sigmas[j + 1], sigmas[j], sigma_prev,
                                                      solver_type)
    if order <= 2:
        rhos_p = np.array([0.5], np.float32)  # unused for order 1 (no D1s)
    else:
        rhos_p = unipc_rhos(rks[:-1], hh, B_h, order - 1)
    return x_t_ - alpha_B_h * _weighted(rhos_p, D1s)


def unipc_corrector(this_x0: np.ndarray, last_sample: np.ndarray, this_sample: np.ndarray,
                    x0s: tuple[np.ndarray, ...], sigmas: np.ndarray, j: int, order: int,
                    solver_type: str) -> np.ndarray:
    """UniC corrector: refine the sample at sigma_j with this step's x0; diffusers multistep_uni_c_bh_update."""
    m0 = x0s[-1]
    m_prev = [x0s[-(i + 1)] for i in range(1, order)]
    sigma_prev = [sigmas[j - (i + 1)] for i in range(1, order)]
    x_t_, alpha_B_h, D1s, rks, hh, B_h = _unipc_terms(last_sample, m0, m_prev, sigmas[j], sigmas[j - 1],
                                                      sigma_prev, solver_type)
    rhos_c = np.array([0.5], np.float32) if order == 1 else unipc_rhos(rks, hh, B_h, order)
    return x_t_ - alpha_B_h * (_weighted(rhos_c[:-1], D1s) + rhos_c[-1] * (this_x0 - m0))


@dataclass(frozen=True, eq=False)
class UniPCPlan:
    """UniPC as diffusers' UniPCMultistepScheduler computes it (research notes 3.8).

    predict_x0=True with bh1/bh2, solver_order from the config (2 in SD configs), lower_order_final,
    disable_corrector, Karras sigmas when the config sets use_karras_sigmas, final_sigmas_type
    zero/sigma_min, all spacings; epsilon, v_prediction and sample outputs. Limits: no predict_x0=False,
    no solver_p, no thresholding, no exponential/beta/flow sigmas, no dynamic shifting; a zero final
    sigma needs lower_order_final=True (without it diffusers divides by zero at the last step).
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    prediction_type: str
    solver_order: int
    solver_type: str
    lower_order_final: bool
    disable_corrector: frozenset[int]
    init_noise_sigma: float = 1.0
    initial_history: UniPCHistory = UniPCHistory()

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int, eta: float) -> UniPCPlan:
        unsupported("unipc", predict_x0=(params["predict_x0"], True), solver_p=(params["solver_p"], None),
                    thresholding=(params["thresholding"], False),
                    use_exponential_sigmas=(params["use_exponential_sigmas"], False),
                    use_beta_sigmas=(params["use_beta_sigmas"], False),
                    use_flow_sigmas=(params["use_flow_sigmas"], False),
                    use_dynamic_shifting=(params["use_dynamic_shifting"], False))
        # UniPCMultistepScheduler.__init__ maps DPM-Solver solver types onto bh2.
        solver_type = "bh2" if params["solver_type"] in ("midpoint", "heun", "logrho") else str(params["solver_type"])
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unipc: solver_type {solver_type!r} is not 'bh1' or 'bh2'")
        if params["final_sigmas_type"] == "zero" and not params["lower_order_final"]:
            raise ValueError("unipc: lower_order_final=False with a zero final sigma is not supported")
        timesteps, sigmas = vp_multistep_schedule(
            alphas_cumprod, n, str(params["timestep_spacing"]), int(params["steps_offset"]), len(alphas_cumprod),
            karras=bool(params["use_karras_sigmas"]), karras_range=(params["sigma_min"], params["sigma_max"]),
            round_karras=True, final_sigmas_type=str(params["final_sigmas_type"]), karras_final_is_last=True)
        return cls(timesteps, sigmas, str(params["prediction_type"]), int(params["solver_order"]), solver_type,
                   bool(params["lower_order_final"]), frozenset(int(i) for i in params["disable_corrector"]))

    def needs_noise(self, j: int) -> bool:
        return False

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return x

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_vp(self.sigmas[j], x0, noise)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: UniPCHistory,
             noise: np.ndarray | None) -> tuple[np.ndarray, UniPCHistory]:
        alpha_s0, sigma_s0 = vp_alpha_sigma(self.sigmas[j])
        x0 = vp_x0(self.prediction_type, model_output, x, alpha_s0, sigma_s0)
        if j > 0 and j - 1 not in self.disable_corrector and history.last_sample is not None:
            x = unipc_corrector(x0, history.last_sample, x, history.x0s, self.sigmas, j, history.last_order,
                                self.solver_type)
        x0s = (history.x0s + (x0,))[-self.solver_order:]
        order = min(self.solver_order, len(self.timesteps) - j) if self.lower_order_final else self.solver_order
        order = min(order, history.lower_order_nums + 1)
        x_next = unipc_predictor(x, x0s, self.sigmas, j, order, self.solver_type)
        return x_next, UniPCHistory(x0s, x, order, min(history.lower_order_nums + 1, self.solver_order))
