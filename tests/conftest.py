"""Shared fixtures: one tiny random SD 1.x checkpoint and its engine dir, built once per test session."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

# Modules whose randn_tensor draws the per-step noise of stochastic samplers and img2img's added noise.
NOISE_MODULES = (
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_lcm",
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
)


def run_sdrt(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `sdrt` CLI in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def free_port() -> int:
    """A loopback port nothing listens on now (servers under test bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


READY_TIMEOUT = 60  # seconds for a served engine to load


def wait_ready(base: str, timeout: float = READY_TIMEOUT) -> None:
    import requests

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if requests.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base} not ready after {timeout} s")


@contextmanager
def serving(config):
    """`sdrt serve`'s app under uvicorn in a thread on a free loopback port; yields (base_url, app)."""
    import uvicorn
    from sdrt.runtime.serve.app import create_app

    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and one `sdrt: error:` line on stderr that holds every needle; no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrt: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], result.stderr


def unet_batches(pipe, monkeypatch) -> list[int]:
    """Spy on a Pipeline's backend: the list fills with the batch size of every UNet call, in order."""
    batches = []
    run = pipe.backend.run

    def spy(name, feeds):
        if name == "unet":
            batches.append(feeds["sample"].shape[0])
        return run(name, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    return batches


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from sdrt.export.random_model import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sd1", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint, tmp_path_factory) -> Path:
    from sdrt.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("engines") / "tiny-engine"
    export(ExportOptions(checkpoint=str(tiny_checkpoint), out=out), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_modules(tiny_checkpoint) -> dict:
    from sdrt.export.checkpoint import load_modules, open_checkpoint

    return load_modules(open_checkpoint(tiny_checkpoint))


@pytest.fixture
def shared_noise(monkeypatch):
    """Make diffusers draw its noise from a numpy Generator, in call order, as sdrt's pipeline does."""
    import importlib

    import torch
    from diffusers.models.autoencoders import vae as vae_module

    state = {}

    def numpy_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(state["rng"].standard_normal(tuple(shape), dtype=np.float32))

    def sample(self, generator=None):
        return self.mean + self.std * numpy_randn(self.mean.shape)

    for name in NOISE_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", numpy_randn)
    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", sample)

    def reseed(seed):
        state["rng"] = np.random.default_rng(seed)

    return reseed


@pytest.fixture(scope="session")
def family_engine(tmp_path_factory):
    """`family_engine("tiny-sdxl")` -> (checkpoint, engine dir) of a tiny random model, each built once."""
    from sdrt.export.exporter import ExportOptions, export
    from sdrt.export.random_model import write_random_checkpoint

    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            ckpt = write_random_checkpoint(root / "ckpt", name, seed=0)
            export(ExportOptions(checkpoint=str(ckpt), out=root / "engine"), log=lambda s: None)
            built[name] = ckpt, root / "engine"
        return built[name]

    return get
