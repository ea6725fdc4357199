"""Noise schedules: the saved ``alphas_cumprod`` table -> timesteps and sigmas, as diffusers computes them.

Everything here is a pure function of the float32 ``alphas_cumprod`` written at export time: numpy
cannot rebuild torch's float32 ``linspace``/``cumprod`` bit for bit (research notes 3.0), so no
function here recomputes betas. Formulas and their diffusers line numbers: research notes 3.1-3.6.

Two parameterizations of the same forward process appear:

* VP (variance preserving, the UNet's own): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``;
* VE (k-diffusion / Karras): ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - a_t) / a_t)``, the
  sample the Euler-family samplers carry (it is the VP sample times ``sqrt(1 + sigma^2)``).

Scalars that feed the sample math stay ``np.float32``, because diffusers does that math on float32
0-d tensors; the schedule arrays themselves are built in float64 exactly as diffusers builds them
with numpy, then cast.
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("leading", "linspace", "trailing")


def spaced_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int,
                     *, round_linspace: bool = True) -> np.ndarray:
    """Descending timesteps for DDIM/PNDM/Euler/LMS (float64; research notes 3.1).

    ``round_linspace=False`` is the Euler-family rule: linspace timesteps stay fractional float32.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        if round_linspace:
            return np.linspace(0, T - 1, n).round()[::-1].copy()
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        # The float step T/n makes np.arange yield n+1 points for some n (e.g. 3); diffusers does too.
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of {SPACINGS}")


def multistep_timesteps(spacing: str, n: int, num_train_timesteps: int, last_timestep: int,
                        steps_offset: int) -> np.ndarray:
    """Descending timesteps for DPM-Solver/UniPC: n+1 points with the last dropped (research notes 3.1)."""
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1] + steps_offset
    if spacing == "trailing":
        return np.arange(last_timestep, 0, -num_train_timesteps / n).round() - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of {SPACINGS}")


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``sigma[t] = sqrt((1 - a_t) / a_t)`` for every training timestep, float32, ascending in t."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((1 - ac) / ac)


def interpolated_sigmas(timesteps: np.ndarray, sigma_full: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps by linear interpolation of the table (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigma_full)), sigma_full)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5 sigma ramp (float64), as diffusers' ``_convert_to_karras``."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigma_full: np.ndarray) -> np.ndarray:
    """Fractional timesteps of sigmas: linear interpolation in log sigma (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma[np.newaxis, :] - log_sigma_full[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigma_full.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigma_full[low_idx]
    high = log_sigma_full[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def final_sigma(final_sigmas_type: str, alphas_cumprod: np.ndarray) -> float:
    """The sigma appended after the last step: 0, or the smallest training sigma."""
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        return float(sigma_table(alphas_cumprod[:1])[0])
    raise ValueError(f"final_sigmas_type {final_sigmas_type!r} is not 'zero' or 'sigma_min'")


def ve_schedule(alphas_cumprod: np.ndarray, n: int, spacing: str, steps_offset: int, *,
                karras: bool = False, karras_range: tuple[float | None, float | None] = (None, None),
                final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Euler/LMS schedule: (timesteps float32, sigmas float32 with the final sigma appended).

    Karras sigmas span the *interpolated* schedule unless ``karras_range`` (sigma_min, sigma_max)
    overrides an end, and their timesteps are the fractional ``sigma_to_t`` (research notes 3.4).
    """
    T = len(alphas_cumprod)
    timesteps = spaced_timesteps(spacing, n, T, steps_offset, round_linspace=False).astype(np.float32)
    sigma_full = sigma_table(alphas_cumprod)
    sigmas = interpolated_sigmas(timesteps, sigma_full)
    if karras:
        lo, hi = karras_range
        lo = float(sigmas[-1]) if lo is None else lo
        hi = float(sigmas[0]) if hi is None else hi
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, np.log(sigma_full))
    sigmas = np.concatenate([sigmas, [final_sigma(final_sigmas_type, alphas_cumprod)]])
    return timesteps.astype(np.float32), sigmas.astype(np.float32)


def vp_multistep_schedule(alphas_cumprod: np.ndarray, n: int, spacing: str, steps_offset: int, last_timestep: int,
                          *, karras: bool, karras_range: tuple[float | None, float | None], round_karras: bool,
                          final_sigmas_type: str, karras_final_is_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver/UniPC schedule: (integer timesteps as float32, sigmas float32 with the final sigma appended).

    Karras sigmas span the *full* training table (not the spaced one; ``karras_range`` overrides an
    end), their timesteps are ``sigma_to_t`` (rounded unless ``round_karras`` is False: DPM-Solver with
    cosine betas; the int64 cast then truncates), and the solver keeps the exact Karras sigmas. UniPC
    appends the last Karras sigma for final_sigmas_type 'sigma_min' (``karras_final_is_last``).
    """
    T = len(alphas_cumprod)
    sigma_full = sigma_table(alphas_cumprod)
    timesteps = multistep_timesteps(spacing, n, T, last_timestep, steps_offset)
    final = final_sigma(final_sigmas_type, alphas_cumprod)
    if karras:
        lo, hi = karras_range
        sigmas = karras_sigmas(float(sigma_full[0]) if lo is None else lo,
                               float(sigma_full[-1]) if hi is None else hi, n)
        timesteps = sigma_to_t(sigmas, np.log(sigma_full))
        if round_karras:
            timesteps = timesteps.round()
        if karras_final_is_last and final_sigmas_type == "sigma_min":
            final = float(sigmas[-1])
    else:
        sigmas = interpolated_sigmas(timesteps, sigma_full)
    sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
    return timesteps.astype(np.int64).astype(np.float32), sigmas


def ve_init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """Std of the initial latent: sigma_max, or sqrt(sigma_max^2 + 1) for 'leading' (diffusers' rule)."""
    sigma_max = sigmas.max()
    if spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float(np.sqrt(sigma_max * sigma_max + 1))


def ve_scale_model_input(x: np.ndarray, sigma: np.float32) -> np.ndarray:
    """The UNet sees the VP sample: ``x / sqrt(sigma^2 + 1)``."""
    return x / np.sqrt(sigma * sigma + 1)


def vp_alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VE sigma -> VP (alpha_t, sigma_t) = (1/sqrt(sigma^2+1), sigma/sqrt(sigma^2+1))."""
    alpha_t = 1 / np.sqrt(sigma * sigma + 1)
    return alpha_t, sigma * alpha_t


def vp_lambda(alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
    """Half log-SNR ``lambda = log(alpha_t) - log(sigma_t)`` (DPM-Solver's time variable)."""
    return np.log(alpha_t) - np.log(sigma_t)


def add_noise_discrete(alphas_cumprod: np.ndarray, t: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Forward process at training timestep t (DDIM/PNDM/LCM ``add_noise``)."""
    a_t = alphas_cumprod[t]
    return np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * noise


def add_noise_ve(sigma: np.float32, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Forward process in VE form: ``x0 + sigma noise`` (Euler/LMS ``add_noise``)."""
    return x0 + noise * sigma


def add_noise_vp(sigma: np.float32, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Forward process in VP form at a VE sigma (DPM-Solver/UniPC ``add_noise``)."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return alpha_t * x0 + sigma_t * noise
