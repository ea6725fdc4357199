"""Ray Serve adapter (`sdrt serve --ray`, the `sdrt[ray]` extra): app.py's FastAPI app, one copy per replica.

Each replica owns a Pipeline and a queue worker, so batching and the per-replica queue stay jobs.py's; Ray adds
the replicas, its HTTP proxy, routing (power of two choices on in-flight requests), per-caller backpressure
(`max_queued_requests` -> 503) and autoscaling. A Ray Serve YAML config names `build_app` (docs/serving-ray.md).

A replica loads its engine in its constructor, not in the app's lifespan as under uvicorn: Ray routes to a
replica once the constructor and the lifespan startup have returned, so a replica still loading (one added by
autoscaling included) gets no requests rather than answering 503 to its share of them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

from ..errors import UserError

try:
    import ray
    from ray import serve
except ImportError as e:
    raise UserError(f"sdrt serve --ray needs Ray Serve ({e.name or e} is missing): pip install 'sdrt[ray]'") from None

from ..pipeline import Pipeline
from .app import create_app
from .config import ServeConfig, serve_config
from .server import configure_logging

log = logging.getLogger("sdrt.serve")

APP_NAME = "sdrt"
REPLICA_HEADER = b"x-sdrt-replica"
PROBE_TIMEOUT = 5.0  # seconds to reach a cluster's address before saying it cannot be reached
RAY_ARGS = ("replicas", "max_replicas", "max_ongoing", "max_queued", "num_cpus", "num_gpus", "log_level")
TEXT_ARGS = ("engine_dir", "backend", "api_key", "log_level", "cpu_precision")


class ReplicaHeader:
    """X-Sdrt-Replica on every response: which replica answered, for logs, load checks and tests. The app's
    X-Request-ID goes: Ray's proxy adds its own, the same id (the app takes it from the request the proxy tagged)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*(h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"),
                                      (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


@serve.deployment(name="sdrt")
@serve.ingress()
class Replica:
    """One replica: loads the engine dir, then serves create_app's app on it (Ray calls the two in this order)."""

    async def __init__(self, config: ServeConfig, log_level: str = "info"):
        configure_logging(log_level)
        self.config = config
        self.state = None  # the app's ServerState, once built
        start = time.perf_counter()
        # A failure here fails the replica: Ray retries it, then reports the deployment failed (serve.run raises).
        self.pipeline = await asyncio.to_thread(Pipeline.load, config.engine_dir, config.backend, config.build,
                                                self._observe, config.cpu_precision)
        self.load_seconds = time.perf_counter() - start
        log.info("replica loaded %s on %s in %.1f s", config.engine_dir, self.pipeline.backend.name,
                 self.load_seconds)

    def _observe(self, component: str, seconds: float) -> None:
        if self.state is not None:
            self.state.metrics.observe_engine(component, seconds)

    def __serve_build_asgi_app__(self):
        app = create_app(self.config, pipeline=self.pipeline)  # its lifespan starts the queue worker
        self.state = app.state.sdrt
        self.state.metrics.load_seconds.set(self.load_seconds)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def check_health(self) -> None:
        """Ray's periodic health check, as /ready: a replica whose queue stopped taking work is replaced."""
        if not self.state.ready and not self.state.draining:
            raise RuntimeError(self.state.load_error or "the job queue does not accept work")


def sdrt_app(config: ServeConfig, *, replicas: int = 1, max_replicas: int | None = None,
             max_ongoing: int | None = None, max_queued: int = -1, num_cpus: float = 1.0, num_gpus: float = 0.0,
             log_level: str = "info"):
    """The Serve application: `replicas` replicas, or autoscaling from `replicas` (0: to zero) to `max_replicas`."""
    if replicas < (0 if max_replicas else 1):
        raise UserError(f"--replicas must be at least 1 (0 only with --max-replicas), got {replicas}")
    if max_replicas is not None and max_replicas < max(replicas, 1):
        raise UserError(f"--max-replicas must be at least 1 and --replicas ({replicas}), got {max_replicas}")
    for flag, value, low in (("--max-ongoing", max_ongoing, 1), ("--max-queued", max_queued, -1),
                             ("--replica-cpus", num_cpus, 0), ("--replica-gpus", num_gpus, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if max_replicas is None:
        scaling = {"num_replicas": replicas}
    else:  # aim for one batch's worth of requests per replica: fewer leaves batching idle, more waits in line
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                          "target_ongoing_requests": config.max_batch}}
    return Replica.options(
        # About what the replica's own queue holds: waiting work sits where the batcher can group it.
        max_ongoing_requests=max_ongoing or config.queue_size + config.max_batch,
        max_queued_requests=max_queued,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        graceful_shutdown_timeout_s=config.timeout,  # as under uvicorn: running requests may finish
        **scaling,
    ).bind(config, log_level)


def build_app(args: dict):
    """Ray Serve's application builder (YAML `import_path: sdrt.runtime.serve.ray:build_app`). `args`: engine_dir,
    `sdrt serve`'s settings under their flag names in snake case (backend, queue_size, max_batch, batch_wait,
    timeout, api_key (else $SDRT_API_KEY), max_body_mb, max_images, max_steps, build, ui, allowed_origins,
    allowed_hosts), and the Ray ones: RAY_ARGS.
    Ray may build the app on any node, so the engine dir is checked by the replicas, on the nodes they run on."""
    args = dict(args)
    known = set(inspect.signature(serve_config).parameters) - {"check_engine"} | set(RAY_ARGS)
    if unknown := sorted(set(args) - known):
        raise UserError(f"unknown build_app args: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "engine_dir" not in args:
        raise UserError("build_app needs args.engine_dir")
    # `serve run ...:build_app replicas=2` passes strings; a YAML config passes typed values.
    args = {k: v if k in TEXT_ARGS or not isinstance(v, str) else _value(v) for k, v in args.items()}
    ray_args = {k: args.pop(k) for k in RAY_ARGS if k in args}
    args.setdefault("api_key", os.environ.get("SDRT_API_KEY") or None)
    # The replicas check the engine dir where they run: Ray may build the app on a node without it (a GPU-less head).
    return sdrt_app(serve_config(Path(args.pop("engine_dir")), check_engine=False, **args), **ray_args)


def _value(text: str):
    try:
        return json.loads(text)  # "2" -> 2, "0.5" -> 0.5, "true" -> True, "null" -> None
    except ValueError:
        return text


def run_ray(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860, replicas: int = 1,
            address: str | None = None, max_ongoing: int | None = None, log_level: str = "info", *,
            max_replicas: int | None = None, max_queued: int = -1, num_cpus: float = 1.0,
            num_gpus: float = 0.0) -> int:
    """Serve on Ray until SIGTERM/SIGINT, then take the app down and leave the cluster; returns the exit code.

    Without `address` a local cluster starts and stops with this process; with one (`auto`, `ray://...`) only
    this app is deleted at the end, so other apps on that cluster keep running."""
    configure_logging(log_level)
    app = sdrt_app(config, replicas=replicas, max_replicas=max_replicas, max_ongoing=max_ongoing,
                   max_queued=max_queued, num_cpus=num_cpus, num_gpus=num_gpus, log_level=log_level)
    local = address is None
    if not local:
        _probe(address)
    # Ray's CPUs are scheduling tokens, not cores (each replica's engine uses every core anyway): a local
    # cluster gets enough for the replicas asked for, so on a 2-core box two replicas start rather than wait.
    tokens = max(os.cpu_count() or 1, math.ceil(num_cpus * max(replicas, max_replicas or 0)))
    try:
        ray.init(address="local" if local else address, num_cpus=tokens if local else None,
                 logging_level=log_level.upper())
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray cluster at {address or 'local'}: {_line(str(e))}") from None
    stop, serving = threading.Event(), False

    def on_signal(signum, frame) -> None:
        first = not stop.is_set()
        stop.set()
        if first and not serving:  # still deploying: interrupt serve.run, then clean up as below
            raise KeyboardInterrupt

    # After ray.init: its driver replaces Python's SIGTERM handling with one that aborts.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as e:  # noqa: BLE001 - a failed deploy or proxy: one line, the detail is in Ray's log
            raise UserError(f"Ray Serve could not start sdrt on {host}:{port}: {_cause(e)}") from None
        serving = True
        log.info("serving %s on http://%s:%d with Ray Serve (%s replicas)", config.engine_dir, host, port,
                 f"{replicas}..{max_replicas}" if max_replicas else replicas)
        while not stop.wait(1.0):
            pass
        log.info("stopping: draining the replicas")
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _probe(address: str) -> None:
    """Fail fast on a cluster address nothing listens on: Ray itself retries such a one for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray answers at once
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _cause(error: Exception) -> str:
    """Why a start failed: a replica's own error (the last line of Ray's deployment message, which carries the
    replica's traceback), else Ray's."""
    try:
        messages = [d.message for a in serve.status().applications.values() for d in a.deployments.values()
                    if d.message]
    except Exception:  # noqa: BLE001 - the status is only a better message
        messages = []
    return _line(messages[-1] if messages else str(error))


def _line(text: str) -> str:
    """The last line of an error text, without its exception class ("pkg.Error: message" -> "message")."""
    lines = [s.strip() for s in text.splitlines() if s.strip()] or ["unknown error"]
    name, sep, message = lines[-1].partition(": ")
    return (message if sep and " " not in name else lines[-1])[:300]
