"""The server's load-time settings, checked before anything starts: each bad flag is one line naming it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


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
    max_batch: int = 4
    batch_wait: float = 0.02  # seconds the worker waits for compatible requests to fill a batch
    timeout: float = 600.0  # per request, queue wait included
    api_key: str | None = None
    max_body: int = 50 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    build: bool = False  # let the tensorrt backend build missing engines at load


def missing_modules(names=SERVE_MODULES) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def serve_config(engine_dir: Path, *, backend: str = "auto", queue_size: int = 16, max_batch: int = 4,
                 batch_wait: float = 0.02, timeout: float = 600.0, api_key: str | None = None,
                 max_body_mb: float = 50.0, max_images: int = 8, max_steps: int = 150,
                 build: bool = False, check_engine: bool = True) -> ServeConfig:
    """A ServeConfig from flag values, refusing bad ones, an engine dir that cannot be served here (unless
    `check_engine` is False: Ray may build the app on a node that serves nothing), and a missing `serve` extra,
    each in one line."""
    if missing := missing_modules():
        raise UserError(f"sdrt serve needs {', '.join(missing)}: pip install 'sdrt[serve]'")
    for flag, value, low in (("--queue-size", queue_size, 0), ("--max-batch", max_batch, 1),
                             ("--max-images", max_images, 1), ("--max-steps", max_steps, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--batch-wait", batch_wait), ("--timeout", timeout), ("--max-body-mb", max_body_mb)):
        if not value >= 0 or (flag != "--batch-wait" and value == 0):
            raise UserError(f"{flag} must be {'>= 0' if flag == '--batch-wait' else '> 0'}, got {value}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    if check_engine:
        from ..backend import unavailable
        from ..manifest import Manifest

        manifest = Manifest.load(engine_dir)  # one line if it is not an engine dir
        if backend != "auto" and (problem := unavailable(backend, None if build else engine_dir, manifest)):
            raise UserError(problem)
    return ServeConfig(Path(engine_dir), backend, queue_size, max_batch, batch_wait, timeout, api_key,
                       int(max_body_mb * 1024 * 1024), Limits(max_images, max_steps), build)
