"""The one table of scheduler names: CLI name -> diffusers class, plan builder and config overrides."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .config import SchedulerConfig
from .ddim import DDIMPlan
from .dpm_solver import DPMSolverPlan
from .euler import EulerPlan
from .lcm import LCMPlan
from .lms import LMSPlan
from .pndm import PNDMPlan
from .unipc import UniPCPlan

# (params, alphas_cumprod, num_inference_steps, eta) -> plan
PlanBuilder = Callable[[Mapping[str, object], np.ndarray, int, float], object]


@dataclass(frozen=True)
class SchedulerSpec:
    """One CLI scheduler: the diffusers class it reproduces and what the name fixes in its config."""

    name: str
    diffusers_class: str
    build: PlanBuilder
    summary: str
    overrides: Mapping[str, object] = field(default_factory=dict)


_DPMPP = {"algorithm_type": "dpmsolver++"}

SCHEDULERS: Mapping[str, SchedulerSpec] = {spec.name: spec for spec in (
    SchedulerSpec("ddim", "DDIMScheduler", DDIMPlan.build, "DDIM; deterministic unless --eta > 0"),
    SchedulerSpec("pndm", "PNDMScheduler", PNDMPlan.build, "PNDM/PLMS, the SD1.x default"),
    SchedulerSpec("euler", "EulerDiscreteScheduler", EulerPlan.build,
                  "Euler (Karras sigmas if the config sets use_karras_sigmas)"),
    SchedulerSpec("euler-a", "EulerAncestralDiscreteScheduler", EulerPlan.build_ancestral,
                  "Euler ancestral; stochastic"),
    SchedulerSpec("dpmpp-2m", "DPMSolverMultistepScheduler", DPMSolverPlan.build, "DPM-Solver++ 2M",
                  {**_DPMPP, "use_karras_sigmas": False}),
    SchedulerSpec("dpmpp-2m-karras", "DPMSolverMultistepScheduler", DPMSolverPlan.build,
                  "DPM-Solver++ 2M with Karras sigmas", {**_DPMPP, "use_karras_sigmas": True}),
    SchedulerSpec("lms", "LMSDiscreteScheduler", LMSPlan.build, "k-LMS, 4th-order linear multistep"),
    SchedulerSpec("lcm", "LCMScheduler", LCMPlan.build, "LCM, for LCM UNets / LCM-LoRA; stochastic"),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", UniPCPlan.build, "UniPC bh2 predictor-corrector"),
)}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def default_scheduler_name(config: SchedulerConfig) -> str:
    """The CLI name that reproduces the checkpoint's own scheduler class and config.

    DPMSolverMultistepScheduler maps to dpmpp-2m or dpmpp-2m-karras by its use_karras_sigmas (an SDE
    algorithm_type in the checkpoint config runs as the ODE variant: a documented limit).
    """
    if config.class_name == "DPMSolverMultistepScheduler":
        karras = config.params_for(config.class_name)["use_karras_sigmas"]
        return "dpmpp-2m-karras" if karras else "dpmpp-2m"
    for spec in SCHEDULERS.values():
        if spec.diffusers_class == config.class_name:
            return spec.name
    raise ValueError(f"the checkpoint's scheduler {config.class_name} has no sdrt equivalent; "
                     f"choose one of {', '.join(SCHEDULER_NAMES)}")
