"""Numpy schedulers that reproduce diffusers' SD schedulers (numpy + stdlib only; never torch).

Public API::

    SCHEDULER_NAMES                      # ('ddim', 'pndm', 'euler', 'euler-a', 'dpmpp-2m',
                                         #  'dpmpp-2m-karras', 'lms', 'lcm', 'unipc'): argparse choices
    SchedulerConfig.from_json_file(engine_dir / "scheduler.json")   # or .from_json_dict(d)
    default_scheduler_name(config) -> str          # the name matching the checkpoint's own class
    make_sampler(name, config, num_inference_steps, strength=1.0, eta=0.0) -> Sampler

    sampler.timesteps            # float32 (n,): the UNet `timestep` input of each step of this run
    len(sampler)                 # n, the number of UNet calls (PNDM: N+1; img2img: the kept steps)
    sampler.init_noise_sigma     # float: text-to-image latents = unit normal * init_noise_sigma
    sampler.add_noise(x0, noise) # img2img: noised image latents at timesteps[0]
    sampler.needs_noise(i)       # True where step i consumes a standard-normal array
    sampler.scale_model_input(x, i)   # UNet input at step i (any batch, e.g. the CFG-doubled one)
    sampler.step(model_output, i, x, noise=None) -> x at the next noise level; ValueError if noise is
                                 # needed and missing, or if steps are not run in order 0, 1, ...
    sampler.history              # the multistep memory (past x0 / eps / derivatives), a plain value

Calling sequence (txt2img; for img2img start from ``add_noise`` instead of the multiply)::

    s = make_sampler("euler-a", config, 30)
    x = rng.standard_normal(shape, dtype=np.float32) * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        eps = cfg(unet(s.scale_model_input(x, i), t, ...))
        x = s.step(eps, i, x, noise=rng.standard_normal(shape, dtype=np.float32) if s.needs_noise(i) else None)

A name runs the diffusers class in ``registry.SCHEDULERS`` on the checkpoint's config the way
``XScheduler.from_config(checkpoint_scheduler.config)`` reads it (config.py), with the float32
``alphas_cumprod`` saved at export. Latents match diffusers to float32 rounding (tests/test_schedulers.py).
The axes are separate modules: schedule.py (timesteps, sigmas), parameterization.py (eps / v / x0),
one module per solver family (ddim, pndm, euler, lms, dpm_solver, unipc, lcm), sampler.py (the run).
Each plan class's docstring states what it does not implement.
"""

from .config import SchedulerConfig
from .registry import SCHEDULER_NAMES, SCHEDULERS, default_scheduler_name
from .sampler import Sampler, make_sampler

__all__ = ["SCHEDULER_NAMES", "SCHEDULERS", "Sampler", "SchedulerConfig", "default_scheduler_name", "make_sampler"]
