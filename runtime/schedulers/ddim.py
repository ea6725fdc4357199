"""DDIM: deterministic (eta=0) or stochastic (eta>0) implicit sampler on the training alphas_cumprod."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import unsupported
from .parameterization import clip_x0, vp_eps, vp_x0
from .schedule import add_noise_discrete, spaced_timesteps


def ddim_update(x0: np.ndarray, eps: np.ndarray, a_t: np.float32, a_prev: np.float32, eta: float,
                noise: np.ndarray | None) -> np.ndarray:
    """DDIM step, Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16; matches diffusers DDIMScheduler.step."""
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    sigma_t = np.float32(eta) * np.sqrt(variance)
    x_prev = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma_t * sigma_t) * eps
    if eta > 0:
        x_prev = x_prev + sigma_t * noise
    return x_prev


@dataclass(frozen=True, eq=False)
class DDIMPlan:
    """DDIM as diffusers' DDIMScheduler computes it (research notes 3.2).

    Spacing leading/linspace/trailing with steps_offset; epsilon, v_prediction and sample outputs;
    clip_sample; zero-terminal-SNR tables. Limits: no dynamic thresholding; the eps used for the
    direction term is the unclipped one (use_clipped_model_output=False, what the SD pipelines pass).
    """

    timesteps: np.ndarray          # float32, integer-valued, descending
    alphas_cumprod: np.ndarray     # float32, indexed by training timestep
    final_alpha_cumprod: np.float32
    step_ratio: int                # prev_t = t - T // N, even for linspace/trailing spacing
    prediction_type: str
    clip_sample_range: float | None
    eta: float
    init_noise_sigma: float = 1.0
    initial_history: None = None

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int, eta: float) -> DDIMPlan:
        unsupported("ddim", thresholding=(params["thresholding"], False))
        T = int(params["num_train_timesteps"])
        if n > T:
            raise ValueError(f"ddim: {n} steps exceed num_train_timesteps={T}")
        if eta < 0:
            raise ValueError(f"ddim: eta must be >= 0, got {eta}")
        timesteps = spaced_timesteps(str(params["timestep_spacing"]), n, T, int(params["steps_offset"]))
        final = np.float32(1.0) if params["set_alpha_to_one"] else alphas_cumprod[0]
        clip_range = float(params["clip_sample_range"]) if params["clip_sample"] else None
        return cls(timesteps.astype(np.float32), alphas_cumprod, final, T // n,
                   str(params["prediction_type"]), clip_range, float(eta))

    def needs_noise(self, j: int) -> bool:
        return self.eta > 0

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return x

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_discrete(self.alphas_cumprod, int(self.timesteps[j]), x0, noise)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: None,
             noise: np.ndarray | None) -> tuple[np.ndarray, None]:
        t = int(self.timesteps[j])
        prev_t = t - self.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha_t, sigma_t = np.sqrt(a_t), np.sqrt(1 - a_t)
        x0 = vp_x0(self.prediction_type, model_output, x, alpha_t, sigma_t)
        eps = vp_eps(self.prediction_type, model_output, x, alpha_t, sigma_t)
        x0 = clip_x0(x0, self.clip_sample_range)
        return ddim_update(x0, eps, a_t, a_prev, self.eta, noise), None
