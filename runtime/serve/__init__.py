"""`sdrt serve`: an HTTP server for one engine dir (the `sdrt[serve]` extra: FastAPI, uvicorn, prometheus-client).

Modules: app.py (the FastAPI app: probes, metrics, auth, limits, errors), a1111.py (AUTOMATIC1111's /sdapi/v1),
generations.py (sdrt's jobs API), inputs.py (request fields -> checked ImageSpecs), jobs.py (queue, worker,
batching, cancellation; no HTTP), metrics.py (Prometheus), server.py (uvicorn, logs, SIGTERM), ray.py (Ray Serve),
cli.py (the `sdrt serve` flags).
"""
