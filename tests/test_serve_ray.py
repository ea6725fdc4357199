"""Ray Serve scale-out (runtime/serve/ray.py): the tiny engine as two replicas on a local Ray cluster, over real
HTTP through Ray's proxy on 127.0.0.1. Each server is a process group of its own, waited on under a deadline, and
stopped (SIGTERM, then SIGKILL of the group) by the test that started it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import assert_one_line_error, free_port, run_sdrt

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'sdrt[ray]'")

START_TIMEOUT = 150  # seconds for a local Ray cluster to start and deploy two replicas on a busy 2-core CI box
STOP_TIMEOUT = 60
DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving-ray.md"
TXT2IMG = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1234}


class Server:
    """A server command in its own process group, its stderr in a file."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text()):
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{self.tail()}"
            time.sleep(0.5)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def call(port: int, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request to the proxy."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.load(r)
    except urllib.error.HTTPError as e:  # Ray's proxy answers some errors (no app yet: 404, 503) in plain text
        text = e.read().decode(errors="replace")
        return e.code, {k.lower(): v for k, v in e.headers.items()}, {"text": text}


def images_by_replica(port: int, want: int = 2, tries: int = 40) -> dict[str, set[str]]:
    """Send the same seeded txt2img until `want` replicas have answered (the proxy picks replicas at random among
    equally loaded ones, so 40 tries miss one of two with odds of 2**-39); {replica id: its images}."""
    served: dict[str, set[str]] = {}
    for _ in range(tries):
        status, headers, body = call(port, "/sdapi/v1/txt2img", TXT2IMG)
        assert status == 200, body
        assert len(body["images"]) == 1
        served.setdefault(headers["x-sdrt-replica"], set()).add(body["images"][0])
        if len(served) == want:
            break
    return served


def ready_replicas(server: Server, port: int, want: int = 2) -> set[str]:
    """Poll /ready through the proxy until `want` replicas have answered 200 (each says which it is)."""
    seen: set[str] = set()
    deadline = time.monotonic() + START_TIMEOUT
    while len(seen) < want:
        assert server.proc.poll() is None, f"the server exited ({server.proc.returncode}):\n{server.tail()}"
        assert time.monotonic() < deadline, f"replicas {seen} ready after {START_TIMEOUT} s:\n{server.tail()}"
        try:
            status, headers, body = call(port, "/ready")
        except OSError:  # the proxy is not listening yet
            status = None
        if status == 200 and body["status"] == "ready":
            seen.add(headers["x-sdrt-replica"])
        time.sleep(0.1)
    return seen


@pytest.fixture
def warm_engine(tiny_engine) -> Path:
    """The tiny engine with ONNX Runtime's optimized-graph cache written once, as docs/serving-ray.md tells users
    to do before replicas share a dir: two replicas loading a fresh dir would both write the cache files."""
    from sdrt.runtime.pipeline import Pipeline

    Pipeline.load(tiny_engine, "cpu")
    return tiny_engine


def test_cli_two_replicas(warm_engine, tmp_path):
    """`sdrt serve --ray --replicas 2`: both replicas load and answer, the same seed gives the same image from
    either, and SIGTERM takes the app and the local cluster down with exit code 0."""
    from PIL import Image

    port = free_port()
    server = Server([sys.executable, "-m", "sdrt.runtime.cli", "serve", str(warm_engine), "--backend", "cpu",
                     "--ray", "--replicas", "2", "--port", str(port)], tmp_path / "serve.log")
    try:
        server.wait_for_log(r'"msg": "serving .* with Ray Serve \(2 replicas\)"')  # after every replica loaded
        assert len(ready_replicas(server, port)) == 2
        served = images_by_replica(port)
        assert len(served) == 2, f"only {list(served)} answered"
        images = set().union(*served.values())
        assert len(images) == 1, "the same seed gave different images"
        image = Image.open(io.BytesIO(base64.b64decode(images.pop())))
        assert image.format == "PNG" and image.size == (64, 64)
        assert server.stop() == 0, server.tail()
        assert "stopping: draining the replicas" in server.log.read_text()
    finally:
        server.kill()


def test_serve_config_from_the_docs(warm_engine, tmp_path):
    """The docs' Ray Serve config, with this machine's values (engine dir, CPU, loopback), under Ray's own
    `serve run`: build_app takes its args, and the config's autoscaling_config (min 2) overrides build_app's one
    replica."""
    import yaml  # Ray's dependency

    block = re.search(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    config = yaml.safe_load(block.group(1))
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(engine_dir=str(warm_engine), backend="cpu")
    deployment = app["deployments"][0]
    deployment["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0}
    deployment["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    path = tmp_path / "sdrt-serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).with_name("serve")
    server = Server([str(serve_cli), "run", "--address", "local", str(path)], tmp_path / "serve.log")
    try:
        assert len(ready_replicas(server, port)) == 2
        assert len(images_by_replica(port)) == 2
        server.stop()  # Ray's CLI exits with the signal's number; what matters is that it stops
    finally:
        server.kill()


def test_port_in_use(warm_engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_sdrt("serve", str(warm_engine), "--backend", "cpu", "--ray", "--port", str(port), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]  # above it: Ray's own log of the proxy that could not bind
    assert last.startswith("sdrt: error: Ray Serve could not start sdrt") and f":{port}" in last, last
    assert "bind" in last, last


def test_one_line_errors(tiny_engine):
    closed = free_port()
    assert_one_line_error(run_sdrt("serve", str(tiny_engine), "--ray", "--ray-address", f"127.0.0.1:{closed}",
                                   timeout=60), "cannot reach the Ray cluster", f"127.0.0.1:{closed}")
    assert_one_line_error(run_sdrt("serve", str(tiny_engine), "--ray", "--replicas", "0", timeout=60),
                          "--replicas must be at least 1")
    from sdrt.runtime.errors import UserError
    from sdrt.runtime.serve.ray import build_app

    with pytest.raises(UserError, match="unknown build_app args: replica "):
        build_app({"engine_dir": str(tiny_engine), "replica": 2})
    with pytest.raises(UserError, match="--max-replicas must be at least"):
        build_app({"engine_dir": str(tiny_engine), "replicas": "3", "max_replicas": "2"})  # `serve run` k=v strings
