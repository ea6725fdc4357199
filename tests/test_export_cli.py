"""`sdrt export` / `sdrt inspect` as a user runs them: bad input, interrupts, overwrite, external data."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_sdrt
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import Manifest


def assert_nothing_written(parent: Path, expected: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == expected


def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def test_missing_folder(tmp_path):
    r = run_sdrt("export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, "checkpoint not found", "nope")
    assert_nothing_written(tmp_path, set())


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "weights.txt").write_text("hello")
    r = run_sdrt("export", "--checkpoint", str(tmp_path / "random"), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, "not a diffusers Stable Diffusion checkpoint")
    assert_nothing_written(tmp_path, {"random"})


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, "corrupt safetensors", "diffusion_pytorch_model.safetensors")
    assert_nothing_written(tmp_path, {"ckpt"})


def test_garbage_safetensors(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x07not a safetensors file" * 4)
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, "corrupt safetensors")
    assert_nothing_written(tmp_path, {"ckpt"})


@pytest.mark.parametrize(
    "edit, family",
    [
        (lambda idx, unet: idx.update(text_encoder=[None, None], text_encoder_2=["transformers", "x"]),
         "sdxl-refiner"),
        (lambda idx, unet: unet.update(addition_embed_type="text_time", in_channels=9), "sdxl-inpaint"),
        (lambda idx, unet: unet.update(in_channels=9), "sd-inpaint"),
        (lambda idx, unet: idx.update(_class_name="StableDiffusion3Pipeline", transformer=["diffusers", "x"]),
         "stablediffusion3"),
    ],
)
def test_unsupported_family(tiny_checkpoint, tmp_path, edit, family):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    idx = json.loads((ckpt / "model_index.json").read_text())
    unet = json.loads((ckpt / "unet" / "config.json").read_text())
    edit(idx, unet)
    (ckpt / "model_index.json").write_text(json.dumps(idx))
    (ckpt / "unet" / "config.json").write_text(json.dumps(unet))
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, f"unsupported model family '{family}'", "supported: sd1")
    assert_nothing_written(tmp_path, {"ckpt"})


def test_existing_engine_dir(tiny_checkpoint, tmp_path):
    (tmp_path / "eng").mkdir()
    (tmp_path / "eng" / "keep.txt").write_text("mine")
    r = run_sdrt("export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, "already exists", "--overwrite")
    assert (tmp_path / "eng" / "keep.txt").read_text() == "mine"
    assert_nothing_written(tmp_path, {"eng"})


def test_overwrite_replaces_dir(tiny_checkpoint, tmp_path):
    (tmp_path / "eng").mkdir()
    (tmp_path / "eng" / "stale.txt").write_text("old")
    r = run_sdrt("export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "eng"),
                 "--overwrite", "--components", "text_encoder")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "eng" / "stale.txt").exists()
    assert tuple(Manifest.load(tmp_path / "eng").components) == ("text_encoder",)
    assert_nothing_written(tmp_path, {"eng"})
    # Progress: one line per component with its time and validation error.
    progress = [line for line in r.stderr.splitlines() if line.startswith("[1/1] text_encoder:")]
    assert len(progress) == 1 and " s, " in progress[0] and "max|onnx - torch|" in progress[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, sig):
    out = tmp_path / "eng"
    # A shell starts background jobs with SIGINT ignored, and children inherit that; give the export the
    # default handling a terminal user's Ctrl-C meets, whatever launched these tests.
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.runtime.cli", "export", "--checkpoint",
                             str(tiny_checkpoint), "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # Interrupt once the staging folder holds a finished graph: the middle of the export.
    while not list(tmp_path.glob(".eng.partial-*/text_encoder/model.onnx")):
        assert proc.poll() is None and time.time() < deadline, "export ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert_nothing_written(tmp_path, set())


def test_validation_failure_names_component(tiny_checkpoint, tmp_path, monkeypatch):
    from sdrt.export import validate
    from sdrt.export.exporter import ExportOptions, export

    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance("fp32", -1.0, 0.0))  # nothing can pass
    with pytest.raises(UserError, match=r"^text_encoder: fp32 ONNX output differs from torch fp32 .*fp32: -1"):
        export(ExportOptions(checkpoint=str(tiny_checkpoint), out=tmp_path / "eng",
                             components=("text_encoder",)), log=lambda s: None)
    assert_nothing_written(tmp_path, set())


def test_external_data(tiny_checkpoint, tmp_path, monkeypatch):
    """Graphs over the protobuf limit keep their weights in a `.data` file; forced here on a tiny graph."""
    import onnxruntime as ort

    from sdrt.export import onnx_export
    from sdrt.export.exporter import ExportOptions, export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    m = export(ExportOptions(checkpoint=str(tiny_checkpoint), out=tmp_path / "eng", components=("unet",)),
               log=lambda s: None)
    a = m.components["unet"].artifact()
    assert a.external_data == "unet/model.onnx.data"
    graph, data = tmp_path / "eng" / a.file, tmp_path / "eng" / a.external_data
    assert data.stat().st_size > 2 * graph.stat().st_size  # the weights moved out; small constants stay inline
    assert a.bytes == graph.stat().st_size + data.stat().st_size
    assert a.validation.max_abs_error <= a.validation.threshold  # validated through the external data
    ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])


def test_inspect(tiny_engine):
    r = run_sdrt("inspect", str(tiny_engine))
    assert r.returncode == 0, r.stderr
    for needle in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "sample[batch, 4, latent_height, "
                   "latent_width] float32", "max|err|", "MiB", "Attention"):
        assert needle in r.stdout
    assert "MISSING" not in r.stdout
    raw = run_sdrt("inspect", "--json", str(tiny_engine))
    assert json.loads(raw.stdout) == json.loads((tiny_engine / "manifest.json").read_text())


def test_inspect_bad_dir(tmp_path):
    assert_one_line_error(run_sdrt("inspect", str(tmp_path / "none")), "engine dir not found")
    assert_one_line_error(run_sdrt("inspect", str(tmp_path)), "not an sdrt engine dir")


def test_cli_without_torch():
    """Every subcommand but export starts without torch, diffusers or transformers."""
    code = ("import sys; from sdrt.runtime import cli; cli.build_parser(); import sdrt.runtime.manifest, "
            "sdrt.runtime.inspect; bad = {'torch', 'diffusers', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_subcommand_flag_has_help():
    import argparse

    from sdrt.runtime.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"export", "inspect", "generate", "bench", "build", "doctor", "serve", "warmup"}
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"sdrt {name} {action.option_strings or action.dest} has no help"


def test_every_flag_has_help():
    r = run_sdrt("export", "--help")
    assert r.returncode == 0
    for flag in ("--checkpoint", "--out", "--overwrite", "--components"):
        assert flag in r.stdout
    assert r.stdout.count("(default:") >= 2
    assert shutil.which("sdrt") is not None  # the console script is installed


def test_code_carrying_bin_weights_refused(tiny_checkpoint, tmp_path):
    """diffusers-format `.bin` weights load weights-only; a pickle that would run code is refused."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (print, ("this would run on load",))

    import torch

    torch.save({"encoder.conv_in.weight": Boom()}, ckpt / "vae" / "diffusion_pytorch_model.bin")
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"))
    assert_one_line_error(r, "refused", "pickle that carries code")
    assert "this would run on load" not in r.stdout + r.stderr
    assert_nothing_written(tmp_path, {"ckpt"})


def test_bin_weights_export(tiny_checkpoint, tmp_path):
    """A checkpoint with `.bin` (plain tensor pickle) weights exports like its safetensors twin."""
    import torch
    from safetensors.torch import load_file

    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    st = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), ckpt / "vae" / "diffusion_pytorch_model.bin")
    st.unlink()
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"), "--components", "vae_decoder")
    assert r.returncode == 0, r.stderr
    assert "safetensors" not in r.stderr  # no failed-lookup noise from the loaders
    assert Manifest.load(tmp_path / "eng").components["vae_decoder"].artifact().validation is not None
