"""`sdrt warmup`: build a CPU backend's load caches ahead of the first request, and time the cold start.

The first load of an engine dir on a CPU backend does work a later load skips: ONNX Runtime optimizes each graph
(and chunks its large attentions) and writes `*.ort-*.onnx` beside it; OpenVINO converts each graph into an
IR with fp16 weights (bf16) or compiles it into a blob (f32), in `openvino-cache/`. A service that runs
`sdrt warmup` at deploy time (or in its image build) makes the fast load the common case. For each backend this
loads the engine dir once (building whatever cache is missing), draws one image, then loads it again from the
caches and draws again: the report is the time from `Pipeline.load` to the first image with and without the
caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .backend import CPU_BACKENDS, resolve
from .errors import UserError
from .manifest import Manifest
from .pipeline import Pipeline

PROMPT = "warmup"


def first_image(engine_dir: Path, backend: str, cpu_precision: str, steps: int) -> dict:
    """Seconds to load the engine dir and to draw its first image (native size, `steps` steps)."""
    start = time.perf_counter()
    pipe = Pipeline.load(engine_dir, backend, cpu_precision=cpu_precision)
    loaded = time.perf_counter()
    pipe(PROMPT, steps=steps, seed=0, output_type="np")
    done = time.perf_counter()
    return {"backend": pipe.backend.name, "load_s": round(loaded - start, 2),
            "first_image_s": round(done - loaded, 2), "total_s": round(done - start, 2)}


def warmup(engine_dir: Path, backends: tuple[str, ...] = ("auto",), cpu_precision: str = "auto", steps: int = 1,
           log: Callable[[str], None] = print) -> list[dict]:
    """Build the load caches of each CPU backend in `backends` and report cold and cached load-to-first-image."""
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    kinds = [resolve(b, engine_dir, manifest) for b in backends]
    if other := [k for k in kinds if k not in CPU_BACKENDS]:
        raise UserError(f"sdrt warmup builds the CPU backends' caches ({', '.join(CPU_BACKENDS)}); {other[0]} keeps "
                        "its own: TensorRT engines are built by `sdrt build`")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    out = []
    for kind in dict.fromkeys(kinds):
        log(f"{kind}: loading {engine_dir} and drawing one image (builds the caches that are missing) ...")
        cold = first_image(engine_dir, kind, cpu_precision, steps)
        log(f"{cold['backend']}: first load {cold['load_s']} s, first image {cold['first_image_s']} s; "
            "loading again from the caches ...")
        warm = first_image(engine_dir, kind, cpu_precision, steps)
        log(f"{warm['backend']}: cached load {warm['load_s']} s, first image {warm['first_image_s']} s")
        out.append({"backend": cold["backend"], "first_load": cold, "cached_load": warm})
    return out
