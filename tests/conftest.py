"""Shared fixtures: one tiny random SD 1.x checkpoint and its engine dir, built once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_sdrt(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `sdrt` CLI in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


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
