"""Engine backends: run one component with inputs checked against the manifest.

Every backend has one interface, `run(component, feeds) -> outputs` on numpy arrays, and a `name` that
`sdrt bench` reports ("sdrt-<name>"):

- `cpu`: ONNX Runtime's CPU provider on the fp32 graphs (the fp16 ones if the dir has no fp32 graph);
- `openvino`: OpenVINO's CPU plugin on the same graphs, in bf16 where the CPU has it (backend_openvino.py;
  the `sdrt[openvino]` extra);
- `cuda`: onnxruntime-gpu's CUDA provider on the fp16 graphs, with IO binding (backend_cuda.py);
- `tensorrt`: TensorRT engines built for this GPU (backend_tensorrt.py);
- `auto`: tensorrt, then cuda, then openvino, then cpu: the first that this machine and this engine dir can run.
  On a CPU machine that is OpenVINO where it is installed, else ONNX Runtime.

A GPU backend that cannot run here says why in one line (`unavailable`), which `sdrt doctor` shows too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .engines import ROWS_PER_IMAGE
from .errors import UserError
from .manifest import VAE_DECODER, VAE_ENCODER, Component, Manifest

BACKENDS = ("auto", "cpu", "openvino", "cuda", "tensorrt")
GPU_BACKENDS = ("tensorrt", "cuda")  # in `auto`'s order of preference, before openvino and cpu
CPU_BACKENDS = ("openvino", "cpu")


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


def checked(manifest: Manifest, name: str, feeds: dict[str, np.ndarray]) -> Component:
    """The component `name`, after checking `feeds` against it (every backend's `run` starts here)."""
    component = manifest.components.get(name)
    if component is None:
        raise UserError(f"this engine dir has no {name} component (exported: {', '.join(manifest.components)})")
    check_feeds(name, component, feeds)
    return component


# The largest attention score matrix ONNX Runtime's CPU kernel may build for one image (its guided batch), bytes.
# Larger ones are split into query chunks at load (kernels/chunked_attention.py): SD 1.5 at 1024x1024 would
# otherwise build 16 GiB per self-attention. Smaller chunks were faster, not slower: the SD 1.5 UNet at 1024x1024
# ran a step in 59 s with a 512 MiB budget and 40 s with 128 MiB (64 MiB: 44 s; peak RSS the same). The count of
# chunks is capped by the smallest size the engine takes (kernels/chunked_attention.py): SD 1.5's largest
# self-attention gets 32 chunks of 512 MiB at 1024x1024.
ATTENTION_BUDGET = 128 * 2**20
NO_ARENA = (VAE_DECODER, VAE_ENCODER)  # components run without ONNX Runtime's memory arena (see _options)


def attention_shapes(component: Component, rows: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """A component's graph input shapes at its smallest size with one row and at its largest with `rows`."""
    def at(which: str, batch: int) -> dict[str, list[int]]:
        return {t.name: [d if isinstance(d, int) else batch if d == "batch" else getattr(component.axes[d], which)
                         for d in t.shape] for t in component.inputs}

    return at("min", 1), at("max", rows)


class OrtBackend:
    """One ONNX Runtime session per component, created once, on the CPU execution provider.

    The optimized graph is cached beside the original (keyed by ONNX Runtime version and the attention budget),
    so a second load skips graph optimization and the attention pass. A read-only engine dir just runs without
    the cache. The VAE encoder's session is made on its first call: text-to-image never holds it.
    """

    name = "ort-cpu"  # what benchmarks call it
    provider = "CPUExecutionProvider"

    def __init__(self, engine_dir: Path, manifest: Manifest, threads: int = 0,
                 attention_budget: int | None = ATTENTION_BUDGET, lazy: tuple[str, ...] = (VAE_ENCODER,)):
        import onnxruntime as ort

        self._ort = ort
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.threads = threads or os.cpu_count() or 1
        self.attention_budget = attention_budget
        # Each session's arena gives its memory back after every call: otherwise the UNet's arena stays at its
        # high-water mark while the VAE decoder grows its own, and the peaks add up. Measured on SD 1.5 at 512x512
        # (one step and the decode): peak RSS 6.03 -> 5.30 GiB, time 12.5 -> 13.0 s (benchmarks/results/cpu.md).
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.sessions = {name: self._session(name, c) for name, c in manifest.components.items() if name not in lazy}

    def _options(self, name: str):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self.threads  # one op at a time uses every core: no inter-op pool
        opts.inter_op_num_threads = 1
        opts.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        # Memory, measured on SD 1.5 (benchmarks/results/cpu.md). The UNet keeps the arena (without it a step ran
        # 30% slower) and no memory pattern (it keeps a planned block per input shape: +0.8 GiB, no faster). The
        # VAE runs once per image at full resolution: no arena, and a memory pattern, which plans one block per
        # shape and frees it after the call (1024x1024 decode: peak 4.3 GiB against the arena's 5.7, as fast
        # from the second call at a size on).
        opts.enable_cpu_mem_arena = name not in NO_ARENA
        opts.enable_mem_pattern = name in NO_ARENA
        opts.log_severity_level = 3
        return opts

    def _chunked(self, name: str, component: Component, model: Path) -> bytes | None:
        """The graph with its large attentions chunked (serialized, weights still external), or None if no
        attention can exceed the budget."""
        if self.attention_budget is None or not component.graph("fp32", "fp16").op_counts.get("Attention"):
            return None
        import onnx

        from ..kernels.chunked_attention import chunk_attention

        graph = onnx.load(str(model), load_external_data=False)
        smallest, largest = attention_shapes(component, ROWS_PER_IMAGE.get(name, 1))
        chunked, report = chunk_attention(graph, smallest, largest, self.attention_budget)
        return chunked.SerializeToString() if report.changed else None

    def _session(self, name: str, component: Component):
        artifact = component.graph("fp32", "fp16")  # ORT's CPU provider computes most fp16 ops in fp32 anyway
        model = self.engine_dir / artifact.file
        if not model.is_file():
            raise UserError(f"{name}: {artifact.file} is missing from {self.engine_dir}")
        budget = self.attention_budget
        budget = "" if budget is None else f"-attn{budget >> 20}m" if budget % 2**20 == 0 else f"-attn{budget}b"
        cache = model.with_name(f"{model.stem}.ort-{self._ort.__version__}-cpu{budget}.onnx")
        opts = self._options(name)
        if cache.is_file() and cache.stat().st_mtime >= model.stat().st_mtime:
            # Already optimized: only the cheap basic passes, no second rewrite.
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            try:
                return self._ort.InferenceSession(str(cache), opts, providers=[self.provider])
            except Exception:  # a stale or partial cache: rebuild it below
                cache.unlink(missing_ok=True)
                opts = self._options(name)
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chunked = self._chunked(name, component, model)
        source = str(model) if chunked is None else chunked
        if chunked is not None:  # from bytes: ORT finds the external weights beside the original file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.parent))
        if not os.access(model.parent, os.W_OK):
            return self._ort.InferenceSession(source, opts, providers=[self.provider])
        # ORT writes the cache as it optimizes: into a private folder, then renamed into place (data file first),
        # so a process loading the same dir at the same time (server replicas) never reads a half-written cache.
        staging = Path(tempfile.mkdtemp(prefix=".ort-cache-", dir=model.parent))
        try:
            opts.optimized_model_filepath = str(staging / cache.name)
            if artifact.external_data:  # keep the cache under the protobuf limit too
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              cache.name + ".data")
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            session = self._ort.InferenceSession(source, opts, providers=[self.provider])
            for name in (cache.name + ".data", cache.name):
                if (staging / name).is_file():
                    os.replace(staging / name, cache.parent / name)
            return session
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        component = checked(self.manifest, name, feeds)
        options = None if name in NO_ARENA else self.run_options  # ORT refuses to shrink an arena it lacks
        return self.session(name, component).run([t.name for t in component.outputs], feeds, options)

    def session(self, name: str, component: Component):
        """The component's session, made now if it was left for its first call."""
        session = self.sessions.get(name)
        if session is None:
            session = self.sessions[name] = self._session(name, component)
        return session


class TimedBackend:
    """A backend whose every `run` also reports (component, seconds) to `observe`: a server's per-stage latency."""

    def __init__(self, backend, observe: Callable[[str, float], None]):
        self.inner = backend
        self.name = backend.name
        self.observe = observe

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        try:
            return self.inner.run(name, feeds)
        finally:
            self.observe(name, time.perf_counter() - start)


def unavailable(kind: str, engine_dir: Path | None = None, manifest: Manifest | None = None) -> str | None:
    """None if backend `kind` can run here (and run this engine dir, if given), else the one-line reason."""
    if kind == "cpu":
        return None
    if kind == "openvino":
        from .backend_openvino import openvino_problem

        return openvino_problem()
    from . import gpu

    if kind not in GPU_BACKENDS:
        raise UserError(f"unknown backend '{kind}' (available: {', '.join(BACKENDS)})")
    found = gpu.probe()
    if found.gpu is None:
        return f"the {kind} backend needs an NVIDIA GPU: {found.problem}"
    if kind == "cuda":
        from .backend_cuda import cuda_provider_problem

        return cuda_provider_problem()
    from .backend_tensorrt import tensorrt_problem

    return tensorrt_problem(found.gpu, engine_dir, manifest)


def resolve(kind: str, engine_dir: Path, manifest: Manifest) -> str:
    """The backend `auto` stands for here: the first of tensorrt, cuda, openvino, cpu that can run this engine
    dir."""
    if kind != "auto":
        return kind
    return next((k for k in (*GPU_BACKENDS, "openvino") if unavailable(k, engine_dir, manifest) is None), "cpu")


def make_backend(kind: str, engine_dir: Path, manifest: Manifest, build: bool = False, cpu_precision: str = "auto",
                 static=None):
    """The backend `kind` on this engine dir. A GPU backend that cannot run here is a one-line UserError;
    `build` lets the tensorrt backend build the engines this GPU lacks (with progress) instead of refusing.
    `cpu_precision` ("auto", "f32", "bf16") and `static` (a backend_openvino.StaticShape) are the openvino
    backend's; ONNX Runtime's CPU provider computes in f32 and refuses "bf16"."""
    if kind not in BACKENDS:
        raise UserError(f"unknown backend '{kind}' (available: {', '.join(BACKENDS)})")
    if kind == "auto":  # resolve() has already checked the backend it picks
        kind = resolve(kind, engine_dir, manifest)
    elif problem := unavailable(kind, None if build else engine_dir, manifest):
        raise UserError(problem)
    from .backend_openvino import PRECISIONS

    if cpu_precision not in PRECISIONS:
        raise UserError(f"unknown CPU precision '{cpu_precision}' (choose from: {', '.join(PRECISIONS)})")
    if static is not None and kind != "openvino":
        raise UserError(f"a static size is the openvino backend's (this is {kind}; TensorRT: sdrt build --static)")
    if kind == "openvino":
        from .backend_openvino import OpenVinoBackend

        return OpenVinoBackend(engine_dir, manifest, cpu_precision, static=static)
    if cpu_precision == "bf16":
        raise UserError(f"--cpu-precision bf16 needs the openvino backend (this is {kind}): pip install "
                        "'sdrt[openvino]' and use --backend openvino or auto")
    if kind == "cpu":
        return OrtBackend(engine_dir, manifest)
    if kind == "cuda":
        from .backend_cuda import OrtCudaBackend

        return OrtCudaBackend(engine_dir, manifest)
    from .backend_tensorrt import TensorRTBackend

    return TensorRTBackend(engine_dir, manifest, build=build)
