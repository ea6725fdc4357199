"""LCM: latent consistency model multistep sampling (Luo et al. 2023), for LCM-distilled UNets and LCM-LoRA."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import unsupported
from .parameterization import clip_x0, vp_x0
from .schedule import add_noise_discrete


def lcm_boundary_scalings(t: int, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[np.float32, np.float32]:
    """Consistency-model boundary condition (c_skip, c_out) on the scaled timestep (Song et al. 2023); diffusers LCM."""
    scaled_t = np.float32(t) * np.float32(timestep_scaling)
    c_skip = np.float32(sigma_data**2) / (scaled_t * scaled_t + np.float32(sigma_data**2))
    c_out = scaled_t / np.sqrt(scaled_t * scaled_t + np.float32(sigma_data**2))
    return c_skip, c_out


def lcm_update(x0: np.ndarray, x: np.ndarray, c_skip: np.float32, c_out: np.float32, a_prev: np.float32,
               noise: np.ndarray | None) -> np.ndarray:
    """Consistency function f(x, t) = c_skip x + c_out x0, re-noised to the next timestep unless last (LCM)."""
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised
    return np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev) * noise


def lcm_timesteps(n: int, num_train_timesteps: int, original_steps: int) -> np.ndarray:
    """N timesteps picked evenly from the distillation schedule k-1, 2k-1, ..., T-1 (k = T // original_steps)."""
    if original_steps > num_train_timesteps:
        raise ValueError(f"lcm: original_inference_steps={original_steps} exceeds num_train_timesteps")
    k = num_train_timesteps // original_steps
    origin = np.asarray(list(range(1, original_steps + 1))) * k - 1
    if n > original_steps:
        raise ValueError(f"lcm: {n} steps exceed original_inference_steps={original_steps}")
    origin = origin[::-1].copy()
    indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[indices]


@dataclass(frozen=True, eq=False)
class LCMPlan:
    """LCM as diffusers' LCMScheduler computes it (research notes 3.7).

    Timesteps come from original_inference_steps (timestep_spacing and steps_offset are ignored, as in
    diffusers); every step but the last re-noises with fresh noise. epsilon, v_prediction and sample
    outputs; clip_sample. Limits: no dynamic thresholding, no custom timesteps, no LCM-pipeline
    ``strength`` argument to set_timesteps (the SD img2img pipeline does not pass one either).
    """

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    num_inference_steps: int
    timestep_scaling: float
    prediction_type: str
    clip_sample_range: float | None
    init_noise_sigma: float = 1.0
    initial_history: None = None

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int, eta: float) -> LCMPlan:
        unsupported("lcm", thresholding=(params["thresholding"], False))
        timesteps = lcm_timesteps(n, int(params["num_train_timesteps"]), int(params["original_inference_steps"]))
        clip_range = float(params["clip_sample_range"]) if params["clip_sample"] else None
        # set_alpha_to_one is moot: the previous timestep of an LCM step is never negative.
        return cls(timesteps.astype(np.float32), alphas_cumprod, n, float(params["timestep_scaling"]),
                   str(params["prediction_type"]), clip_range)

    def needs_noise(self, j: int) -> bool:
        return j != self.num_inference_steps - 1

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return x

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_discrete(self.alphas_cumprod, int(self.timesteps[j]), x0, noise)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: None,
             noise: np.ndarray | None) -> tuple[np.ndarray, None]:
        t = int(self.timesteps[j])
        prev_t = int(self.timesteps[j + 1]) if j + 1 < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t]
        c_skip, c_out = lcm_boundary_scalings(t, self.timestep_scaling)
        x0 = vp_x0(self.prediction_type, model_output, x, np.sqrt(a_t), np.sqrt(1 - a_t))
        x0 = clip_x0(x0, self.clip_sample_range)
        return lcm_update(x0, x, c_skip, c_out, a_prev, noise if self.needs_noise(j) else None), None
