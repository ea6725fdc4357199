"""`sdrt serve`'s command line: its flags and the call into the server (runtime/cli.py registers it). Importing
this needs none of the serve extra: FastAPI, uvicorn and Ray load only when the command runs."""

from __future__ import annotations

import signal
from pathlib import Path

from ..backend import BACKENDS
from ..errors import UserError


def add_parser(sub, formatter_class, add_cpu_precision) -> None:
    """`sdrt serve`'s subparser; the shared help formatter and --cpu-precision come from runtime/cli.py."""
    p = sub.add_parser(
        "serve",
        help="serve an engine dir over HTTP: a browser playground, AUTOMATIC1111's API, OpenAI's Images API and "
        "sdrt's jobs API",
        description="Load ENGINE_DIR once and serve it: a playground page at / (open it in a browser), "
        "AUTOMATIC1111's /sdapi/v1 (txt2img, img2img, samplers, options, progress, interrupt, png-info), OpenAI's "
        "Images API (/v1/images/generations, /v1/models), sdrt's jobs API (/v1/generations: submit, progress, "
        "events, cancel), /health, /ready, /metrics (Prometheus), and the API reference at /docs (offline; the "
        "schema at /openapi.json). One worker runs "
        "the engine; compatible queued requests share UNet calls. SIGTERM drains and exits. Needs "
        "pip install 'sdrt[serve]' (and 'sdrt[ray]' for --ray).",
        formatter_class=formatter_class,
    )
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine dir written by sdrt export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="engine backend, as for sdrt generate")
    add_cpu_precision(p)
    p.add_argument("--queue-size", type=int, default=16,
                   help="jobs that may wait; one more gets 503 with Retry-After")
    p.add_argument("--max-batch", type=int, default=None,
                   help="most images in one batched denoising run (1: no batching); default: 1 on the CPU, where "
                   "batching measured no faster and takes more memory, 4 on a GPU")
    p.add_argument("--batch-wait", type=float, default=0.02, metavar="S",
                   help="seconds the worker waits for compatible requests to fill a batch")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="per request, queue wait included: past it the job stops and the request gets 504")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key (Authorization: Bearer KEY, X-API-Key, or Basic with KEY as password) "
                   "on every route but /health and /ready; default: $SDRT_API_KEY, else no key")
    p.add_argument("--max-body-mb", type=float, default=50.0, metavar="MIB",
                   help="largest request body; a larger one gets 413")
    p.add_argument("--max-images", type=int, default=8, help="most images one request may ask for")
    p.add_argument("--max-steps", type=int, default=150, help="most denoising steps one request may ask for")
    p.add_argument("--build", action="store_true",
                   help="tensorrt backend: build the engines this GPU lacks before serving (minutes)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="JSON log lines on stderr at this level and above")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (scheme://host[:port]) besides this server's own whose pages may POST to "
                   "it; e.g. the public address when a proxy passes another Host (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="without --api-key on a loopback address, the server answers only requests addressed to "
                   "localhost (against DNS rebinding); also answer this host name (repeatable)")
    p.add_argument("--no-ui", action="store_true",
                   help="serve no playground page at / (the APIs and the /docs reference stay)")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve deployment (see --replicas; docs/serving-ray.md)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="--ray: replicas, each with its own Pipeline (with --max-replicas: the fewest, 0 allowed)")
    p.add_argument("--max-replicas", type=int, default=None, metavar="N",
                   help="--ray: autoscale between --replicas and N replicas, aiming at one batch of work each")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--ray: the cluster to join (e.g. auto, ray://head:10001); default: start a local one")
    p.add_argument("--max-ongoing", type=int, default=None, metavar="N",
                   help="--ray: requests one replica handles at once; default: queue size + max batch")
    p.add_argument("--max-queued", type=int, default=-1, metavar="N",
                   help="--ray: requests Ray holds per proxy when every replica is full; one more gets 503 "
                   "(-1: no limit)")
    p.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="--ray: CPUs each replica reserves on the cluster (a scheduling share, not a thread limit)")
    p.add_argument("--replica-gpus", type=float, default=0.0, metavar="N",
                   help="--ray: GPUs each replica reserves; 1 gives each replica a GPU of its own")
    p.set_defaults(run=run)


def run(args) -> int:
    import os

    from .config import serve_config

    config = serve_config(args.engine_dir, backend=args.backend, queue_size=args.queue_size,
                          max_batch=args.max_batch, batch_wait=args.batch_wait, timeout=args.timeout,
                          api_key=args.api_key or os.environ.get("SDRT_API_KEY") or None,
                          max_body_mb=args.max_body_mb, max_images=args.max_images, max_steps=args.max_steps,
                          build=args.build, ui=not args.no_ui, allowed_origins=args.allow_origin,
                          allowed_hosts=args.allow_host, cpu_precision=args.cpu_precision)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server handles it: drain, then exit 0
    if args.ray:
        from .ray import run_ray

        return run_ray(config, host=args.host, port=args.port, replicas=args.replicas, address=args.ray_address,
                       max_ongoing=args.max_ongoing, log_level=args.log_level, max_replicas=args.max_replicas,
                       max_queued=args.max_queued, num_cpus=args.replica_cpus, num_gpus=args.replica_gpus)
    ray_only = {"--replicas": args.replicas != 1, "--max-replicas": args.max_replicas is not None,
                "--ray-address": args.ray_address is not None, "--max-ongoing": args.max_ongoing is not None,
                "--max-queued": args.max_queued != -1, "--replica-cpus": args.replica_cpus != 1.0,
                "--replica-gpus": args.replica_gpus != 0.0}
    if given := [flag for flag, set_ in ray_only.items() if set_]:
        raise UserError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --ray")
    from .server import serve

    return serve(config, host=args.host, port=args.port, log_level=args.log_level)
