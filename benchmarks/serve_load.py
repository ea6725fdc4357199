"""Load on `sdrt serve`: requests/s and p50/p99 latency at several numbers of concurrent clients, with dynamic
batching off (--max-batch 1) and on, against the real server in its own process.

    python benchmarks/serve_load.py ENGINE_DIR --label demo --concurrency 1 2 4 8 --rounds 10 \
        --json benchmarks/results/serve_demo_cpu.json

Each client is a closed loop: it sends its next request (A1111 txt2img, the same settings, its own seed) as soon
as the last one answers, `--rounds` times. One warm-up request per server is not counted. The server's own
/metrics give the mean images per batched UNet run, and /proc its peak RSS. With batching on, an image made in a
batch of two is compared with the same seed made alone. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_dir: Path, max_batch: int, queue_size: int, backend: str, timeout: float):
    port = free_port()
    cmd = [sys.executable, "-m", "sdrt.runtime.cli", "serve", str(engine_dir), "--port", str(port),
           "--backend", backend, "--max-batch", str(max_batch), "--queue-size", str(queue_size),
           "--timeout", str(timeout), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if requests.get(f"{base}/ready", timeout=2).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server not ready in 600 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def batch_stats(base: str) -> tuple[float, float]:
    """(images, batched runs) so far, from the server's sdrt_batch_images histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "sdrt_batch_images":
            values = {s.name: s.value for s in family.samples}
            return values["sdrt_batch_images_sum"], values["sdrt_batch_images_count"]
    return 0.0, 0.0


def peak_rss_gib(pid: int) -> float:
    """The server process's peak resident memory so far (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    return float("nan")


def batched_vs_alone(base: str, body: dict, timeout: float) -> dict:
    """Two requests sent together (batched by the server) against the first one's seed sent alone: the largest
    pixel difference (0-255) between the two copies of that image."""
    import base64
    import io

    from PIL import Image

    def image(seed: int) -> np.ndarray:
        r = requests.post(f"{base}/sdapi/v1/txt2img", json={**body, "seed": seed}, timeout=timeout)
        r.raise_for_status()
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), dtype=np.int16)

    images0, runs0 = batch_stats(base)
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(image, (777, 778)))
    images1, runs1 = batch_stats(base)
    alone = image(777)
    return {"batch_images": (images1 - images0) / max(1.0, runs1 - runs0),
            "max_pixel_diff": int(np.abs(together[0] - alone).max())}


def load(base: str, body: dict, clients: int, rounds: int, timeout: float) -> dict:
    def client(k: int) -> list[float]:
        out = []
        with requests.Session() as session:
            for r in range(rounds):
                start = time.perf_counter()
                resp = session.post(f"{base}/sdapi/v1/txt2img", json={**body, "seed": 1000 * k + r}, timeout=timeout)
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
                out.append(time.perf_counter() - start)
        return out

    images0, runs0 = batch_stats(base)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - start
    images1, runs1 = batch_stats(base)
    lat = np.array(latencies)
    return {"concurrency": clients, "requests": len(latencies), "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 4), "p50_s": round(float(np.percentile(lat, 50)), 4),
            "p99_s": round(float(np.percentile(lat, 99)), 4), "mean_s": round(float(lat.mean()), 4),
            "mean_batch_images": round((images1 - images0) / max(1.0, runs1 - runs0), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--label", required=True, help="name of the case in the report, e.g. demo or sd15-512")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent clients")
    p.add_argument("--rounds", type=int, default=10, help="requests per client at each concurrency")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the batching server")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    p.add_argument("--sampler", default="DDIM", help="A1111 sampler name")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    p.add_argument("--size", type=int, default=None, help="width = height in pixels; default: the native size")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--json", type=Path, required=True, help="write the report here")
    args = p.parse_args()

    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(args.engine_dir)
    size = args.size or manifest.native_resolution[0]
    body = {"prompt": "a photograph of an astronaut riding a horse", "steps": args.steps,
            "sampler_name": args.sampler, "cfg_scale": args.cfg, "width": size, "height": size}
    results, peaks, equality = [], {}, None
    for batching, max_batch in (("off", 1), ("on", args.max_batch)):
        proc, base = start_server(args.engine_dir, max_batch, max(args.concurrency) * 2, args.backend, args.timeout)
        try:
            load(base, body, 1, 1, args.timeout)  # warm-up, not counted
            for c in args.concurrency:
                row = {"batching": batching, "max_batch": max_batch, **load(base, body, c, args.rounds, args.timeout)}
                results.append(row)
                print(json.dumps(row), flush=True)
            if batching == "on":
                equality = batched_vs_alone(base, body, args.timeout)
                print(json.dumps(equality), flush=True)
            peaks[batching] = peak_rss_gib(proc.pid)
        finally:
            stop_server(proc)
    gains = {}
    for c in args.concurrency:
        off, on = (next(r for r in results if r["batching"] == b and r["concurrency"] == c) for b in ("off", "on"))
        gains[str(c)] = round(on["requests_per_s"] / off["requests_per_s"], 3)
    import onnxruntime

    report = {
        "benchmark": "serve_load", "label": args.label, "engine_dir": str(args.engine_dir),
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
        "settings": {**body, "rounds_per_client": args.rounds, "backend": args.backend, "api": "/sdapi/v1/txt2img"},
        "results": results, "throughput_gain_with_batching": gains, "server_peak_rss_gib": peaks,
        "batched_image_vs_alone": equality,
    }
    partial = args.json.with_name(f".{args.json.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(args.json)
    print(f"\n{args.label}: batching off vs on (max batch {args.max_batch})")
    print(f"{'clients':>7} | {'req/s off':>9} {'p50 off':>8} {'p99 off':>8} | {'req/s on':>9} {'p50 on':>8} "
          f"{'p99 on':>8} {'batch':>5} | gain")
    for c in args.concurrency:
        off, on = (next(r for r in results if r["batching"] == b and r["concurrency"] == c) for b in ("off", "on"))
        print(f"{c:>7} | {off['requests_per_s']:>9.3f} {off['p50_s']:>8.3f} {off['p99_s']:>8.3f} | "
              f"{on['requests_per_s']:>9.3f} {on['p50_s']:>8.3f} {on['p99_s']:>8.3f} {on['mean_batch_images']:>5.2f}"
              f" | {gains[str(c)]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
