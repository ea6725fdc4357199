"""PNDM: pseudo numerical methods (Liu et al. 2022), PLMS with an optional Runge-Kutta (PRK) warm-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .parameterization import vp_eps
from .schedule import add_noise_discrete, spaced_timesteps


class PNDMHistory(NamedTuple):
    """What PNDM carries between calls: its call counter and past eps, as diffusers' PNDMScheduler."""

    counter: int = 0
    ets: tuple[np.ndarray, ...] = ()          # eps at the last (up to 4) full steps, oldest first
    cur_sample: np.ndarray | None = None      # sample at the start of the current multi-call step
    cur_model_output: np.ndarray | None = None  # PRK: running 1/6, 1/3, 1/3, 1/6 sum


def pndm_transfer(x: np.ndarray, eps: np.ndarray, a_t: np.float32, a_prev: np.float32) -> np.ndarray:
    """Transfer part phi(x_t, eps, t, t-delta), Liu et al. 2022 eq. 9; diffusers PNDMScheduler._get_prev_sample."""
    sample_coeff = np.sqrt(a_prev / a_t)
    eps_denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    return sample_coeff * x - (a_prev - a_t) * eps / eps_denom


def plms_eps(ets: tuple[np.ndarray, ...]) -> np.ndarray:
    """Adams-Bashforth combination of the last 2-4 eps, Liu et al. 2022 eq. 12 (newest last)."""
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


@dataclass(frozen=True, eq=False)
class PNDMPlan:
    """PNDM as diffusers' PNDMScheduler computes it (research notes 3.3).

    skip_prk_steps=True (SD configs) is PLMS: N+1 UNet calls, the second one repeats the first
    timestep. skip_prk_steps=False (the class default, e.g. PNDM chosen for an SD2 DDIM config) runs
    12 PRK calls then PLMS: N+9 calls. epsilon and v_prediction; steps_offset and all spacings.
    Limits: no 'sample' prediction (diffusers raises too). img2img slices the N+1 (or N+9) calls by
    t_start as the img2img pipeline does (PNDM has order 1), so the cut is approximate there too.
    """

    timesteps: np.ndarray       # float32: PRK timesteps then PLMS timesteps
    prk_timesteps: np.ndarray   # int64, empty with skip_prk_steps
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: np.float32
    step_ratio: int
    prediction_type: str
    init_noise_sigma: float = 1.0
    initial_history: PNDMHistory = PNDMHistory()

    @classmethod
    def build(cls, params: Mapping[str, object], alphas_cumprod: np.ndarray, n: int, eta: float) -> PNDMPlan:
        prediction_type = str(params["prediction_type"])
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"pndm: prediction_type {prediction_type!r} is not 'epsilon' or 'v_prediction'")
        T = int(params["num_train_timesteps"])
        ratio = T // n
        ascending = spaced_timesteps(str(params["timestep_spacing"]), n, T, int(params["steps_offset"]))[::-1]
        if params["skip_prk_steps"]:
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            # Four RK4 steps of size ratio at the end of the schedule, each 4 calls: t, t-r/2, t-r/2, t-r.
            prk = np.array(ascending[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = ascending[:-3][::-1]
        timesteps = np.concatenate([prk, plms]).astype(np.int64).astype(np.float32)
        final = np.float32(1.0) if params["set_alpha_to_one"] else alphas_cumprod[0]
        return cls(timesteps, prk, alphas_cumprod, final, ratio, prediction_type)

    def needs_noise(self, j: int) -> bool:
        return False

    def scale_model_input(self, j: int, x: np.ndarray) -> np.ndarray:
        return x

    def add_noise(self, j: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_discrete(self.alphas_cumprod, int(self.timesteps[j]), x0, noise)

    def _transfer(self, x: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        eps = vp_eps(self.prediction_type, model_output, x, np.sqrt(a_t), np.sqrt(1 - a_t))
        return pndm_transfer(x, eps, a_t, a_prev)

    def step(self, j: int, model_output: np.ndarray, x: np.ndarray, history: PNDMHistory,
             noise: np.ndarray | None) -> tuple[np.ndarray, PNDMHistory]:
        t = int(self.timesteps[j])
        if history.counter < len(self.prk_timesteps):
            return self._step_prk(t, model_output, x, history)
        return self._step_plms(t, model_output, x, history)

    def _step_prk(self, t: int, e: np.ndarray, x: np.ndarray, h: PNDMHistory) -> tuple[np.ndarray, PNDMHistory]:
        """One of the four calls of a PRK (RK4 on eps) step; diffusers PNDMScheduler.step_prk."""
        prev_t = t - (0 if h.counter % 2 else self.step_ratio // 2)
        t = int(self.prk_timesteps[h.counter // 4 * 4])
        stage = h.counter % 4
        ets, cur_sample, acc = h.ets, h.cur_sample, h.cur_model_output
        if stage == 0:
            acc, ets, cur_sample = (1 / 6) * e, ets + (e,), x
        elif stage in (1, 2):
            acc = acc + (1 / 3) * e
        else:
            e, acc = acc + (1 / 6) * e, None
        start = cur_sample if cur_sample is not None else x
        x_prev = self._transfer(start, t, prev_t, e)
        return x_prev, PNDMHistory(h.counter + 1, ets, cur_sample, acc)

    def _step_plms(self, t: int, e: np.ndarray, x: np.ndarray, h: PNDMHistory) -> tuple[np.ndarray, PNDMHistory]:
        """One PLMS call; the first full step takes two calls (t, then t again as a 2nd-order corrector)."""
        prev_t = t - self.step_ratio
        ets, cur_sample = h.ets, h.cur_sample
        if h.counter != 1:
            ets = ets[-3:] + (e,)
        else:
            prev_t, t = t, t + self.step_ratio
        if len(ets) == 1 and h.counter == 0:
            cur_sample = x
        elif len(ets) == 1 and h.counter == 1:
            e = (e + ets[-1]) / 2
            x, cur_sample = cur_sample, None
        else:
            e = plms_eps(ets)
        return self._transfer(x, t, prev_t, e), PNDMHistory(h.counter + 1, ets, cur_sample, h.cur_model_output)
