"""Euler and Euler ancestral: first-order samplers of the probability-flow ODE / SDE in sigma (VE) space."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import unsupported
from .parameterization import ve_x0
from .schedule import add_noise_ve, ve_init_noise_sigma, ve_scale_model_input, ve_schedule


def euler_update(x: np.ndarray, x0: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """Euler step of the probability-flow ODE dx/dsigma = (x - x0)/sigma (k-diffusion); diffusers EulerDiscrete."""
    d = (x - x0) / sigma
    return x + d * (sigma_next - sigma)


def euler_ancestral_update(x: np.ndarray, x0: np.ndarray, sigma: np.float32, sigma_next: np.float32,
                           noise: np.ndarray) -> np.ndarray:
    """Euler ancestral step (k-diffusion sample_euler_ancestral, eta=1); diffusers EulerAncestralDiscrete."""
    sigma_up = np.sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
    sigma_down = np.sqrt(sigma_next * sigma_next - sigma_up * sigma_up)
    d = (x - x0) / sigma
    return x + d * (sigma_down - sigma) + noise * sigma_up


def _check_sigma_options(name: str, params: Mapping[str, object]) -> None:
    unsupported(name, use_exponential_sigmas=(params.get("use_exponential_sigmas", False), False),
                use_beta_sigmas=(params.get("use_beta_sigmas", False), False))


@dataclass(frozen=True, eq=False)
class EulerPlan:
    """Euler as diffusers' EulerDiscreteScheduler computes it (research notes 3.4).

    Spacing leading/linspace/trailing with steps_offset, Karras sigmas when the config sets
    use_karras_sigmas (ramp over the interpolated schedule unless sigma_min/sigma_max are set),
    final_sigmas_type zero/sigma_min; epsilon, v_prediction and sample outputs. Also serves as Euler
    ancestral with ``ancestral=True``. Limits: s_churn=0 (what the SD pipelines pass), so no noise;
    interpolation_type 'linear' only; no exponential/beta sigmas; no continuous timesteps.
    """

    timesteps: np.ndarray   # float32, possibly fractional
    sigmas: np.ndarray      # float32, len(timesteps) + 1
    prediction_type: str
    init_noise_sigma: float
    ancestral: bool = False
    initial_history: None = None

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int, eta: float) -> EulerPlan:
        _check_sigma_options("euler", params)
        unsupported("euler", interpolation_type=(params["interpolation_type"], "linear"))
        if params["prediction_type"] == "v_prediction":
            unsupported("euler", timestep_type=(params["timestep_type"], "discrete"))
        spacing = str(params["timestep_spacing"])
        timesteps, sigmas = ve_schedule(
            alphas_cumprod, n, spacing, int(params["steps_offset"]), karras=bool(params["use_karras_sigmas"]),
            karras_range=(params["sigma_min"], params["sigma_max"]),
            final_sigmas_type=str(params["final_sigmas_type"]))
        return cls(timesteps, sigmas, str(params["prediction_type"]), ve_init_noise_sigma(sigmas, spacing))

    @classmethod
    def build_ancestral(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int,
                        eta: float) -> EulerPlan:
        """Euler ancestral (EulerAncestralDiscreteScheduler): no Karras option, final sigma 0; 'sample' raises there."""
        prediction_type = str(params["prediction_type"])
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"euler-a: prediction_type {prediction_type!r} is not 'epsilon' or 'v_prediction'")
        spacing = str(params["timestep_spacing"])
        timesteps, sigmas = ve_schedule(alphas_cumprod, n, spacing, int(params["steps_offset"]))
        return cls(timesteps, sigmas, prediction_type, ve_init_noise_sigma(sigmas, spacing), ancestral=True)

    def needs_noise(self, j: int) -> bool:
        # diffusers draws ancestral noise on every step, the last one included (where sigma_up = 0).
        return self.ancestral

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return ve_scale_model_input(x, self.sigmas[j])

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_ve(self.sigmas[j], x0, noise)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: None,
             noise: np.ndarray | None) -> tuple[np.ndarray, None]:
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        x0 = ve_x0(self.prediction_type, model_output, x, sigma)
        if self.ancestral:
            return euler_ancestral_update(x, x0, sigma, sigma_next, noise), None
        return euler_update(x, x0, sigma, sigma_next), None
