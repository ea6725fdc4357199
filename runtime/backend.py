"""Engine backends: run one component with inputs checked against the manifest.

`OrtBackend` runs the fp32 ONNX graphs with ONNX Runtime on the CPU. The "cuda" and "tensorrt" backends will
implement the same interface: `run(component, feeds)`, and a `name` that `sdrt bench` reports ("sdrt-<name>").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import Component, Manifest

BACKENDS = ("auto", "cpu")


def check_feeds(name: str, component: Component, feeds: dict[str, np.ndarray]) -> None:
    """Refuse inputs whose names, dtypes or shapes the manifest does not allow, naming the input."""
    expected = {t.name for t in component.inputs}
    if set(feeds) != expected:
        raise UserError(f"{name}: inputs {sorted(feeds)} do not match the manifest's {sorted(expected)}")
    sizes: dict[str, int] = {}
    for t in component.inputs:
        x = feeds[t.name]
        if x.dtype != np.dtype(t.dtype):
            raise UserError(f"{name}.{t.name}: dtype {x.dtype}, expected {t.dtype}")
        if x.ndim != len(t.shape):
            raise UserError(f"{name}.{t.name}: {x.ndim}-d array, expected shape {list(t.shape)}")
        for dim, size in zip(t.shape, x.shape):
            if isinstance(dim, int):
                if size != dim:
                    raise UserError(f"{name}.{t.name}: shape {list(x.shape)}, expected {list(t.shape)}")
                continue
            axis = component.axes[dim]
            if not axis.check(size):
                raise UserError(f"{name}.{t.name}: {dim} = {size} is outside the engine's range {axis.describe()}")
            if sizes.setdefault(dim, size) != size:
                raise UserError(f"{name}.{t.name}: {dim} = {size} but another input has {sizes[dim]}")


class OrtBackend:
    """One ONNX Runtime session per component, created once, on the CPU execution provider.

    The optimized graph is cached beside the original (keyed by ONNX Runtime version), so a second load skips
    graph optimization. A read-only engine dir just runs without the cache.
    """

    name = "ort-cpu"  # what benchmarks call it
    provider = "CPUExecutionProvider"

    def __init__(self, engine_dir: Path, manifest: Manifest, threads: int = 0):
        import onnxruntime as ort

        self._ort = ort
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.threads = threads or os.cpu_count() or 1
        self.sessions = {name: self._session(name, c) for name, c in manifest.components.items()}

    def _options(self):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self.threads  # one op at a time uses every core: no inter-op pool
        opts.inter_op_num_threads = 1
        opts.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        return opts

    def _session(self, name: str, component: Component):
        artifact = component.artifact("onnx", "fp32")
        model = self.engine_dir / artifact.file
        if not model.is_file():
            raise UserError(f"{name}: {artifact.file} is missing from {self.engine_dir}")
        cache = model.with_name(f"{model.stem}.ort-{self._ort.__version__}-cpu.onnx")
        opts = self._options()
        if cache.is_file() and cache.stat().st_mtime >= model.stat().st_mtime:
            # Already optimized: only the cheap basic passes, no second rewrite.
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            try:
                return self._ort.InferenceSession(str(cache), opts, providers=[self.provider])
            except Exception:  # a stale or partial cache: rebuild it below
                cache.unlink(missing_ok=True)
                opts = self._options()
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if os.access(model.parent, os.W_OK):
            opts.optimized_model_filepath = str(cache)
            if artifact.external_data:  # keep the cache under the protobuf limit too
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              cache.name + ".data")
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return self._ort.InferenceSession(str(model), opts, providers=[self.provider])

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        component = self.manifest.components.get(name)
        if component is None:
            raise UserError(f"this engine dir has no {name} component (exported: {', '.join(self.manifest.components)})")
        check_feeds(name, component, feeds)
        return self.sessions[name].run([t.name for t in component.outputs], feeds)


def make_backend(kind: str, engine_dir: Path, manifest: Manifest):
    if kind in ("auto", "cpu"):
        return OrtBackend(engine_dir, manifest)
    raise UserError(f"unknown backend '{kind}' (available: {', '.join(BACKENDS)})")
