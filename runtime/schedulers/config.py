"""Scheduler configuration: the engine's ``scheduler.json``, read the way diffusers' ``from_config`` reads it.

``scheduler.json`` (written by the exporter) is::

    {"class_name": "PNDMScheduler",
     "config": {<dict(scheduler.config) of the checkpoint's scheduler>},
     "alphas_cumprod": [<num_train_timesteps float32 values>]}

Running a checkpoint with another scheduler is ``XScheduler.from_config(checkpoint_scheduler.config)``
in diffusers: X's own defaults, overwritten by every key of the saved config except those listed in
``_use_default_values`` (keys the checkpoint never set; an SD1.5 PNDM config therefore gives Euler its
default ``"linspace"`` spacing, research notes 3.0). Keys X does not know stay in ``X.config`` and a few
code paths read them (DPM-Solver's ``sigma_min``), so ``params_for`` keeps them too.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

# __init__ defaults of each diffusers scheduler class (diffusers 0.42.1); a test compares them with
# inspect.signature of the installed classes.
CLASS_DEFAULTS: Mapping[str, Mapping[str, object]] = types.MappingProxyType({
    "DDIMScheduler": {
        **_BETAS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", **_THRESHOLD, "clip_sample_range": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "PNDMScheduler": {
        **_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "steps_offset": 0},
    "EulerDiscreteScheduler": {
        **_BETAS, "prediction_type": "epsilon", "interpolation_type": "linear", **_SIGMA_KINDS,
        "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {
        **_BETAS, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False},
    "DPMSolverMultistepScheduler": {
        **_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLD,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, **_SIGMA_KINDS, "use_lu_lambdas": False, "use_flow_sigmas": False,
        "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    "LMSDiscreteScheduler": {
        **_BETAS, **_SIGMA_KINDS, "prediction_type": "epsilon", "timestep_spacing": "linspace",
        "steps_offset": 0},
    "LCMScheduler": {
        **_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", **_THRESHOLD,
        "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
    "UniPCMultistepScheduler": {
        **_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLD, "predict_x0": True,
        "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "solver_p": None,
        **_SIGMA_KINDS, "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace",
        "steps_offset": 0, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential", "sigma_min": None,
        "sigma_max": None, "shift_terminal": None},
})

# With rescale_betas_zero_snr the last alphas_cumprod is exactly 0 for DDIM/LCM; the sigma-based
# classes clamp it to 2**-24 so that sigma_max stays finite (scheduling_euler_discrete.py l.261).
_ZERO_SNR_LAST_ALPHA_CUMPROD = {
    "DDIMScheduler": 0.0, "LCMScheduler": 0.0, "EulerDiscreteScheduler": 2.0**-24,
    "EulerAncestralDiscreteScheduler": 2.0**-24, "DPMSolverMultistepScheduler": 2.0**-24,
    "UniPCMultistepScheduler": 2.0**-24,
}


def unsupported(name: str, **settings: object) -> None:
    """Raise one clear error if any setting differs from the only value sdrt implements for it."""
    for key, (value, supported) in settings.items():
        if value != supported:
            raise ValueError(f"scheduler {name!r}: {key}={value!r} is not supported (only {supported!r})")


@dataclass(frozen=True, eq=False)
class SchedulerConfig:
    """The checkpoint's scheduler: diffusers class name, saved config dict and float32 alphas_cumprod."""

    class_name: str
    params: Mapping[str, object]
    alphas_cumprod: np.ndarray

    @classmethod
    def from_json_dict(cls, d: Mapping[str, object]) -> SchedulerConfig:
        """Build from the parsed ``scheduler.json`` dict (see the module docstring)."""
        missing = {"class_name", "config", "alphas_cumprod"} - set(d)
        if missing:
            raise ValueError(f"scheduler.json lacks {sorted(missing)}")
        params = dict(d["config"])
        alphas_cumprod = np.asarray(d["alphas_cumprod"], dtype=np.float64).astype(np.float32)
        T = params.get("num_train_timesteps", 1000)
        if alphas_cumprod.shape != (T,):
            raise ValueError(f"scheduler.json: alphas_cumprod has shape {alphas_cumprod.shape}, expected ({T},)")
        alphas_cumprod.flags.writeable = False
        return cls(str(d["class_name"]), types.MappingProxyType(params), alphas_cumprod)

    @classmethod
    def from_json_file(cls, path: str | Path) -> SchedulerConfig:
        """Read ``scheduler.json`` from an engine directory."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json_dict(json.load(f))

    def params_for(self, class_name: str, overrides: Mapping[str, object] | None = None) -> dict[str, object]:
        """The config as ``<class_name>.from_config(saved_config, **overrides)`` holds it."""
        if class_name not in CLASS_DEFAULTS:
            raise ValueError(f"no defaults for scheduler class {class_name!r}")
        defaulted = set(self.params.get("_use_default_values", ()))
        explicit = {k: v for k, v in self.params.items() if not k.startswith("_") and k not in defaulted}
        return {**CLASS_DEFAULTS[class_name], **explicit, **(overrides or {})}

    def alphas_cumprod_for(self, class_name: str, params: Mapping[str, object]) -> np.ndarray:
        """The saved table as ``class_name`` would have computed it with ``params``.

        Only the zero-terminal-SNR end can differ between classes; a class that ignores
        ``rescale_betas_zero_snr`` while the saved table honours it (or the reverse) cannot be rebuilt
        from the table, so that raises.
        """
        source_rescaled = (self.class_name in _ZERO_SNR_LAST_ALPHA_CUMPROD
                           and bool(self.params.get("rescale_betas_zero_snr", False)))
        target_rescaled = (class_name in _ZERO_SNR_LAST_ALPHA_CUMPROD
                           and bool(params.get("rescale_betas_zero_snr", False)))
        if source_rescaled != target_rescaled:
            raise ValueError(f"{class_name} cannot reuse the alphas_cumprod of {self.class_name}: "
                             "they disagree on rescale_betas_zero_snr")
        if not target_rescaled:
            return self.alphas_cumprod
        alphas_cumprod = self.alphas_cumprod.copy()
        alphas_cumprod[-1] = _ZERO_SNR_LAST_ALPHA_CUMPROD[class_name]
        return alphas_cumprod
