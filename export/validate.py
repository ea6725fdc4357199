"""Parity hop torch fp32 -> ONNX Runtime fp32, run before a graph is accepted.

The check runs at sizes other than the trace example (batch 1, a non-square resolution), so a graph that
specialised on the example's shapes fails here instead of in a user's pipeline.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import Validation

from .specs import ComponentSpec

# Accepted |onnx - torch| for fp32 graphs: ATOL + RTOL * max|torch output|. Measured on random full-size
# SD 1.5 weights and on tiny models: ORT's fused kernels reorder float sums, nothing more.
VALIDATION_ATOL = 1e-4
VALIDATION_RTOL = 1e-4


class ValidationError(UserError):
    """An exported graph disagrees with its torch module beyond the threshold."""


def reference_outputs(spec: ComponentSpec, module: torch.nn.Module, gen: torch.Generator):
    """Validation inputs (sizes other than the trace example's) and the torch module's outputs on them.

    Computed before ONNX Runtime loads the graph, so the torch module can be freed first: a full-size SDXL
    UNet (10 GB in fp32) and its ORT session would not fit in memory together on a 24 GB machine.
    """
    inputs = spec.sample_inputs(spec.validation_sizes(), gen)
    with torch.no_grad():
        ref = module(*inputs)
    return inputs, [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]


def check_onnx(spec: ComponentSpec, onnx_path, inputs, refs) -> Validation:
    """Run the graph in ONNX Runtime on `inputs`; refuse it if it strays from `refs` beyond the threshold."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    outs = session.run([t.name for t in spec.outputs], feeds)
    del session
    err = max(float(np.max(np.abs(o - r))) for o, r in zip(outs, refs))
    peak = max(float(np.max(np.abs(r))) for r in refs)
    threshold = VALIDATION_ATOL + VALIDATION_RTOL * peak
    shapes = {t.name: list(x.shape) for t, x in zip(spec.inputs, inputs)}
    if not np.isfinite(err) or err > threshold:
        raise ValidationError(
            f"{spec.name}: ONNX output differs from torch by {err:.3g} (threshold {threshold:.3g}) "
            f"at input shapes {shapes}"
        )
    return Validation(reference="torch fp32", max_abs_error=err, threshold=threshold, shapes=shapes)
