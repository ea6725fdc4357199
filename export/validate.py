"""Parity hop torch fp32 -> ONNX Runtime (fp32 and fp16 graphs), run before a graph is accepted.

The check runs at sizes other than the trace example (batch 1, a non-square resolution), so a graph that
specialised on the example's shapes fails here instead of in a user's pipeline. Both precisions are compared
with the same torch fp32 outputs, each under its own named tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import Validation

from .precision import ActivationPeak, activation_peak
from .specs import ComponentSpec


@dataclass(frozen=True)
class Tolerance:
    """Accepted |onnx - torch fp32|: atol + rtol * max|torch output|."""

    name: str
    atol: float
    rtol: float

    def threshold(self, peak: float) -> float:
        return self.atol + self.rtol * peak

    def describe(self) -> str:
        return f"{self.name}: {self.atol:g} + {self.rtol:g} * max|torch|"


# fp32 graphs: measured on random full-size SD 1.5 weights and on tiny models; ORT's fused kernels reorder
# float sums, nothing more.
VALIDATION_ATOL = 1e-4
VALIDATION_RTOL = 1e-4
FP32_TOLERANCE = Tolerance("fp32", VALIDATION_ATOL, VALIDATION_RTOL)
# fp16 graphs (fp16 weights and activations, fp32 in and out): fp16 keeps 11 significant bits (relative step
# 4.9e-4), and the rounding of every weight and activation adds up through a network's depth. Measured
# max|fp16 graph - torch fp32| / max|torch| in ONNX Runtime: tiny SD 1.x models 0.7-1.7e-3; random full-size
# SD 1.5: UNet 0.9e-3, VAE decoder 1.4e-3 (torch fp16 on the CPU: 1.6e-3 and 3.4e-3). The tolerance leaves
# about 5x headroom; a wrong weight, a dropped cast or an overflow lands far beyond it.
FP16_TOLERANCE = Tolerance("fp16", 1e-3, 1e-2)
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}


class ValidationError(UserError):
    """An exported graph disagrees with its torch module beyond the threshold."""


@dataclass(frozen=True)
class Reference:
    """Validation inputs (sizes other than the trace example's), the torch fp32 outputs on them, and the
    largest activation on the way (precision.py's overflow screen)."""

    inputs: tuple[torch.Tensor, ...]
    outputs: list[np.ndarray]
    peak: ActivationPeak


def reference_outputs(spec: ComponentSpec, module: torch.nn.Module, gen: torch.Generator) -> Reference:
    """Run the fp32 torch module on the validation inputs.

    Computed before ONNX Runtime loads a graph, so the torch module can be freed first: a full-size SDXL
    UNet (10 GB in fp32) and its ORT session would not fit in memory together on a 24 GB machine.
    """
    inputs = spec.sample_inputs(spec.validation_sizes(), gen)
    with torch.no_grad(), activation_peak(module) as peak:
        ref = module(*inputs)
    return Reference(inputs, [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))], peak[0])


def check_onnx(spec: ComponentSpec, onnx_path, ref: Reference, precision: str = "fp32") -> Validation:
    """Run the graph in ONNX Runtime on the reference inputs; refuse it if it strays from torch fp32 beyond
    the precision's tolerance."""
    tolerance = TOLERANCES[precision]
    inputs, refs = ref.inputs, ref.outputs
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    outs = session.run([t.name for t in spec.outputs], feeds)
    del session
    err = max(float(np.max(np.abs(o - r))) for o, r in zip(outs, refs))
    peak = max(float(np.max(np.abs(r))) for r in refs)
    threshold = tolerance.threshold(peak)
    shapes = {t.name: list(x.shape) for t, x in zip(spec.inputs, inputs)}
    if not np.isfinite(err) or err > threshold:
        raise ValidationError(
            f"{spec.name}: {precision} ONNX output differs from torch fp32 by {err:.3g} (threshold {threshold:.3g}, "
            f"{tolerance.describe()}) at input shapes {shapes}"
        )
    return Validation(reference="torch fp32", max_abs_error=err, threshold=threshold, shapes=shapes,
                      tolerance=tolerance.describe(), peak_activation=ref.peak.value, peak_module=ref.peak.module)
