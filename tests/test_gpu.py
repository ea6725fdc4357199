"""On an NVIDIA GPU: the CUDA runtime helpers, the cuda backend and the tensorrt backend against the CPU.

Every test carries the `gpu` marker (deselected by default: `python -m pytest -m gpu` runs them) and skips, with
the reason, where this machine lacks what it needs. Results from a lent GPU are in benchmarks/results/.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime import backend, gpu
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.gpu

# A GPU backend's image against the CPU backend's fp32 image, same seed, pixels in [0, 1] (fp16 engines; as
# tests/test_fp16.py's FP16_IMAGE_ATOL for the fp16 graphs on the CPU).
GPU_IMAGE_ATOL = 2e-2
# One UNet call, GPU fp16 engine against CPU fp32 graph: atol + rtol * max|cpu output|, the export's fp16 tolerance.
UNET_ATOL, UNET_RTOL = 1e-3, 1e-2


def _missing(kind: str) -> str:
    return backend.unavailable(kind) or ""


@pytest.fixture(scope="module")
def tiny_fp16_engine(tiny_checkpoint, tmp_path_factory):
    from sdrt.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("gpu") / "engine"
    export(ExportOptions(checkpoint=str(tiny_checkpoint), out=out, precisions=("fp32", "fp16")), log=lambda s: None)
    return out


def test_device_buffers_stream_and_graph():
    if not gpu.installed("cuda.bindings") or gpu.probe().gpu is None:
        pytest.skip("needs cuda-bindings and an NVIDIA GPU")
    cudart = gpu.runtime_api()
    stream = gpu.Stream()
    x = np.random.default_rng(0).standard_normal((2, 4, 64, 64), dtype=np.float32)
    a, b = gpu.DeviceBuffer(x.nbytes), gpu.DeviceBuffer(x.nbytes)
    assert a.ensure(16) is False and a.ensure(x.nbytes * 2) is True  # grows only when asked for more
    stream.upload(a.ptr, x)

    def copy() -> bool:
        gpu.call("cudaMemcpyAsync", cudart.cudaMemcpyAsync(
            b.ptr, a.ptr, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.stream))
        return True

    graph = stream.capture(copy)
    assert graph is not None
    stream.replay(graph)
    out = np.empty_like(x)
    stream.download(out, b.ptr)
    stream.sync()
    np.testing.assert_array_equal(out, x)
    free, total = gpu.device_memory()
    assert 0 < free <= total


@pytest.mark.skipif(bool(_missing("cuda")), reason=_missing("cuda") or "-")
def test_cuda_backend_matches_cpu(tiny_fp16_engine):
    m = Manifest.load(tiny_fp16_engine)
    cuda = Pipeline.load(tiny_fp16_engine, backend="cuda")
    cpu = Pipeline.load(tiny_fp16_engine, backend="cpu")
    assert cuda.backend.name == "ort-cuda"
    feeds = {"sample": np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([999.0, 999.0], np.float32),
             "encoder_hidden_states": np.random.default_rng(2).standard_normal(
                 (2, m.conditioning.context_length, m.conditioning.context_dim), dtype=np.float32)}
    (g,), (c,) = cuda.backend.run("unet", feeds), cpu.backend.run("unet", feeds)
    assert float(np.abs(g - c).max()) <= UNET_ATOL + UNET_RTOL * float(np.abs(c).max())
    kwargs = dict(steps=6, seed=5, output_type="np")
    err = float(np.abs(cuda("a red circle", **kwargs) - cpu("a red circle", **kwargs)).max())
    assert err <= GPU_IMAGE_ATOL


@pytest.mark.skipif(bool(_missing("tensorrt")), reason=_missing("tensorrt") or "-")
def test_tensorrt_build_and_run(tiny_fp16_engine, tmp_path):
    import shutil

    from sdrt.runtime.engines import BuildShapes
    from sdrt.runtime.errors import UserError
    from sdrt.runtime.tensorrt_build import TrtBuilder, build_engines

    engine = tmp_path / "engine"
    shutil.copytree(tiny_fp16_engine, engine)
    m = build_engines(engine, TrtBuilder(), BuildShapes.from_flags(Manifest.load(engine), static="64x64"))
    assert all(c.engines() for c in m.components.values())
    trt = Pipeline.load(engine, backend="tensorrt")
    cpu = Pipeline.load(engine, backend="cpu")
    kwargs = dict(steps=6, seed=5, output_type="np")
    first = trt("a red circle", **kwargs)  # the first calls launch, later ones replay CUDA graphs
    again = trt("a red circle", **kwargs)
    np.testing.assert_array_equal(first, again)
    assert float(np.abs(first - cpu("a red circle", **kwargs)).max()) <= GPU_IMAGE_ATOL
    with pytest.raises(UserError, match=r"unet\.sample: shape \[2, 4, 12, 12\] is outside the TensorRT profile"):
        trt("a red circle", height=96, width=96, steps=1)


@pytest.mark.skipif(bool(_missing("cuda")), reason=_missing("cuda") or "-")
def test_cuda_attention_kernels_at_sd15_size():
    """One fp16 ONNX `Attention` node at SD 1.5's largest self-attention (8 heads of 40, 4096 tokens) on the CUDA
    provider with the backend's kernel choice, against numpy fp32. onnxruntime-gpu 1.31.1's flash kernel missed a
    full UNet's output by 6% on an H200 (benchmarks/results/gpu_h200.md); the kernels the backend picks must not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sdrt.runtime.backend_cuda import PROVIDER, SDPA_KERNELS

    shape = [1, 8, 4096, 40]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, shape) for n in ("Q", "K", "V", "Y")]
    graph = helper.make_graph([helper.make_node("Attention", ["Q", "K", "V"], ["Y"])], "attention", io[:3], io[3:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=[(PROVIDER, {"sdpa_kernel": SDPA_KERNELS})])
    q, k, v = (np.random.default_rng(i).standard_normal(shape, dtype=np.float32) for i in range(3))
    (y,) = session.run(None, {"Q": q.astype(np.float16), "K": k.astype(np.float16), "V": v.astype(np.float16)})
    scores = q[0] @ k[0].transpose(0, 2, 1) / np.sqrt(40.0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v[0]
    assert float(np.abs(y[0].astype(np.float32) - ref).max()) <= 1e-2 * float(np.abs(ref).max())
