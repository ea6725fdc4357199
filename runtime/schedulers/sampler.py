"""One generation's scheduler run: a thin stateful adapter over a frozen plan and its pure step.

The plan (timesteps, sigmas, constants) never changes; the only state is ``history`` (the multistep
memory: past x0 / eps / derivatives, as a value the plan's ``step`` takes and returns) and the index
of the next step. Indices ``i`` are positions in ``Sampler.timesteps``; for img2img those start at
``begin`` in the plan's full schedule (diffusers' ``set_begin_index``).
"""

from __future__ import annotations

import numpy as np

from .config import SchedulerConfig
from .registry import SCHEDULER_NAMES, SCHEDULERS


def img2img_begin(num_inference_steps: int, strength: float) -> int:
    """First kept step of the full schedule: StableDiffusionImg2ImgPipeline.get_timesteps (every
    scheduler here has diffusers ``order`` 1, so t_start * order = t_start)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


class Sampler:
    """Runs one scheduler over one generation; see the package docstring for the calling sequence."""

    def __init__(self, name: str, plan, begin: int = 0):
        if not 0 <= begin < len(plan.timesteps):
            raise ValueError(f"{name}: no denoising step left (first step {begin} of {len(plan.timesteps)}); "
                             "raise strength or the step count")
        self.name = name
        self.plan = plan
        self.begin = begin
        self.history = plan.initial_history
        self._next = 0

    @property
    def timesteps(self) -> np.ndarray:
        """UNet timestep of each step of this run, float32 (the UNet's ``timestep`` input dtype)."""
        return self.plan.timesteps[self.begin:].astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial noise for text-to-image: ``latents = noise * init_noise_sigma``."""
        return self.plan.init_noise_sigma

    def __len__(self) -> int:
        return len(self.plan.timesteps) - self.begin

    def needs_noise(self, i: int) -> bool:
        """Whether ``step(..., i, ...)`` consumes a fresh standard-normal array (same shape as x)."""
        return self.plan.needs_noise(self.begin + i)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The UNet input for step i (identity except for the sigma-space samplers)."""
        return self.plan.scale_model_input(self.begin + i, np.asarray(x, dtype=np.float32))

    def add_noise(self, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """img2img start: noise the encoded image to the first step of this run, the scheduler's own way."""
        return self.plan.add_noise(self.begin, np.asarray(x0, dtype=np.float32), np.asarray(noise, dtype=np.float32))

    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Advance x from timesteps[i] to the next noise level, given the (guided) UNet output at step i."""
        if i != self._next:
            raise ValueError(f"{self.name}: step {i} called, expected step {self._next} (steps run in order, once)")
        x = np.asarray(x, dtype=np.float32)
        if self.needs_noise(i):
            if noise is None:
                raise ValueError(f"{self.name}: step {i} needs a standard-normal noise array")
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != x.shape:
                raise ValueError(f"{self.name}: noise shape {noise.shape} differs from the sample's {x.shape}")
        else:
            noise = None
        model_output = np.asarray(model_output, dtype=np.float32)
        x_prev, self.history = self.plan.step(self.begin + i, model_output, x, self.history, noise)
        self._next += 1
        return x_prev.astype(np.float32, copy=False)


def make_sampler(name: str, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0,
                 eta: float = 0.0) -> Sampler:
    """A run of scheduler ``name`` on the checkpoint's config, as diffusers' ``from_config`` would set it up.

    ``strength < 1`` is img2img: the run keeps the last steps of the N-step schedule exactly as
    StableDiffusionImg2ImgPipeline does. ``eta`` is DDIM's noise weight; other schedulers reject eta != 0.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if eta != 0.0 and name != "ddim":
        raise ValueError(f"eta applies to ddim only, not {name}")
    spec = SCHEDULERS[name]
    params = config.params_for(spec.diffusers_class, spec.overrides)
    alphas_cumprod = config.alphas_cumprod_for(spec.diffusers_class, params)
    plan = spec.build(params, alphas_cumprod, num_inference_steps, eta)
    return Sampler(name, plan, img2img_begin(num_inference_steps, strength))
