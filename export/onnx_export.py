"""Trace one component spec to an ONNX file with torch's dynamo exporter at opset 23.

Opset 23 makes scaled-dot-product attention come out as the standard fused `Attention` op and group norm
as `GroupNormalization` (research/ort_anchors.md §3.1): the graphs TensorRT 10.14+ parses into fused kernels.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from .specs import ComponentSpec

OPSET = 23
# protobuf cannot serialise a message over 2 GiB; leave room for the graph itself beside the weights.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class OnnxFile:
    path: Path
    external_data: Path | None
    bytes: int  # graph plus external data
    op_counts: dict[str, int]


def dynamic_shapes(spec: ComponentSpec) -> dict[str, dict[int, object]]:
    """torch.export dims for every input, one Dim per axis name shared across inputs."""
    dims = {}
    for name, ax in spec.axes.items():
        m = ax.multiple_of
        dim = torch.export.Dim(f"{name}_div{m}" if m > 1 else name, min=ax.min // m, max=ax.max // m)
        dims[name] = dim * m if m > 1 else dim
    return {
        t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs
    }


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type of the main graph, most frequent first."""
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return dict(counts.most_common())


@contextlib.contextmanager
def _quiet():
    """The exporter prints its own progress and warnings; sdrt shows one line per component instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(spec: ComponentSpec, module: torch.nn.Module, path: Path, gen: torch.Generator) -> OnnxFile:
    """Trace `module` on the spec's example inputs and save it to `path` (+ `path.data` when large)."""
    example = spec.sample_inputs(spec.example_sizes(), gen)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes(spec),
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=external)
    del program
    data = path.with_name(path.name + ".data")
    # torch may externalise the weights on its own (it did for a 1.7 GB fp16 UNet): trust the disk, not the flag.
    external = data.is_file()
    model = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size + (data.stat().st_size if external else 0)
    return OnnxFile(path=path, external_data=data if external else None, bytes=size, op_counts=op_counts(model))
