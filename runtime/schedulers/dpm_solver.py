"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095): exponential integrator in half log-SNR lambda."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .config import unsupported
from .parameterization import vp_x0
from .schedule import add_noise_vp, vp_alpha_sigma, vp_lambda, vp_multistep_schedule


class MultistepHistory(NamedTuple):
    """x0 predictions of the last ``solver_order`` steps (oldest first) and how many steps ran."""

    x0s: tuple[np.ndarray, ...] = ()
    lower_order_nums: int = 0


def _alpha_sigma_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return alpha_t, sigma_t, vp_lambda(alpha_t, sigma_t)


def dpmpp_1(x: np.ndarray, m0: np.ndarray, sigma_s0: np.float32, sigma_t: np.float32) -> np.ndarray:
    """DPM-Solver++(1), i.e. DDIM written in lambda (Lu et al. 2022); diffusers first_order_update."""
    if sigma_t == 0:
        return m0  # lambda_t = +inf: the exponential integrator lands exactly on x0
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_t)
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigma_s0)
    h = lambda_t - lambda_s0
    return (sigma_t / sigma_s0) * x - (alpha_t * (np.exp(-h) - 1)) * m0


def dpmpp_2m(x: np.ndarray, m0: np.ndarray, m1: np.ndarray, sigma_s1: np.float32, sigma_s0: np.float32,
             sigma_t: np.float32, solver_type: str) -> np.ndarray:
    """DPM-Solver++(2M), Lu et al. 2022 alg. 2 (midpoint) or Heun; diffusers second_order_update."""
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_t)
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigma_s0)
    _, _, lambda_s1 = _alpha_sigma_lambda(sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    D0, D1 = m0, (1 / r0) * (m0 - m1)
    phi_1 = alpha_t * (np.exp(-h) - 1)
    if solver_type == "midpoint":
        return (sigma_t / sigma_s0) * x - phi_1 * D0 - np.float32(0.5) * phi_1 * D1
    return (sigma_t / sigma_s0) * x - phi_1 * D0 + (alpha_t * ((np.exp(-h) - 1) / h + 1)) * D1


def dpmpp_3m(x: np.ndarray, m0: np.ndarray, m1: np.ndarray, m2: np.ndarray, sigma_s2: np.float32,
             sigma_s1: np.float32, sigma_s0: np.float32, sigma_t: np.float32) -> np.ndarray:
    """DPM-Solver++(3M), third-order multistep (Lu et al. 2022); diffusers third_order_update."""
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_t)
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigma_s0)
    _, _, lambda_s1 = _alpha_sigma_lambda(sigma_s1)
    _, _, lambda_s2 = _alpha_sigma_lambda(sigma_s2)
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    D1_0, D1_1 = (1 / r0) * (m0 - m1), (1 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
    expm = np.exp(-h) - 1
    return ((sigma_t / sigma_s0) * x - (alpha_t * expm) * m0 + (alpha_t * (expm / h + 1)) * D1
            - (alpha_t * ((expm + h) / (h * h) - np.float32(0.5))) * D2)


@dataclass(frozen=True, eq=False)
class DPMSolverPlan:
    """DPM-Solver++ multistep as diffusers' DPMSolverMultistepScheduler computes it (research notes 3.6).

    algorithm_type 'dpmsolver++' (the sdrt names force it), solver_order 1-3 from the config (2 in SD
    configs), midpoint/heun, lower_order_final/euler_at_final, Karras sigmas for dpmpp-2m-karras,
    final_sigmas_type zero/sigma_min, lambda_min_clipped, all spacings; epsilon, v_prediction, sample.
    Limits: no SDE variants ('sde-dpmsolver++' needs noise), no legacy 'dpmsolver', no thresholding,
    no learned variance, no lu-lambdas/exponential/beta/flow sigmas, no dynamic shifting.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    prediction_type: str
    solver_order: int
    solver_type: str
    lower_order_final: bool
    euler_at_final: bool
    final_sigma_zero: bool
    init_noise_sigma: float = 1.0
    initial_history: MultistepHistory = MultistepHistory()

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int,
              eta: float) -> DPMSolverPlan:
        unsupported("dpmpp-2m", algorithm_type=(params["algorithm_type"], "dpmsolver++"),
                    thresholding=(params["thresholding"], False), variance_type=(params["variance_type"], None),
                    use_lu_lambdas=(params["use_lu_lambdas"], False),
                    use_exponential_sigmas=(params["use_exponential_sigmas"], False),
                    use_beta_sigmas=(params["use_beta_sigmas"], False),
                    use_flow_sigmas=(params["use_flow_sigmas"], False),
                    use_dynamic_shifting=(params["use_dynamic_shifting"], False))
        if int(params["solver_order"]) not in (1, 2, 3):
            raise ValueError(f"dpmpp-2m: solver_order {params['solver_order']} is not 1, 2 or 3")
        # DPMSolverMultistepScheduler.__init__ maps UniPC/DEIS solver types onto midpoint.
        solver_type = "midpoint" if params["solver_type"] in ("logrho", "bh1", "bh2") else str(params["solver_type"])
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"dpmpp-2m: solver_type {solver_type!r} is not 'midpoint' or 'heun'")
        ac = alphas_cumprod
        lambda_t = vp_lambda(np.sqrt(ac), np.sqrt(1 - ac))
        clipped = int(np.searchsorted(lambda_t[::-1], params["lambda_min_clipped"]))
        # DPMSolverMultistepScheduler reads sigma_min/sigma_max only if its config has them: keys the
        # checkpoint's config carried (from another class) and diffusers kept as hidden config.
        timesteps, sigmas = vp_multistep_schedule(
            ac, n, str(params["timestep_spacing"]), int(params["steps_offset"]), len(ac) - clipped,
            karras=bool(params["use_karras_sigmas"]), karras_range=(params.get("sigma_min"), params.get("sigma_max")),
            round_karras=params["beta_schedule"] != "squaredcos_cap_v2",
            final_sigmas_type=str(params["final_sigmas_type"]), karras_final_is_last=False)
        return cls(timesteps, sigmas, str(params["prediction_type"]), int(params["solver_order"]), solver_type,
                   bool(params["lower_order_final"]), bool(params["euler_at_final"]),
                   params["final_sigmas_type"] == "zero")

    def needs_noise(self, j: int) -> bool:
        return False

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return x

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_vp(self.sigmas[j], x0, noise)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: MultistepHistory,
             noise: np.ndarray | None) -> tuple[np.ndarray, MultistepHistory]:
        n = len(self.timesteps)
        lower_order_final = j == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15)
                                            or self.final_sigma_zero)
        lower_order_second = j == n - 2 and self.lower_order_final and n < 15
        alpha_s0, sigma_s0 = vp_alpha_sigma(self.sigmas[j])
        x0s = (history.x0s + (vp_x0(self.prediction_type, model_output, x, alpha_s0, sigma_s0),))
        x0s = x0s[-self.solver_order:]
        done = history.lower_order_nums
        s = self.sigmas
        if self.solver_order == 1 or done < 1 or lower_order_final:
            x_next = dpmpp_1(x, x0s[-1], s[j], s[j + 1])
        elif self.solver_order == 2 or done < 2 or lower_order_second:
            x_next = dpmpp_2m(x, x0s[-1], x0s[-2], s[j - 1], s[j], s[j + 1], self.solver_type)
        else:
            x_next = dpmpp_3m(x, x0s[-1], x0s[-2], x0s[-3], s[j - 2], s[j - 1], s[j], s[j + 1])
        return x_next, MultistepHistory(x0s, min(done + 1, self.solver_order))
