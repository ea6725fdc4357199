"""`sdrt build`: TensorRT engines from an engine dir's graphs, on the GPU that will run them.

The common flow exports on a CPU machine and builds on the serving GPU machine, where only the lean runtime and
TensorRT are installed; `Pipeline.load(..., backend="tensorrt", build=True)` builds too. That is why the builder
lives in the runtime (it needs TensorRT, never torch), and why the runtime never has to import the exporter.

Builds are strongly typed (TensorRT 11 knows no other kind): an engine computes in the precisions its graph
declares, so each component is built from its fp16 graph, or its fp32 one where the export kept it fp32
(`kept_fp32`). Profiles come from the manifest's axes (engines.BuildShapes). One timing cache per GPU and
TensorRT version sits in the engine dir and makes rebuilds fast. Each engine is written to a temporary file and
renamed; the manifest gains its `tensorrt` artifact only after that, under a lock, written whole. A failed or
interrupted build leaves the dir as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

from .engines import BuildShapes, engine_file, engine_key, graph_sha256
from .errors import UserError
from .manifest import MANIFEST_FILE, Artifact, EngineInfo, Manifest

WORKSPACE_DEFAULT_GIB = 0  # 0: TensorRT's default (the GPU's memory)


class Builder(Protocol):
    """What the build needs from TensorRT (TrtBuilder), so the bookkeeping is tested without a GPU."""

    tensorrt_version: str
    compute_capability: str
    gpu_name: str

    def build(self, onnx_path: Path, profile: dict, timing_cache: Path, label: str) -> tuple[bytes, int]:
        """The serialized engine and its activation memory at the profile's largest shapes."""
        ...


@dataclass(frozen=True)
class BuildSettings:
    """Builder settings that change the plan: part of each engine's key."""

    optimization_level: int = 3  # TensorRT's default; 0..5
    workspace_gib: float = WORKSPACE_DEFAULT_GIB

    def as_dict(self) -> dict:
        return {"optimization_level": self.optimization_level, "workspace_gib": self.workspace_gib}


def timing_cache_path(engine_dir: Path, builder: Builder) -> Path:
    return Path(engine_dir) / f"timing-sm{builder.compute_capability.replace('.', '')}-trt{builder.tensorrt_version}.cache"


@contextlib.contextmanager
def _locked(engine_dir: Path):
    """One manifest update at a time per engine dir (a lock on the folder itself, so no file is left behind):
    two builds never lose each other's entries."""
    fd = os.open(engine_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _writable(engine_dir: Path) -> None:
    if not os.access(engine_dir, os.W_OK) or not os.access(Path(engine_dir) / MANIFEST_FILE, os.W_OK):
        raise UserError(f"{engine_dir} is not writable: TensorRT engines are written into the engine dir")


def plan(manifest: Manifest, components: tuple[str, ...] | None) -> tuple[str, ...]:
    names = tuple(manifest.components) if not components else tuple(components)
    unknown = [c for c in names if c not in manifest.components]
    if unknown:
        raise UserError(f"this engine dir has no {', '.join(unknown)} (its components: "
                        f"{', '.join(manifest.components)})")
    return names


def build_engines(engine_dir: Path, builder: Builder, shapes: BuildShapes | None = None,
                  components: tuple[str, ...] | None = None, settings: BuildSettings = BuildSettings(),
                  force: bool = False, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Manifest:
    """Build (or reuse) one engine per component for `shapes`; returns the updated manifest."""
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    names = plan(manifest, components)
    shapes = shapes or BuildShapes.default(manifest)
    shapes.check(manifest)
    _writable(engine_dir)
    cache = timing_cache_path(engine_dir, builder)
    log(f"sdrt build: {engine_dir} on {builder.gpu_name} (compute {builder.compute_capability}, TensorRT "
        f"{builder.tensorrt_version}), {shapes.describe()}")
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        component = manifest.components[name]
        graph = component.graph("fp16", "fp32")
        profile = shapes.profile(name, component, manifest.vae_scale_factor)
        sha = graph_sha256(engine_dir, graph)
        key = engine_key(builder.compute_capability, builder.tensorrt_version, sha, profile, settings.as_dict())
        rel = engine_file(name, key)
        path = engine_dir / rel
        existing = next((a for a in component.engines() if a.engine and a.engine.key == key), None)
        if existing and path.is_file() and not force:
            log(f"[{i}/{len(names)}] {name}: engine {path.name} is up to date")
            continue
        t = time.perf_counter()
        label = f"[{i}/{len(names)}] {name}"
        log(f"{label}: building from {graph.file} ({graph.precision}); this takes minutes for a UNet")
        plan_bytes, device_memory = builder.build(engine_dir / graph.file, profile, cache, label)
        seconds = time.perf_counter() - t
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_bytes(plan_bytes)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        info = EngineInfo(key=key, compute_capability=builder.compute_capability, gpu=builder.gpu_name,
                          tensorrt=builder.tensorrt_version, onnx=graph.file, onnx_sha256=sha, profile=profile,
                          build_seconds=round(seconds, 1), device_memory_bytes=int(device_memory))
        artifact = Artifact(kind="tensorrt", precision=graph.precision, file=rel, bytes=len(plan_bytes), engine=info)
        with _locked(engine_dir):  # re-read: another build may have added engines meanwhile
            current = Manifest.load(engine_dir)
            c = current.components[name]
            kept = tuple(a for a in c.artifacts if not (a.kind == "tensorrt" and a.engine and a.engine.key == key))
            components_now = {**current.components, name: replace(c, artifacts=(*kept, artifact))}
            manifest = replace(current, components=components_now)
            manifest.save(engine_dir)
        log(f"{label}: {seconds:.1f} s, {len(plan_bytes) / 2**20:.1f} MiB, activation memory "
            f"{device_memory / 2**20:.0f} MiB -> {rel}")
    log(f"sdrt build: done in {time.perf_counter() - t0:.1f} s")
    return manifest


# -- TensorRT itself ------------------------------------------------------------------------------------------

def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UserError("TensorRT is not installed: pip install 'sdrt[tensorrt]' (needs an NVIDIA GPU)") from None
    return tensorrt


def capture_logger(trt, messages: list[str]):
    """A TensorRT logger that keeps warnings and errors (their text tells a version mismatch from a device one)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                messages.append(str(msg))

    return Logger()


def _progress_monitor(trt, label: str):
    """TensorRT's build phases as tqdm bars on stderr (the top phase) under the component's label."""
    from tqdm import tqdm

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.bars[phase_name] = tqdm(total=num_steps, desc=f"{label}: {phase_name}", file=sys.stderr,
                                             leave=False)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # never cancel

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


class TrtBuilder:
    """Strongly typed TensorRT builds through the Python API (TensorRT 10.x and 11.x)."""

    def __init__(self, settings: BuildSettings = BuildSettings(), device: int = 0):
        from .gpu import probe

        self.trt = import_tensorrt()
        gpu = probe()
        if gpu.gpu is None:
            raise UserError(f"sdrt build needs an NVIDIA GPU: {gpu.problem}")
        self.gpu_name, self.compute_capability = gpu.gpus[device].name, gpu.gpus[device].compute_capability
        self.tensorrt_version = self.trt.__version__
        self.settings = settings

    def build(self, onnx_path: Path, profile: dict, timing_cache: Path, label: str) -> tuple[bytes, int]:
        trt = self.trt
        messages: list[str] = []
        logger = capture_logger(trt, messages)
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # TensorRT 10.x: ask for it; 11.x: always so
            flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"{label}: TensorRT cannot parse {onnx_path.name}: {errors or messages[-1:]}")
        config = builder.create_builder_config()
        config.builder_optimization_level = self.settings.optimization_level
        if self.settings.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.settings.workspace_gib * 2**30))
        opt_profile = builder.create_optimization_profile()
        for name, shapes in profile.items():
            opt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(opt_profile)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        monitor = _progress_monitor(trt, label)  # TensorRT does not keep the Python object alive: this name does
        config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(f"{label}: TensorRT could not build the engine: {' | '.join(messages[-3:]) or 'no reason given'}")
        partial = timing_cache.with_name(f".{timing_cache.name}.partial")
        partial.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        partial.replace(timing_cache)
        plan_bytes = bytes(memoryview(serialized))
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
        memory = int(getattr(engine, "device_memory_size_v2", 0) or getattr(engine, "device_memory_size", 0))
        return plan_bytes, memory
