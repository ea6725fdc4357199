"""The `cuda` backend: onnxruntime-gpu's CUDA execution provider on the fp16 graphs, with IO binding.

Inputs are copied to the GPU once per call and the outputs are bound on the GPU, then copied back once: the
numpy scheduler loop around the UNet moves only the latents (a few hundred KiB a step). An input array that the
caller marked read-only and passes again as the same object (the prompt conditioning, every step) stays on the
GPU from the previous call instead of being copied again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import OrtBackend, checked
from .errors import UserError
from .manifest import Component, Manifest

PROVIDER = "CUDAExecutionProvider"
# Which attention kernels the CUDA provider may pick for the ONNX `Attention` op (its `sdpa_kernel` bitmask:
# 1 flash, 2 memory-efficient, 8 cuDNN SDPA, 16 math). Measured on an H200 with onnxruntime-gpu 1.31.1 and a
# full-size SD 1.5 UNet fp16 graph (benchmarks/results/gpu_h200.md): the default (flash) misses torch fp32 by
# 0.112 (6% of the output's peak) where torch fp16 misses by 0.0028; memory-efficient + cuDNN (10) misses by
# 0.0030 and runs the UNet step in 20.5 ms against flash's 19.2 ms.
SDPA_KERNELS = "10"


def cuda_provider_problem() -> str | None:
    """None if the installed ONNX Runtime has the CUDA provider, else the line saying what to install."""
    from .manifest import package_versions

    try:
        import onnxruntime as ort
    except ImportError:
        return "the cuda backend needs onnxruntime-gpu: pip install 'sdrt[cuda]'"
    providers = ort.get_available_providers()
    if PROVIDER in providers:
        return None
    dists = package_versions(("onnxruntime", "onnxruntime-gpu"))
    if dists["onnxruntime-gpu"] and dists["onnxruntime"]:  # one module, two distributions: the CPU files won
        return (f"onnxruntime-gpu {dists['onnxruntime-gpu']} is installed but the CPU build onnxruntime "
                f"{dists['onnxruntime']} shadows it (one Python module): pip uninstall -y onnxruntime onnxruntime-gpu "
                "&& pip install 'onnxruntime-gpu[cuda,cudnn]>=1.31'")
    return (f"the cuda backend needs onnxruntime-gpu, but the installed onnxruntime {ort.__version__} has only "
            f"{', '.join(providers)}: pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]>=1.31'")


class ReusedInputs:
    """Device copies of read-only inputs, kept while the caller passes the very same array again."""

    def __init__(self):
        self._kept: dict[tuple[str, str], tuple[np.ndarray, object]] = {}

    def get(self, component: str, name: str, array: np.ndarray, upload):
        key = (component, name)
        kept = self._kept.get(key)
        if kept is not None and kept[0] is array and not array.flags.writeable:
            return kept[1]
        value = upload(array)
        if array.flags.writeable:
            self._kept.pop(key, None)
        else:
            self._kept[key] = (array, value)
        return value


class OrtCudaBackend(OrtBackend):
    """One ONNX Runtime session per component on the CUDA provider (fp16 graphs where the dir has them)."""

    name = "ort-cuda"
    provider = PROVIDER

    def __init__(self, engine_dir: Path, manifest: Manifest, device: int = 0):
        import onnxruntime as ort

        problem = cuda_provider_problem()
        if problem:
            raise UserError(problem)
        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, where they came that way
            ort.preload_dlls()
        self.device = device
        self.reused = ReusedInputs()
        super().__init__(engine_dir, manifest)

    def _session(self, name: str, component: Component):
        artifact = component.graph("fp16", "fp32")
        model = self.engine_dir / artifact.file
        if not model.is_file():
            raise UserError(f"{name}: {artifact.file} is missing from {self.engine_dir}")
        opts = self._ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cuda = {"device_id": self.device, "arena_extend_strategy": "kSameAsRequested", "sdpa_kernel": SDPA_KERNELS}
        session = self._ort.InferenceSession(str(model), opts, providers=[(PROVIDER, cuda), "CPUExecutionProvider"])
        if session.get_providers()[0] != PROVIDER:
            raise UserError(f"{name}: ONNX Runtime could not start its CUDA provider (providers: "
                            f"{', '.join(session.get_providers())}); check the CUDA and cuDNN libraries with "
                            "`sdrt doctor`")
        return session

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        component = checked(self.manifest, name, feeds)
        session = self.session(name, component)
        binding = session.io_binding()

        def upload(array):
            return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device)

        for t in component.inputs:
            binding.bind_ortvalue_input(t.name, self.reused.get(name, t.name, feeds[t.name], upload))
        for t in component.outputs:
            binding.bind_output(t.name, "cuda", self.device)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
