"""The server's load-time settings, checked before anything starts: each bad flag is one line naming it."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .guard import host_name, normal_origin

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")
# --max-batch left out. On the CPU, batching bought no throughput for SD 1.5 at 512x512 on 2 cores and took 2.4x
# the memory at 4 images (benchmarks/results/serve_sd15_512_cpu.json); on a GPU, a UNet call on one image leaves
# the device underused and gains flatten near 4 images at 512x512 (serving_anchors.md §4).
CPU_MAX_BATCH, GPU_MAX_BATCH = 1, 4


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_images: int = 8
    max_steps: int = 150
    max_image_pixels: int = 4096 * 4096  # an init image larger than this is refused before it is decoded


@dataclass(frozen=True)
class ServeConfig:
    """Load-time settings of one server (`sdrt serve`'s flags)."""

    engine_dir: Path
    backend: str = "auto"
    queue_size: int = 16
    max_batch: int = 1  # serve_config picks by backend: CPU_MAX_BATCH or GPU_MAX_BATCH
    batch_wait: float = 0.02  # seconds the worker waits for compatible requests to fill a batch
    timeout: float = 600.0  # per request, queue wait included
    api_key: str | None = None
    max_body: int = 50 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    build: bool = False  # let the tensorrt backend build missing engines at load
    ui: bool = True  # the playground page at /
    allowed_origins: tuple[str, ...] = ()  # browser origins besides this server's own that may POST (guard.py)
    allowed_hosts: tuple[str, ...] = ()  # Host names besides loopback ones that a local_only server answers
    local_only: bool = False  # answer only requests addressed to a loopback name (server.serve sets it)
    cpu_precision: str = "auto"  # the openvino backend's: auto, f32 or bf16


def missing_modules(names=SERVE_MODULES) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def on_cpu(backend: str) -> bool:
    """Whether `backend` runs on the CPU here: cpu or openvino, or auto on a machine with no visible NVIDIA GPU."""
    if backend != "auto":
        return backend in ("cpu", "openvino")
    from ..gpu import probe

    return probe().gpu is None


def serve_config(engine_dir: Path, *, backend: str = "auto", queue_size: int = 16, max_batch: int | None = None,
                 batch_wait: float = 0.02, timeout: float = 600.0, api_key: str | None = None,
                 max_body_mb: float = 50.0, max_images: int = 8, max_steps: int = 150,
                 build: bool = False, ui: bool = True, allowed_origins=(), allowed_hosts=(),
                 check_engine: bool = True, cpu_precision: str = "auto") -> ServeConfig:
    """A ServeConfig from flag values, refusing bad ones, an engine dir that cannot be served here (unless
    `check_engine` is False: Ray may build the app on a node that serves nothing), and a missing `serve` extra,
    each in one line. `max_batch` None: CPU_MAX_BATCH where the backend runs on the CPU, else GPU_MAX_BATCH."""
    if missing := missing_modules():
        raise UserError(f"sdrt serve needs {', '.join(missing)}: pip install 'sdrt[serve]'")
    if max_batch is None:
        max_batch = CPU_MAX_BATCH if on_cpu(backend) else GPU_MAX_BATCH
    for flag, value, low in (("--queue-size", queue_size, 1), ("--max-batch", max_batch, 1),
                             ("--max-images", max_images, 1), ("--max-steps", max_steps, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--batch-wait", batch_wait), ("--timeout", timeout), ("--max-body-mb", max_body_mb)):
        if not (value >= 0 and math.isfinite(value)) or (flag != "--batch-wait" and value == 0):
            raise UserError(f"{flag} must be {'>= 0' if flag == '--batch-wait' else '> 0'}, got {value}")
    from ..backend_openvino import PRECISIONS

    if cpu_precision not in PRECISIONS:
        raise UserError(f"--cpu-precision must be one of {', '.join(PRECISIONS)}, got {cpu_precision!r}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    allowed_origins = (allowed_origins,) if isinstance(allowed_origins, str) else tuple(allowed_origins or ())
    allowed_hosts = (allowed_hosts,) if isinstance(allowed_hosts, str) else tuple(allowed_hosts or ())
    origins = tuple(normal_origin(o) for o in allowed_origins)
    if None in origins:
        raise UserError(f"--allow-origin takes scheme://host[:port], as a browser's Origin header says it, got "
                        f"{list(allowed_origins)}")
    hosts = tuple(host_name(h) for h in allowed_hosts)
    if None in hosts:
        raise UserError(f"--allow-host takes a host name without a port (e.g. sdrt.example), got "
                        f"{list(allowed_hosts)}")
    if check_engine:
        from ..backend import unavailable
        from ..manifest import Manifest

        manifest = Manifest.load(engine_dir)  # one line if it is not an engine dir
        if backend != "auto" and (problem := unavailable(backend, None if build else engine_dir, manifest)):
            raise UserError(problem)
    return ServeConfig(Path(engine_dir), backend, queue_size, max_batch, batch_wait, timeout, api_key,
                       int(max_body_mb * 1024 * 1024), Limits(max_images, max_steps), build, ui,
                       origins, hosts, cpu_precision=cpu_precision)
