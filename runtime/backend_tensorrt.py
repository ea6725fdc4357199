"""The `tensorrt` backend: the engine dir's TensorRT engines, on one CUDA stream, through cuda-python. No torch.

Per call: `set_input_shape` for each input, `infer_shapes`, `set_tensor_address` for every tensor, then
`execute_async_v3` on the stream, with the copies queued on the same stream around it. Device buffers are
allocated once per tensor and grow only when a larger shape comes. All contexts share one activation buffer
(USER_MANAGED allocation), sized for the largest engine: the components run one after another on one stream,
never at once. After a shape has run once, its launch is captured in a CUDA graph and replayed from then on
(an engine that cannot be captured just keeps launching).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import gpu
from .backend import checked
from .engines import covers, matching_engines, mismatch
from .errors import UserError
from .manifest import Artifact, Manifest


def tensorrt_problem(device: gpu.Gpu, engine_dir: Path | None, manifest: Manifest | None) -> str | None:
    """None if TensorRT and cuda-bindings are installed and (given a dir) every component has an engine for this
    GPU and TensorRT version; else the one-line reason."""
    if not gpu.installed("tensorrt"):
        return "the tensorrt backend needs TensorRT: pip install 'sdrt[tensorrt]'"
    if not gpu.installed("cuda.bindings"):
        return "the tensorrt backend needs cuda-bindings: pip install 'sdrt[tensorrt]'"
    if manifest is None or engine_dir is None:
        return None
    import tensorrt

    for name, component in manifest.components.items():
        if not matching_engines(component, device.compute_capability, tensorrt.__version__):
            return mismatch(name, component, device.compute_capability, tensorrt.__version__, device.name)
    return None


class _Engine:
    """One deserialized engine, its execution context and its I/O buffers."""

    def __init__(self, trt, runtime, artifact: Artifact, engine_dir: Path, messages: list[str]):
        self.artifact = artifact
        plan = (Path(engine_dir) / artifact.file).read_bytes()
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:  # TensorRT's log says why: a version tag or a compute capability
            reason = next((m for m in reversed(messages) if "ersion" in m or "device" in m or "compute" in m),
                          messages[-1] if messages else "no reason given")
            raise UserError(f"{artifact.file}: TensorRT could not load the engine ({reason}); rebuild it with "
                            "`sdrt build ENGINE_DIR --force`")
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = self.engine.create_execution_context(strategy)
        self.memory = int(getattr(self.engine, "device_memory_size_v2", 0) or self.engine.device_memory_size)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: gpu.DeviceBuffer() for n in names}
        self.graphs: dict[tuple, object] = {}
        self.seen: set[tuple] = set()

    def use_memory(self, buffer: gpu.DeviceBuffer) -> None:
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(buffer.ptr, buffer.nbytes)
        else:
            self.context.device_memory = buffer.ptr


class TensorRTBackend:
    """Every component's engine for this GPU and TensorRT version, on one stream."""

    name = "tensorrt"

    def __init__(self, engine_dir: Path, manifest: Manifest, build: bool = False, cuda_graphs: bool = True,
                 device: int = 0):
        from .tensorrt_build import TrtBuilder, build_engines, import_tensorrt

        trt = import_tensorrt()
        found = gpu.probe()
        if found.gpu is None:
            raise UserError(f"the tensorrt backend needs an NVIDIA GPU: {found.problem}")
        here = found.gpus[device]
        self.engine_dir, self.cuda_graphs = Path(engine_dir), cuda_graphs
        missing = [n for n, c in manifest.components.items()
                   if not matching_engines(c, here.compute_capability, trt.__version__)]
        if missing and build:
            manifest = build_engines(engine_dir, TrtBuilder(device=device), components=tuple(missing))
        elif missing:
            name = missing[0]
            raise UserError(mismatch(name, manifest.components[name], here.compute_capability, trt.__version__,
                                     here.name) + ", or load with build=True")
        self.manifest = manifest
        self.messages: list[str] = []
        from .tensorrt_build import capture_logger

        self.logger = capture_logger(trt, self.messages)
        self.runtime = trt.Runtime(self.logger)
        self.stream = gpu.Stream()
        self.engines = {name: [_Engine(trt, self.runtime, a, engine_dir, self.messages)
                               for a in matching_engines(c, here.compute_capability, trt.__version__)]
                        for name, c in manifest.components.items()}
        # One activation buffer for all contexts: they never run at the same time.
        self.activations = gpu.DeviceBuffer(max(e.memory for es in self.engines.values() for e in es))
        for es in self.engines.values():
            for e in es:
                e.use_memory(self.activations)
        self.uploads: dict[tuple[int, str], np.ndarray] = {}

    def _pick(self, name: str, shapes: dict[str, tuple[int, ...]]) -> _Engine:
        problems = []
        for e in self.engines[name]:
            problem = covers(e.artifact.engine.profile, shapes)
            if problem is None:
                return e
            problems.append(problem)
        raise UserError(f"{name}.{problems[0]}; build an engine that takes it with `sdrt build ENGINE_DIR` "
                        "(--min/--max/--max-batch)")

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        component = checked(self.manifest, name, feeds)
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        e = self._pick(name, shapes)
        ctx, moved = e.context, False
        for k, shape in shapes.items():
            if not ctx.set_input_shape(k, shape):
                raise UserError(f"{name}.{k}: TensorRT refused shape {list(shape)}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise UserError(f"{name}: TensorRT could not infer the shapes of {', '.join(unresolved)}")
        out_shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in e.outputs}
        for k, x in feeds.items():
            moved |= e.buffers[k].ensure(x.nbytes)
        for n, shape in out_shapes.items():
            moved |= e.buffers[n].ensure(int(np.prod(shape)) * e.dtypes[n].itemsize)
        if moved:
            e.graphs.clear()  # captured graphs hold the old addresses
        for n, buf in e.buffers.items():
            ctx.set_tensor_address(n, buf.ptr)
        for k, x in feeds.items():
            key = (id(e), k)
            if self.uploads.get(key) is x and not x.flags.writeable and not moved:
                continue  # the same read-only array as last call is still on the GPU
            self.stream.upload(e.buffers[k].ptr, x.astype(e.dtypes[k], copy=False))
            self.uploads[key] = x
        self._launch(e, tuple(sorted(shapes.items())))
        outs = [np.empty(out_shapes[t.name], dtype=e.dtypes[t.name]) for t in component.outputs]
        for t, out in zip(component.outputs, outs):
            self.stream.download(out, e.buffers[t.name].ptr)
        self.stream.sync()
        return [o.astype(np.float32, copy=False) if o.dtype == np.float16 else o for o in outs]

    def _launch(self, e: _Engine, key: tuple) -> None:
        def enqueue() -> bool:
            return e.context.execute_async_v3(self.stream.handle)

        graph = e.graphs.get(key)
        if graph is not None:
            self.stream.replay(graph)
            return
        if self.cuda_graphs and key in e.seen and key not in e.graphs:  # the second call at this shape: capture
            graph = e.graphs[key] = self.stream.capture(enqueue)  # None: not capturable, launch plainly from now on
            if graph is not None:
                self.stream.replay(graph)
                return
        if not enqueue():
            raise UserError(f"{e.artifact.file}: TensorRT could not enqueue the engine: "
                            f"{self.messages[-1] if self.messages else 'no reason given'}")
        e.seen.add(key)
