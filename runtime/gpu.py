"""The GPU, without torch: what is there (NVML, cuda-bindings), and the few CUDA runtime calls the TensorRT
backend needs (device buffers, one stream, copies, CUDA graphs).

Every probe returns an answer with a reason instead of raising, so `sdrt doctor` and the `auto` backend can say
why a GPU path is unavailable. cuda-bindings imports without a driver (its calls then return
cudaErrorInsufficientDriver), so all of this is exercised on CPU machines too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from .errors import UserError


class GpuError(UserError):
    """A CUDA call failed: one line naming the call and CUDA's error name."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class GpuProbe:
    gpus: tuple[Gpu, ...]
    driver: str | None  # the NVIDIA driver version, e.g. "580.159.04"
    cuda: str | None  # the newest CUDA version the driver supports, e.g. "13.0"
    problem: str | None  # why no GPU is visible, when none is

    @property
    def gpu(self) -> Gpu | None:
        return self.gpus[0] if self.gpus else None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _probe_nvml() -> GpuProbe:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return GpuProbe((), None, None, f"no NVIDIA driver (NVML: {e})")
    try:
        def text(x):
            return x.decode() if isinstance(x, bytes) else str(x)

        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(Gpu(i, text(pynvml.nvmlDeviceGetName(h)), f"{major}.{minor}",
                            int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
        driver = text(pynvml.nvmlSystemGetDriverVersion())
        cuda = _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion())
        return GpuProbe(tuple(gpus), driver, cuda, None if gpus else "the NVIDIA driver sees no GPU")
    finally:
        pynvml.nvmlShutdown()


def _probe_cudart() -> GpuProbe:
    cudart = runtime_api()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return GpuProbe((), None, None, f"no usable CUDA driver ({error_name(err)})")
    gpus = []
    for i in range(count):
        err, props = cudart.cudaGetDeviceProperties(i)
        if err == cudart.cudaError_t.cudaSuccess:
            name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else props.name
            gpus.append(Gpu(i, name, f"{props.major}.{props.minor}", int(props.totalGlobalMem)))
    _, v = cudart.cudaDriverGetVersion()
    return GpuProbe(tuple(gpus), None, _cuda_version(v) if v else None, None if gpus else "CUDA sees no GPU")


def probe() -> GpuProbe:
    """The machine's NVIDIA GPUs, through NVML (nvidia-ml-py) or else the CUDA runtime (cuda-bindings)."""
    if installed("pynvml"):
        return _probe_nvml()
    if installed("cuda.bindings"):
        return _probe_cudart()
    return GpuProbe((), None, None, "neither nvidia-ml-py nor cuda-bindings is installed to look for a GPU "
                                    "(pip install 'sdrt[cuda]' or 'sdrt[tensorrt]')")


# -- the CUDA runtime through cuda-bindings ------------------------------------------------------------------

def runtime_api():
    """cuda.bindings.runtime (cuda-bindings 12.x/13.x; the old `from cuda import cudart` is gone in 13.0)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise UserError("the tensorrt backend needs cuda-bindings: pip install 'sdrt[tensorrt]'") from None
    return runtime


def error_name(err) -> str:
    cudart = runtime_api()
    try:
        _, name = cudart.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def call(what: str, result):
    """Unpack a cuda-bindings result tuple (err, *values), raising GpuError on an error."""
    cudart = runtime_api()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise GpuError(f"CUDA {what} failed: {error_name(err)}")
    return values[0] if len(values) == 1 else tuple(values) or None


def handle(obj) -> int:
    """The integer value of a CUDA handle (a stream, a device pointer) as TensorRT's Python API takes it."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle

        return int(get_cuda_native_handle(obj))
    except (ImportError, TypeError):
        return int(obj)


class DeviceBuffer:
    """One cudaMalloc allocation; grows (reallocates) only when asked for more than it holds."""

    def __init__(self, nbytes: int = 0):
        self.ptr, self.nbytes = 0, 0
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> bool:
        """Hold at least `nbytes`; True if the address changed."""
        if nbytes <= self.nbytes:
            return False
        self.free()
        self.ptr = int(call("cudaMalloc", runtime_api().cudaMalloc(max(nbytes, 256))))
        self.nbytes = nbytes
        return True

    def free(self) -> None:
        if self.ptr:
            runtime_api().cudaFree(self.ptr)
            self.ptr, self.nbytes = 0, 0

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown: the driver frees it anyway
            pass


class Stream:
    """One CUDA stream: copies and engine launches are queued on it in order."""

    def __init__(self):
        cudart = runtime_api()
        self._cudart = cudart
        self.stream = call("cudaStreamCreate", cudart.cudaStreamCreate())
        self.handle = handle(self.stream)
        self._keep: list[np.ndarray] = []  # host arrays of queued uploads, alive until the next sync

    def upload(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        call("cudaMemcpyAsync (host to device)", self._cudart.cudaMemcpyAsync(
            ptr, a.ctypes.data, a.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self._keep.append(a)

    def download(self, array: np.ndarray, ptr: int) -> None:
        call("cudaMemcpyAsync (device to host)", self._cudart.cudaMemcpyAsync(
            array.ctypes.data, ptr, array.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def sync(self) -> None:
        call("cudaStreamSynchronize", self._cudart.cudaStreamSynchronize(self.stream))
        self._keep.clear()

    def capture(self, launch) -> object | None:
        """Record `launch()` into a CUDA graph and instantiate it; None when the work cannot be captured
        (TensorRT may refuse: some engines hold operations a graph cannot), after clearing the error."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        call("cudaStreamBeginCapture", cudart.cudaStreamBeginCapture(self.stream, mode))
        ok = False
        try:
            ok = bool(launch())
        finally:
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess or graph is None:
            cudart.cudaGetLastError()  # clear the capture's sticky-free error state
            return None
        err, instance = cudart.cudaGraphInstantiate(graph, 0)
        cudart.cudaGraphDestroy(graph)
        if err != cudart.cudaError_t.cudaSuccess:
            cudart.cudaGetLastError()
            return None
        return instance

    def replay(self, graph) -> None:
        call("cudaGraphLaunch", self._cudart.cudaGraphLaunch(graph, self.stream))


def device_memory() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    return call("cudaMemGetInfo", runtime_api().cudaMemGetInfo())
