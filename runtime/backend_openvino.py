"""The `openvino` backend: OpenVINO's CPU plugin on the engine dir's own ONNX graphs, in bf16 where the CPU has it.

OpenVINO reads the exported opset-23 graphs (`Attention`, `GroupNormalization`, dynamic axes) as they are; no
second export. Measured on a 2-core Zen 4 with avx512_bf16 (benchmarks/results/cpu_openvino.md): the SD 1.5 UNet
at 512x512, batch 2 runs in 5.3 s at bf16 against 9.7 s in ONNX Runtime and 12.5 s in torch fp32.

- **Precision** (`cpu_precision`): "bf16" computes matrix products and convolutions in bfloat16 (8-bit mantissa)
  with fp32 accumulation; "f32" is exact fp32; "auto" takes bf16 where the CPU has native bf16 (avx512_bf16 or
  AMX: OpenVINO reports "BF16" among its CPU capabilities) and f32 elsewhere, where bf16 would be emulated and
  slower than f32. The quality bf16 costs is measured in benchmarks/results/cpu_bf16_quality.json.
- **Cache**, in `<engine dir>/openvino-cache/` (`sdrt warmup` builds it ahead of time; a read-only engine dir
  compiles from the ONNX graphs every time):
  - bf16: each graph converted once into OpenVINO's IR with fp16 weights (`ir-f16-<version>/<component>.xml`,
    half the size of the fp32 weights). OpenVINO maps an IR's weights rather than reading them and releases
    them once compiled, so the process holds only the bf16 weights it computes with: SD 1.5 at 512x512 peaked
    at 4.5 GiB where compiling the ONNX graph (or importing a compiled blob, which stores fp32 weights) peaked
    at 7.3 GiB, at the same speed. A compiled blob is not kept: loading the IR takes 1.5 s against 1.0 s. The
    weights are rounded to fp16 on the way (10-bit mantissa), then to bf16 (7-bit) by the CPU plugin anyway.
  - f32: OpenVINO's compiled-model cache (CACHE_DIR) in `f32/`, so a second load imports a blob instead of
    compiling. One folder per precision: OpenVINO 2026.4's cache key for a graph compiled from its file leaves
    the precision hint out, and a bf16 load once imported an f32 blob and returned NaN (tests/test_openvino.py).
- **Threads**: one stream using every core (a latency service: one generation at a time uses the whole CPU;
  several streams would split the cores between concurrent requests the server does not make).
- **Static shapes** (`static`): a service that always draws one size can fix the UNet to it, which lets
  OpenVINO plan memory and pick kernels ahead of time; other sizes are then refused. The VAE stays dynamic (tiled
  decoding calls it with tiles).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import checked
from .errors import UserError
from .manifest import UNET, VAE_ENCODER, Component, Manifest

PRECISIONS = ("auto", "f32", "bf16")
CACHE_DIR = "openvino-cache"
DEVICE = "CPU"
# Components kept in f32 whatever the precision: none. bf16 was measured on every component (the demo model's
# judge and PSNR against f32 per scheduler, benchmarks/results/cpu_bf16_quality.json) before this was decided.
F32_ONLY: frozenset[str] = frozenset()
# What a static size fixes: the UNet, where the time is (rows per image under guidance). The VAE stays dynamic:
# tiled decoding calls it with tiles smaller than the image.
STATIC_ROWS = {UNET: 2}


def openvino_problem() -> str | None:
    """None if OpenVINO is importable, else the line saying what to install."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "the openvino backend needs OpenVINO: pip install 'sdrt[openvino]'"
    return None


def native_bf16(core=None) -> bool:
    """Whether this CPU computes bf16 natively (OpenVINO's capability list says BF16)."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    return "BF16" in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


def resolve_precision(precision: str, core=None) -> str:
    """"f32" or "bf16" for `precision` ("auto", "f32", "bf16") on this CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown CPU precision '{precision}' (choose from: {', '.join(PRECISIONS)})")
    if precision == "f32":
        return "f32"
    has = native_bf16(core)
    if precision == "bf16" and not has:
        raise UserError("--cpu-precision bf16: this CPU has no native bf16 (avx512_bf16 or AMX); use f32 or auto")
    return "bf16" if has else "f32"


@dataclass(frozen=True)
class StaticShape:
    """Fix every size-dependent input to one image size and batch (images per call)."""

    height: int
    width: int
    batch: int = 1

    def shape(self, manifest: Manifest, component_name: str, component: Component, tensor) -> list[int]:
        f = manifest.vae_scale_factor
        sizes = {"batch": self.batch * STATIC_ROWS[component_name],
                 "latent_height": self.height // f, "latent_width": self.width // f,
                 "image_height": self.height, "image_width": self.width}
        return [d if isinstance(d, int) else sizes[d] for d in tensor.shape]


class OpenVinoBackend:
    """One compiled model and one infer request per component, on OpenVINO's CPU plugin."""

    def __init__(self, engine_dir: Path, manifest: Manifest, precision: str = "auto", threads: int = 0,
                 static: StaticShape | None = None, lazy: tuple[str, ...] = (VAE_ENCODER,)):
        import openvino as ov

        self._ov = ov
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.core = ov.Core()
        self.precision = resolve_precision(precision, self.core)
        self.name = f"openvino-{self.precision}"
        self.threads = threads or os.cpu_count() or 1
        self.static = static
        cache = self.engine_dir / CACHE_DIR
        self.cache_dir = cache if os.access(self.engine_dir, os.W_OK) or os.access(cache, os.W_OK) else None
        self._requests: dict[str, object] = {}
        for name in manifest.components:
            if name not in lazy:
                self._request(name)

    def precision_of(self, name: str) -> str:
        return "f32" if name in F32_ONLY else self.precision

    def config(self, name: str) -> dict:
        precision = self.precision_of(name)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_NUM_THREADS": self.threads}
        if self.cache_dir is not None and precision == "f32":
            config["CACHE_DIR"] = str(self.cache_dir / precision)
        return config

    def bf16_graph(self, name: str, model: Path) -> Path:
        """The component as an OpenVINO IR with fp16 weights, written once into the cache (atomically: a private
        folder renamed into place), or the ONNX graph itself where the cache cannot be written."""
        if self.cache_dir is None:
            return model
        folder = self.cache_dir / f"ir-f16-{self._ov.__version__.split('-')[0]}"
        ir = folder / f"{name}.xml"
        if ir.is_file() and ir.stat().st_mtime >= model.stat().st_mtime:
            return ir
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
        try:
            self._ov.save_model(self.core.read_model(str(model)), str(staging / ir.name), compress_to_fp16=True)
            os.replace(staging / ir.with_suffix(".bin").name, ir.with_suffix(".bin"))
            os.replace(staging / ir.name, ir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ir

    def _request(self, name: str):
        request = self._requests.get(name)
        if request is not None:
            return request
        component = self.manifest.components[name]
        artifact = component.graph("fp32", "fp16")
        model = self.engine_dir / artifact.file
        if not model.is_file():
            raise UserError(f"{name}: {artifact.file} is missing from {self.engine_dir}")
        # A blob cut short (a load killed while writing it) is OpenVINO's to handle: it compiles anew and
        # rewrites the blob (tests/test_openvino.py).
        compiled = self._compile(name, component, model, self.config(name))
        request = self._requests[name] = compiled.create_infer_request()
        return request

    def _compile(self, name: str, component: Component, model: Path, config: dict):
        if self.precision_of(name) == "bf16":
            model = self.bf16_graph(name, model)
        if self.static is not None and name in STATIC_ROWS:
            graph = self.core.read_model(str(model))
            graph.reshape({t.name: self.static.shape(self.manifest, name, component, t) for t in component.inputs})
            return self.core.compile_model(graph, DEVICE, config)
        # From the file: OpenVINO maps an IR's weights instead of reading them, and drops the mapping once the
        # compiled model has its own packed copy; with a warm f32 cache it imports the blob instead.
        return self.core.compile_model(str(model), DEVICE, config)

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        component = checked(self.manifest, name, feeds)
        request = self._request(name)
        try:
            # Inputs are shared (no copy; the call is synchronous); outputs are copied out of the request.
            results = request.infer(feeds, share_inputs=True, share_outputs=False)
        except RuntimeError as e:  # a static shape refusing another size
            raise UserError(f"{name}: OpenVINO refused the call: {str(e).splitlines()[0]}") from None
        by_name = {next(iter(k.get_names())): v for k, v in results.items()}
        return [np.asarray(by_name[t.name]) for t in component.outputs]
