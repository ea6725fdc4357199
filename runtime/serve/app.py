"""The FastAPI app: probes, metrics, auth, body limit, request ids and error shapes, around the two front doors
(a1111.py, generations.py). One app serves one engine dir; `create_app` is what uvicorn and Ray Serve run.

The engine loads in a background thread after startup, so /health answers at once and /ready turns 200 when
the queue accepts work. Handlers never block the event loop: generation runs on the queue's worker thread,
image decoding in the thread pool, and waiting is `await` on the job's future.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..pipeline import Pipeline
from .config import ServeConfig
from .inputs import FieldError
from .jobs import JobQueue, NotAccepting, QueueFull
from .metrics import Metrics

log = logging.getLogger("sdrt.serve")

OPEN_PATHS = ("/health", "/ready")  # probes answer without the API key


class ServerState:
    """What the handlers share: the config, the queue, the metrics and the loaded Pipeline."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.queue = JobQueue(None, metrics, config.queue_size, config.max_batch, config.batch_wait, config.timeout)
        self.pipeline: Pipeline | None = None
        self.load_error: str | None = None
        self.draining = False
        self.options: dict = {}  # A1111 /options values set by clients

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and self.queue.accepting and not self.draining

    def pipe(self) -> Pipeline:
        if self.pipeline is None:
            raise HTTPException(503, self.load_error or "the engine is still loading", headers={"Retry-After": "5"})
        return self.pipeline

    async def wait(self, job, timeout: float):
        """Wait for a job without blocking the loop; past `timeout` the job is cancelled."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout)
        except asyncio.TimeoutError:
            self.queue.cancel(job.id, "timeout")
            return await asyncio.wrap_future(job.future)

    def submit(self, specs, request: Request, timeout: float | None = None):
        try:
            return self.queue.submit(specs, timeout, request.state.request_id)
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None


def _authorized(header: str | None, x_api_key: str | None, key: str) -> bool:
    """Bearer token, X-API-Key, or HTTP Basic with the key as password (A1111 clients' --api-auth)."""
    given = x_api_key
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


class BodyLimit:
    """413 for a body over `limit` bytes: at once from Content-Length, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = _error(413, "PayloadTooLarge", f"request body of {int(length)} bytes is over the "
                              f"{self.limit}-byte limit")
            return await response(scope, receive, send)
        seen, refused = 0, False

        async def limited() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # answer 413 now; the app sees a client that went away
                refused = True
                await _error(413, "PayloadTooLarge", f"request body is over the {self.limit}-byte limit")(
                    scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        return await self.app(scope, limited, guarded_send)


def _error(status: int, kind: str, detail, headers: dict | None = None, **extra) -> JSONResponse:
    """A1111's error shape ({"error", "detail", "body", "errors"}), which its clients print."""
    message = detail if isinstance(detail, str) else str(detail)
    return JSONResponse({"error": kind, "detail": detail, "body": "", "errors": message, **extra},
                        status_code=status, headers=headers)


_KINDS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 408: "Timeout",
          409: "Conflict", 413: "PayloadTooLarge", 422: "ValidationError", 503: "ServiceUnavailable",
          504: "GatewayTimeout"}


def create_app(config: ServeConfig, pipeline: Pipeline | None = None, on_load_error=None) -> FastAPI:
    """The app for one engine dir. Give `pipeline` to serve one already loaded (tests); otherwise it loads
    in the background at startup, and `on_load_error(message)` is called if that fails."""
    from . import a1111, generations

    metrics = Metrics()
    state = ServerState(config, metrics)

    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(state, pipeline, on_load_error))
        yield
        state.draining = True
        metrics.ready.set(0)
        await asyncio.to_thread(state.queue.stop, config.timeout)
        loader.cancel()

    app = FastAPI(title="sdrt", version=_version(), lifespan=lifespan,
                  description="Stable Diffusion from an sdrt engine dir: AUTOMATIC1111's /sdapi/v1 and sdrt's "
                  "jobs API (/v1/generations).")
    app.state.sdrt = state
    app.include_router(a1111.router)
    app.include_router(generations.router)

    @app.middleware("http")
    async def frame(request: Request, call_next):
        """Request id, API key, access log, metrics and X-Process-Time on every request."""
        start = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        path = request.url.path
        if config.api_key and path not in OPEN_PATHS and not _authorized(
                request.headers.get("authorization"), request.headers.get("x-api-key"), config.api_key):
            response = _error(401, "Unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              headers={"WWW-Authenticate": "Bearer"})
        else:
            try:
                response = await call_next(request)
            except Exception:
                log.exception("unhandled error on %s %s", request.method, path, extra={"request_id": request_id})
                response = _error(500, "InternalError", "internal server error; see the server log",
                                  request_id=request_id)
        elapsed = time.perf_counter() - start
        response.headers["X-Request-ID"] = request_id
        response.headers["X-Process-Time"] = f"{elapsed:.4f}"
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        log.info("%s %s %d %.1f ms", request.method, path, response.status_code, elapsed * 1000,
                 extra={"request_id": request_id})
        return response

    app.add_middleware(BodyLimit, limit=config.max_body)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx", {})
            return _error(400, "MalformedJSON", f"malformed JSON body: {ctx.get('error', 'cannot parse')}")
        fields = ["/".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors))
        return JSONResponse({"error": "ValidationError", "detail": _jsonable(errors), "body": "",
                             "errors": message, "message": message}, status_code=422)

    @app.exception_handler(FieldError)
    async def bad_field(request: Request, exc: FieldError):
        detail = [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
        return JSONResponse({"error": "ValidationError", "detail": detail, "body": "", "errors": str(exc),
                             "message": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's (404, 405)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, _KINDS.get(exc.status_code, "Error"), exc.detail,
                      headers=getattr(exc, "headers", None))

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: 200 once the engine is loaded and work is accepted")
    async def ready():
        if state.ready:
            return {"status": "ready", "engine": str(config.engine_dir), "backend": state.pipeline.backend.name}
        reason = ("draining" if state.draining else state.load_error and f"engine failed to load: {state.load_error}"
                  or "loading the engine")
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


async def _load(state: ServerState, pipeline: Pipeline | None, on_load_error) -> None:
    config, metrics = state.config, state.metrics
    if pipeline is None:
        start = time.perf_counter()
        try:
            pipeline = await asyncio.to_thread(Pipeline.load, config.engine_dir, config.backend, config.build,
                                               metrics.observe_engine)
        except Exception as e:  # noqa: BLE001 - reported on /ready and by the CLI
            state.load_error = str(e) if str(e) else type(e).__name__
            log.error("engine failed to load: %s", state.load_error)
            if on_load_error:
                on_load_error(state.load_error)
            return
        metrics.load_seconds.set(time.perf_counter() - start)
        log.info("engine %s loaded on %s in %.1f s", config.engine_dir, pipeline.backend.name,
                 time.perf_counter() - start)
    state.pipeline = pipeline
    state.queue.start(pipeline)
    metrics.ready.set(1)


def _jsonable(errors: list[dict]) -> list[dict]:
    return json.loads(json.dumps(errors, default=str))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdrt")
    except PackageNotFoundError:
        return "0"


def job_error(job) -> HTTPException | None:
    """The HTTP error for a job that did not succeed: invalid 422, timeout 504, cancelled 409, internal 500."""
    from .jobs import JobState

    if job.state == JobState.SUCCEEDED:
        return None
    kind = job.error.kind if job.error else "internal"
    status = {"invalid": 422, "timeout": 504, "cancelled": 409, "interrupted": 409}.get(kind, 500)
    return HTTPException(status, f"job {job.id} {job.state.value}: {job.error.message if job.error else ''}")


def state_of(request: Request) -> ServerState:
    return request.app.state.sdrt
