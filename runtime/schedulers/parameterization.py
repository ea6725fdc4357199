"""Model parameterization: what the UNet output means, turned into x0 / eps predictions.

``prediction_type`` comes from the scheduler config: ``"epsilon"`` (SD1.x, SD2-base), ``"v_prediction"``
(SD2-768, zero-SNR fine-tunes; v = alpha_t eps - sigma_t x0, Salimans & Ho 2022) or ``"sample"`` (x0).
The solvers never look at the prediction type; they call one of these functions.

Each expression keeps the operand order of the diffusers scheduler it serves, so float32 rounding
matches: VP forms take (alpha_t, sigma_t) = (sqrt(a_t), sqrt(1 - a_t)) for DDIM/PNDM/LCM and
(1/sqrt(sigma^2+1), sigma/sqrt(sigma^2+1)) for DPM-Solver/UniPC; the VE form takes the k-diffusion
sigma (Euler, Euler ancestral, LMS).
"""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unknown(prediction_type: str) -> ValueError:
    return ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def vp_x0(prediction_type: str, model_output: np.ndarray, x: np.ndarray,
          alpha_t: np.float32, sigma_t: np.float32) -> np.ndarray:
    """Predicted x0 from a VP sample ``x = alpha_t x0 + sigma_t eps``."""
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    raise _unknown(prediction_type)


def vp_eps(prediction_type: str, model_output: np.ndarray, x: np.ndarray,
           alpha_t: np.float32, sigma_t: np.float32) -> np.ndarray:
    """Predicted eps from a VP sample (for 'sample' it uses the raw, unclipped x0 as diffusers does)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * x
    if prediction_type == "sample":
        return (x - alpha_t * model_output) / sigma_t
    raise _unknown(prediction_type)


def ve_x0(prediction_type: str, model_output: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
    """Predicted x0 from a VE sample ``x = x0 + sigma eps`` (k-diffusion form)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        # v is defined on the VP sample x / sqrt(sigma^2 + 1); this is diffusers' rearrangement.
        return model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    if prediction_type == "sample":
        return model_output
    raise _unknown(prediction_type)


def clip_x0(x0: np.ndarray, clip_sample_range: float | None) -> np.ndarray:
    """Clamp predicted x0 to +-range (DDIM/LCM ``clip_sample``); None means no clipping."""
    if clip_sample_range is None:
        return x0
    return np.clip(x0, -clip_sample_range, clip_sample_range)
