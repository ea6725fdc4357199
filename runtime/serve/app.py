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
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..manifest import package_versions
from ..pipeline import Pipeline
from .config import ServeConfig
from .errors import KINDS, a1111_error, error_for, is_openai, openai_error
from .guard import cross_site, loopback_name
from .inputs import FieldError, engine_info
from .jobs import JobQueue, NotAccepting, QueueFull
from .metrics import Metrics

log = logging.getLogger("sdrt.serve")

OPEN_PATHS = ("/health", "/ready")  # probes answer without the API key
# OpenAI's response_format "url": capability URLs (an unguessable job id), fetched without the key, as OpenAI's are.
OPEN_PREFIXES = ("/v1/images/files/",)
# Pages a browser opens: their 401 asks for HTTP Basic (any user name, the key as password), so the browser
# prompts once and then sends the key with every request the page makes.
PAGE_PATHS = ("/", "/docs", "/redoc")
DISCONNECT_POLL = 1.0  # seconds between checks that a waiting client is still there
STOP_GRACE = 60.0  # seconds a timed-out request waits for its job to stop before answering anyway


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

    def drain(self) -> None:
        """Shutdown has begun: not ready, no new jobs, the waiting ones cancelled; the running batch goes on."""
        self.draining = True
        self.metrics.ready.set(0)
        self.queue.drain()

    def pipe(self) -> Pipeline:
        if self.pipeline is None:
            raise HTTPException(503, self.load_error or "the engine is still loading", headers={"Retry-After": "5"})
        return self.pipeline

    async def wait(self, job, timeout: float, request: Request | None = None):
        """Wait for a job without blocking the loop. Past `timeout`, or when the client goes away, the job is
        cancelled (it stops at its next step). Returns the job, finished unless it would not stop in time."""
        future = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + timeout
        try:
            while not future.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    self.queue.cancel(job.id, "timeout")
                    break
                try:  # shielded: cancelling this wait must not cancel the job's future
                    await asyncio.wait_for(asyncio.shield(future), min(left, DISCONNECT_POLL))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        self.queue.cancel(job.id, "cancelled")
                        return job
        except asyncio.CancelledError:  # the server or Ray gave up on this request: so does the job
            self.queue.cancel(job.id, "cancelled")
            raise
        if not future.done():  # a step (or a decode) can take a while: give it one more
            try:
                await asyncio.wait_for(asyncio.shield(future), STOP_GRACE)
            except asyncio.TimeoutError:
                pass
        return job

    def submit(self, specs, request: Request, timeout: float | None = None, public: bool = False):
        try:
            return self.queue.submit(specs, timeout, request.state.request_id, public)
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
            response = error_for(scope["path"], 413, f"request body of {int(length)} bytes is over the "
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
                await error_for(scope["path"], 413, f"request body is over the {self.limit}-byte limit")(
                    scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        return await self.app(scope, limited, guarded_send)


class Frame:
    """Request id, API key, access log, metrics and X-Process-Time on every request. Plain ASGI (not FastAPI's
    http middleware, whose wrapped receive hides a client's disconnect from the handlers)."""

    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: Metrics):
        self.app = app
        self.config = config
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id
        status = 500
        started = False

        async def framed(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                out = MutableHeaders(scope=message)
                out["X-Request-ID"] = request_id
                out["X-Process-Time"] = f"{time.perf_counter() - start:.4f}"
            await send(message)

        try:
            path = scope["path"]
            if self.config.local_only and not loopback_name(headers.get("host"), self.config.allowed_hosts):
                await error_for(path, 400, f"this server answers only requests addressed to localhost, not to "
                                f"{headers.get('host')!r} (see --allow-host)")(scope, receive, framed)
            elif cross_site(scope["method"], headers, self.config.allowed_origins):
                await error_for(path, 403, f"cross-site {scope['method']} refused: the request came from another "
                                "site's page (see --allow-origin)")(scope, receive, framed)
            elif self.config.api_key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) and \
                    not _authorized(headers.get("authorization"), headers.get("x-api-key"), self.config.api_key):
                page = path in PAGE_PATHS or path.startswith("/ui/")
                challenge = 'Basic realm="sdrt", charset="UTF-8"' if page else "Bearer"
                await error_for(path, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": challenge})(scope, receive, framed)
            else:
                await self.app(scope, receive, framed)
        except Exception:  # noqa: BLE001 - a request can fail; the server stays up
            log.exception("unhandled error on %s %s", scope["method"], scope["path"],
                          extra={"request_id": request_id})
            if started:
                raise
            await error_for(scope["path"], 500, "internal server error; see the server log", kind="InternalError",
                            request_id=request_id)(scope, receive, framed)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1000,
                     extra={"request_id": request_id})


def create_app(config: ServeConfig, pipeline: Pipeline | None = None, on_load_error=None) -> FastAPI:
    """The app for one engine dir. Give `pipeline` to serve one already loaded (tests); otherwise it loads
    in the background at startup, and `on_load_error(message)` is called if that fails."""
    from . import a1111, generations, openai_api, ui

    metrics = Metrics()
    state = ServerState(config, metrics)

    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(state, pipeline, on_load_error))
        yield
        state.drain()
        await asyncio.to_thread(state.queue.stop, config.timeout)
        loader.cancel()

    # FastAPI's /docs and /redoc load their scripts from a CDN: a blank page offline. ui.py serves /docs itself.
    app = FastAPI(title="sdrt", version=package_versions(["sdrt"], "0")["sdrt"], lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Stable Diffusion from an sdrt engine dir: AUTOMATIC1111's /sdapi/v1, OpenAI's "
                  "Images API (/v1/images/generations), and sdrt's jobs API (/v1/generations).")
    app.state.sdrt = state
    app.include_router(a1111.router)
    app.include_router(generations.router)
    app.include_router(openai_api.router)
    app.include_router(openai_api.models)
    app.include_router(ui.docs)
    if config.ui:
        app.include_router(ui.router)

    app.add_middleware(Frame, config=config, metrics=metrics)
    app.add_middleware(BodyLimit, limit=config.max_body)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx", {})
            return error_for(request.url.path, 400, f"malformed JSON body: {ctx.get('error', 'cannot parse')}",
                             kind="MalformedJSON")
        fields = ["/".join(str(p) for p in e["loc"] if p not in ("body", "query")) or "body" for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors))
        if is_openai(request.url.path):
            return openai_error(400, message, fields[0])
        return JSONResponse({"error": "ValidationError", "detail": _jsonable(errors), "body": "",
                             "errors": message, "message": message}, status_code=422)

    @app.exception_handler(FieldError)
    async def bad_field(request: Request, exc: FieldError):
        if is_openai(request.url.path):
            return openai_error(exc.status, str(exc), exc.field)
        detail = [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
        return JSONResponse({"error": "ValidationError", "detail": detail, "body": "", "errors": str(exc),
                             "message": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's (404, 405)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if is_openai(request.url.path):
            return openai_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
        return a1111_error(exc.status_code, KINDS.get(exc.status_code, "Error"), exc.detail,
                           headers=getattr(exc, "headers", None))

    @app.get("/v1/engine", tags=["operations"], summary="The served engine: model, sizes, defaults, samplers, "
             "limits (what the playground's form offers)")
    async def engine():
        return engine_info(state.pipe(), config.limits)

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: 200 once the engine is loaded and work is accepted")
    async def ready():
        if state.ready:
            return {"status": "ready", "engine": str(config.engine_dir), "backend": state.pipeline.backend.name}
        if state.draining:
            reason = "draining"
        elif state.load_error:
            reason = f"engine failed to load: {state.load_error}"
        elif state.pipeline is not None and not state.queue.alive:
            reason = "the worker thread has stopped"
        else:
            reason = "loading the engine"
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
                                               metrics.observe_engine, config.cpu_precision)
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


def job_error(job) -> HTTPException | None:
    """The HTTP error for a job that did not succeed: invalid 422, timeout 504, cancelled 409, internal 500."""
    from .jobs import JobState

    if job.state == JobState.SUCCEEDED:
        return None
    if not job.state.finished:  # timed out and still stopping
        return HTTPException(504, f"job {job.id} timed out at step {job.step}/{job.steps}; it is being stopped")
    kind = job.error.kind if job.error else "internal"
    status = {"invalid": 422, "timeout": 504, "cancelled": 409, "interrupted": 409, "shutdown": 503}.get(kind, 500)
    headers = {"Retry-After": "5"} if status == 503 else None
    return HTTPException(status, f"job {job.id} {job.state.value}: {job.error.message if job.error else ''}",
                         headers=headers)


def state_of(request: Request) -> ServerState:
    return request.app.state.sdrt
