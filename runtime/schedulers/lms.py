"""LMS: linear multistep (Adams-Bashforth in sigma, up to 4th order) on the VE ODE, k-diffusion's sample_lms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import unsupported
from .parameterization import ve_x0
from .schedule import add_noise_ve, ve_init_noise_sigma, ve_scale_model_input, ve_schedule

LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step default; the SD pipelines never pass another
# Gauss-Legendre with 4 nodes integrates polynomials up to degree 7 exactly; the Lagrange basis
# below has degree <= 3. diffusers uses scipy.integrate.quad, exact for these to float rounding.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


def lms_coefficient(sigmas: np.ndarray, j: int, order: int, current: int) -> float:
    """Integral over [sigma_j, sigma_j+1] of the Lagrange basis of node j-current; diffusers get_lms_coefficient."""
    a, b = float(sigmas[j]), float(sigmas[j + 1])
    tau = 0.5 * (b - a) * _GL_NODES + 0.5 * (b + a)
    basis = np.ones_like(tau)
    for k in range(order):
        if k != current:
            basis *= (tau - float(sigmas[j - k])) / (float(sigmas[j - current]) - float(sigmas[j - k]))
    return float(0.5 * (b - a) * np.dot(_GL_WEIGHTS, basis))


def lms_update(x: np.ndarray, derivatives: tuple[np.ndarray, ...], coefficients: list[float]) -> np.ndarray:
    """x_next = x + sum_k c_k d_(newest-k), the multistep sum of k-diffusion sample_lms."""
    total = 0
    for coefficient, d in zip(coefficients, reversed(derivatives)):
        total = total + coefficient * d
    return x + total


@dataclass(frozen=True, eq=False)
class LMSPlan:
    """LMS as diffusers' LMSDiscreteScheduler computes it (order 4).

    Spacing leading/linspace/trailing with steps_offset; Karras sigmas when the config sets
    use_karras_sigmas (always spanning the interpolated schedule: this class ignores sigma_min/max);
    epsilon, v_prediction and sample outputs. History: the last 4 derivatives (x - x0)/sigma.
    Matches a diffusers quirk: the order is min(absolute step index + 1, 4), so an img2img run starting
    at step k > 0 weights its first derivatives with coefficients of a higher-order basis, as diffusers
    does. Limits: no exponential/beta sigmas.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    prediction_type: str
    init_noise_sigma: float
    initial_history: tuple[np.ndarray, ...] = ()

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int, eta: float) -> LMSPlan:
        unsupported("lms", use_exponential_sigmas=(params["use_exponential_sigmas"], False),
                    use_beta_sigmas=(params["use_beta_sigmas"], False))
        spacing = str(params["timestep_spacing"])
        timesteps, sigmas = ve_schedule(alphas_cumprod, n, spacing, int(params["steps_offset"]),
                                        karras=bool(params["use_karras_sigmas"]))
        return cls(timesteps, sigmas, str(params["prediction_type"]), ve_init_noise_sigma(sigmas, spacing))

    def needs_noise(self, j: int) -> bool:
        return False

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return ve_scale_model_input(x, self.sigmas[j])

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_ve(self.sigmas[j], x0, noise)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: tuple[np.ndarray, ...],
             noise: np.ndarray | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        sigma = self.sigmas[j]
        x0 = ve_x0(self.prediction_type, model_output, x, sigma)
        derivatives = (history + ((x - x0) / sigma,))[-LMS_ORDER:]
        order = min(j + 1, LMS_ORDER)
        coefficients = [lms_coefficient(self.sigmas, j, order, current) for current in range(order)]
        return lms_update(x, derivatives, coefficients), derivatives
