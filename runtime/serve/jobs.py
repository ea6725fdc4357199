"""The job queue behind every front door: bounded admission, one worker thread that owns the Pipeline, dynamic
batching, cancellation and deadlines. It knows nothing about HTTP.

- A job is a list of images to make (`ImageSpec`: one prompt, one seed). Front doors split a request for N
  images into N specs seeded seed, seed+1, ... (A1111's `all_seeds`), so every image can be remade alone.
- Admission is bounded: more than `max_queue` jobs waiting raises `QueueFull` with a retry estimate.
- One worker thread runs the Pipeline, so a blocking numpy loop never touches the event loop. It takes the
  oldest waiting image, then every waiting image whose `batch_key` matches (same size, steps, scheduler,
  guidance, strength), oldest first, up to `max_batch` images in one `Pipeline.run`. Each image keeps its own
  random stream, so it equals what it would have been alone (bit for bit on the CPU backend; see Pipeline.run).
- Cancellation and deadlines are checked between denoising steps. A job that stops mid-batch is finished at
  once; its rows keep running only while another job still shares the batch.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from ..errors import UserError
from ..images import png_bytes, to_pil
from ..pipeline import Pipeline, Request, batch_key
from .metrics import Metrics

log = logging.getLogger("sdrt.serve")


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class QueueFull(Exception):
    """More jobs are waiting than the queue holds; `retry_after` is an estimate in seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the queue is full ({depth} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The queue is not taking work: the engine is still loading, or the server is shutting down."""


@dataclass(frozen=True)
class ImageSpec:
    """One image to make (`request.batch` is 1): what Pipeline.prepare takes, and its PNG's infotext."""

    request: Request
    seed: int
    image: object | None  # init image (PIL) for image-to-image
    infotext: str

    @property
    def key(self) -> tuple:
        return batch_key(self.request, self.image is not None)


@dataclass(frozen=True)
class JobError:
    kind: str  # "invalid" (the request), "timeout", "internal"
    message: str


@dataclass(eq=False)
class Job:
    """One submitted request. Its fields change only under the queue's lock; read them through `snapshot`."""

    specs: list[ImageSpec]
    timeout: float
    request_id: str = ""
    public: bool = False  # its images may be fetched by id without the API key (OpenAI's "url" responses)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0  # within the batch that is running
    steps: int = 0
    images_done: int = 0
    pngs: list[bytes | None] = field(default_factory=list)
    error: JobError | None = None
    stop_reason: str | None = None  # set to stop a running job: "cancelled", "interrupted" or "timeout"
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    pending: list[int] = field(default_factory=list)  # indices into specs not yet started
    deadline: float = 0.0  # time.monotonic()

    def __post_init__(self):
        self.pngs = [None] * len(self.specs)
        self.pending = list(range(len(self.specs)))
        self.deadline = time.monotonic() + self.timeout

    @property
    def images_total(self) -> int:
        return len(self.specs)

    def progress(self) -> float:
        """0..1 over all of the job's images."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        running = (len(self.specs) - len(self.pending) - self.images_done) if self.state == JobState.RUNNING else 0
        frac = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.images_done + running * frac) / max(1, len(self.specs)))


@dataclass
class _Batch:
    units: list[tuple[Job, int]]  # (job, spec index)

    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(job for job, _ in self.units))


class _Abandoned(Exception):
    """Every job in the running batch has stopped: end the denoising loop early."""


class JobQueue:
    """Owns the Pipeline once `start`ed; `submit` from any thread."""

    def __init__(self, pipeline: Pipeline | None, metrics: Metrics, max_queue: int = 16, max_batch: int = 4,
                 batch_wait: float = 0.02, timeout: float = 600.0, keep: int = 256, keep_bytes: int = 512 << 20):
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.timeout = timeout
        self.keep = keep  # finished jobs remembered for polling clients: at most this many ...
        self.keep_bytes = keep_bytes  # ... holding at most this many bytes of PNGs
        self._lock = threading.Condition()
        self._waiting: list[Job] = []  # jobs with images not yet started, oldest first
        self._jobs: dict[str, Job] = {}
        self._running: list[Job] = []
        self._accepting = pipeline is not None
        self._stop = False
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        # Jobs in the system (waiting or running) as each of the last submissions found it: how many requests
        # are in flight at once lately, so how full a batch can get by waiting a moment.
        self._load: deque[int] = deque([1], maxlen=16)
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:
            self.pipeline = pipeline
        with self._lock:
            self._accepting = True
        self._thread = threading.Thread(target=self._work, name="sdrt-worker", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stop and self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self) -> None:
        """Refuse new jobs and cancel the waiting ones (their requests answer 503); the running batch goes on."""
        with self._lock:
            self._accepting = False
            for job in list(self._waiting):
                self._finish(job, JobState.CANCELLED, JobError("shutdown", "the server is shutting down"))
            self._lock.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, then end the worker once the running batch is done (waiting up to `timeout`)."""
        self.drain()
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- front-door API -----------------------------------------------------------------------------

    def submit(self, specs: list[ImageSpec], timeout: float | None = None, request_id: str = "",
               public: bool = False) -> Job:
        if not specs or any(spec.request.batch != 1 for spec in specs):
            raise ValueError("a job is one or more specs of one image each")
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        with self._lock:
            if not self.accepting:
                self.metrics.rejected.labels("not_ready").inc()
                raise NotAccepting("the server is not accepting work (loading or shutting down)")
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(len(self._waiting), self._retry_after())
            job = Job(specs, timeout, request_id, public)
            self._load.append(len(self._waiting) + len(self._running) + 1)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._gauges()
            self._lock.notify_all()
        log.info("job %s queued: %d image(s), %d waiting", job.id, len(specs), len(self._waiting),
                 extra={"request_id": request_id})
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def forget(self, job: Job) -> None:
        """Drop a finished job whose images have been delivered (A1111 answers carry them all at once)."""
        with self._lock:
            if job.state.finished:
                self._jobs.pop(job.id, None)

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None:
        """Cancel a job: at once if it is waiting, between denoising steps if it runs. None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state.finished:
                return job
            if job in self._running:  # its rows stop at the next step; its images still waiting never start
                job.stop_reason = reason
                job.pending.clear()
                if job in self._waiting:
                    self._waiting.remove(job)
                self._gauges()
            else:
                self._finish(job, JobState.CANCELLED, JobError(reason, f"job {reason} before "
                                                               f"{'it started' if job.started is None else 'its next image'}"))
            return job

    def interrupt(self) -> int:
        """A1111's /interrupt: stop the running jobs. Returns how many."""
        with self._lock:
            for job in self._running:
                job.stop_reason = "interrupted"
            return len(self._running)

    def snapshot(self, job: Job) -> dict:
        with self._lock:
            return {"id": job.id, "state": job.state.value, "step": job.step, "steps": job.steps,
                    "images_done": job.images_done, "images_total": job.images_total,
                    "progress": round(job.progress(), 4), "created": job.created, "started": job.started,
                    "finished": job.finished, "error": None if job.error is None else job.error.message,
                    "error_kind": None if job.error is None else job.error.kind,
                    "queue_position": self._waiting.index(job) if job in self._waiting else None}

    def status(self) -> dict:
        """The queue as a whole: A1111's /progress and the metrics read it."""
        with self._lock:
            current = self._running[0] if self._running else None
            return {"waiting": len(self._waiting), "running": len(self._running),
                    "current": None if current is None else (current, current.step, current.steps,
                                                             current.progress(), current.started)}

    # -- the worker ---------------------------------------------------------------------------------

    def _retry_after(self) -> int:
        per = self._seconds_per_image or 1.0
        queued = sum(len(j.pending) for j in self._waiting)
        return max(1, math.ceil(per * (queued + 1) / max(1, self.max_batch)))

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.in_flight.set(len(self._running))

    def _next_batch(self) -> _Batch | None:
        """Block until there is work; take the oldest image and the compatible ones after it."""
        with self._lock:
            while not self._waiting and not self._stop:
                self._lock.wait()
            if self._stop:
                return None
            self._expire_waiting()
            if not self._waiting:
                return _Batch([])
            first = self._waiting[0]
            key = first.specs[first.pending[0]].key
            # Wait (briefly) only where clients have shown concurrency lately: closed-loop clients resubmit as
            # their answers arrive, and without the wait the first one back always runs alone (two clients would
            # take turns forever). A lone client never waits.
            target = min(self.max_batch, max(self._load))
            if target > 1 and self.batch_wait > 0:
                end = time.monotonic() + self.batch_wait
                while self._images_matching(key) < target and (left := end - time.monotonic()) > 0:
                    self._lock.wait(left)
                    if self._stop:
                        return None
            units, rows = [], 0
            for job in list(self._waiting):
                for i in list(job.pending):
                    n = job.specs[i].request.batch
                    if job.specs[i].key != key or (units and rows + n > self.max_batch):
                        continue
                    units.append((job, i))
                    rows += n
                    job.pending.remove(i)
                if not job.pending:
                    self._waiting.remove(job)
            now = time.time()
            for job in dict.fromkeys(j for j, _ in units):
                if job.state == JobState.QUEUED:
                    job.state, job.started = JobState.RUNNING, now
                    self.metrics.stage_seconds.labels("queue_wait").observe(now - job.created)
                if job not in self._running:
                    self._running.append(job)
            self._gauges()
            return _Batch(units)

    def _images_matching(self, key) -> int:
        return sum(job.specs[i].request.batch for job in self._waiting for i in job.pending
                   if job.specs[i].key == key)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for job in list(self._waiting):
            if now > job.deadline:
                self._finish(job, JobState.FAILED, JobError("timeout", f"timed out after {job.timeout:g} s "
                                                            "waiting in the queue"))

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a bug in one batch must not end the worker
                log.exception("the worker failed a batch")
                with self._lock:
                    for job in batch.jobs():
                        self._finish(job, JobState.FAILED, JobError("internal", f"{type(e).__name__}: {e}"))
                self._batch_done(batch.jobs())

    def _run(self, batch: _Batch) -> None:
        start = time.perf_counter()
        gens, kept = [], []
        for job, i in batch.units:
            spec = job.specs[i]
            try:
                gens.append(self.pipeline.prepare(spec.request, spec.seed, spec.image))
                kept.append((job, i))
            except UserError as e:
                with self._lock:
                    self._finish(job, JobState.FAILED, JobError("invalid", str(e)))
            except Exception as e:
                log.exception("job %s: preparing failed", job.id, extra={"request_id": job.request_id})
                with self._lock:
                    self._finish(job, JobState.FAILED, JobError("internal", f"{type(e).__name__}: {e}"))
        gens = [g for g, (job, _) in zip(gens, kept) if not job.state.finished]
        kept = [(job, i) for job, i in kept if not job.state.finished]
        if not gens:
            return
        jobs = list(dict.fromkeys(job for job, _ in kept))
        self.metrics.batch_images.observe(sum(g.req.batch for g in gens))

        def on_step(done: int, total: int) -> None:
            with self._lock:
                now = time.monotonic()
                for job in jobs:
                    if job.state.finished:
                        continue
                    job.step, job.steps = done, total
                    if job.stop_reason is None and now > job.deadline:
                        job.stop_reason = "timeout"
                    if job.stop_reason is not None:
                        self._stop_running(job)
                if all(job.state.finished for job in jobs):
                    raise _Abandoned

        try:
            outputs = self.pipeline.run(gens, on_step=on_step)
        except _Abandoned:
            self._batch_done(jobs)
            return
        except Exception as e:
            log.exception("batch of %d image(s) failed", len(gens))
            kind = "invalid" if isinstance(e, UserError) else "internal"
            message = str(e) if kind == "invalid" else f"{type(e).__name__}: {e}"
            with self._lock:
                for job in jobs:
                    self._finish(job, JobState.FAILED, JobError(kind, message))
            self._batch_done(jobs)
            return
        pngs = [[png_bytes(im, job.specs[i].infotext) for im in to_pil(out)] for out, (job, i) in zip(outputs, kept)]
        elapsed = time.perf_counter() - start
        rows = sum(g.req.batch for g in gens)
        self._seconds_per_image = elapsed / rows if not self._seconds_per_image else (
            0.7 * self._seconds_per_image + 0.3 * elapsed / rows)
        with self._lock:
            for (job, i), images in zip(kept, pngs):
                if job.state.finished:
                    continue
                if job.stop_reason is not None:  # stopped after the last step (while decoding)
                    self._stop_running(job)
                    continue
                job.pngs[i] = images[0]
                job.images_done += 1
                self.metrics.images.inc()
                if job.images_done == job.images_total:
                    self._finish(job, JobState.SUCCEEDED, None)
        self._batch_done(jobs)

    def _batch_done(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:  # a job with images left waits for its next batch; a finished one keeps its last step
                if not job.state.finished:
                    job.step = 0
                if job in self._running:
                    self._running.remove(job)
            self._gauges()

    def _stop_running(self, job: Job) -> None:
        reason = job.stop_reason
        if reason == "timeout":
            self._finish(job, JobState.FAILED, JobError("timeout", f"timed out after {job.timeout:g} s, "
                                                        f"at step {job.step}/{job.steps}"))
        else:
            self._finish(job, JobState.CANCELLED, JobError(reason, f"job {reason} at step {job.step}/{job.steps}"))

    def _finish(self, job: Job, state: JobState, error: JobError | None) -> None:
        """Under the lock: a final state, the waiter woken, old finished jobs forgotten."""
        if job.state.finished:
            return
        job.state, job.error, job.finished = state, error, time.time()
        job.pending.clear()
        if job in self._waiting:
            self._waiting.remove(job)
        if job in self._running:
            self._running.remove(job)
        self.metrics.jobs.labels(state.value).inc()
        if error is not None and error.kind in ("internal", "timeout", "invalid"):
            self.metrics.errors.labels(error.kind).inc()
        if job.started is not None:
            self.metrics.stage_seconds.labels("job").observe(job.finished - job.started)
        if not job.future.done():  # a waiter's cancellation can cancel the future itself
            job.future.set_result(job)
        self._gauges()
        log.info("job %s %s%s", job.id, state.value, f": {error.message}" if error else "",
                 extra={"request_id": job.request_id})
        self._prune()

    def _prune(self) -> None:
        """Forget the oldest finished jobs past `keep` jobs or `keep_bytes` of PNGs."""
        finished = [j for j in self._jobs.values() if j.state.finished]
        held = sum(len(p) for j in finished for p in j.pngs if p)
        count = len(finished)
        for old in finished:
            if count <= self.keep and held <= self.keep_bytes:
                break
            del self._jobs[old.id]
            held -= sum(len(p) for p in old.pngs if p)
            count -= 1

