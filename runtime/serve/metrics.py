"""The server's Prometheus metrics (prometheus-client), in a registry of their own per app.

Stage latencies come from two places: the queue (`queue_wait`: submit to start; `job`: start to finish) and
every engine call, timed by the Pipeline's backend wrapper (`text_encoder`, `unet` per step, `vae_decoder`, ...).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# From a 5 ms tiny-model UNet call to a minutes-long job on the CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 600)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("sdrt_queue_depth", "Jobs waiting to start", registry=r)
        self.in_flight = Gauge("sdrt_jobs_in_flight", "Jobs running now", registry=r)
        self.ready = Gauge("sdrt_ready", "1 once the engine is loaded and the queue accepts work", registry=r)
        self.stage_seconds = Histogram("sdrt_stage_seconds", "Latency per stage: queue_wait, job, and each "
                                       "engine component call", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("sdrt_batch_images", "Images per batched denoising run",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.images = Counter("sdrt_images", "Images generated", registry=r)
        self.jobs = Counter("sdrt_jobs", "Jobs finished, by final state", ["state"], registry=r)
        self.rejected = Counter("sdrt_rejected", "Requests refused before queueing, by reason", ["reason"],
                                registry=r)
        self.errors = Counter("sdrt_errors", "Failed jobs by kind (invalid, timeout, internal)", ["kind"], registry=r)
        self.requests = Counter("sdrt_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.load_seconds = Gauge("sdrt_engine_load_seconds", "Time to load the engine dir", registry=r)

    def observe_engine(self, component: str, seconds: float) -> None:
        self.stage_seconds.labels(component).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
