"""LoRA merge: every format against diffusers' own loader (where it still loads it) or the textbook formula."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run_sdrt
from lora_factory import (random_entries, textbook_merge, write_attn_procs, write_diffusers, write_kohya,
                          write_peft)
from sdrt.export.exporter import ExportOptions, export
from sdrt.export.lora_merge import LoraSpec
from sdrt.runtime.manifest import Manifest

# |onnx(merged) - reference| / max|reference| for the UNet and text-encoder outputs.
LORA_PARITY_RTOL = 1e-5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 500, (2, 77), generator=g),
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([700.0, 31.5]),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
    }


def _torch_outputs(unet, text_encoder):
    x = _inputs()
    with torch.no_grad():
        te = text_encoder(x["input_ids"], return_dict=False)[0].numpy()
        un = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], return_dict=False)[0].numpy()
    return te, un


def _onnx_outputs(engine):
    m, x = Manifest.load(engine), _inputs()
    run = lambda name, feeds: ort.InferenceSession(  # noqa: E731
        str(engine / m.components[name].artifact().file), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    te = run("text_encoder", {"input_ids": x["input_ids"].numpy()})
    un = run("unet", {k: x[k].numpy() for k in ("sample", "timestep", "encoder_hidden_states")})
    return te, un


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _export(ckpt, out, *loras, allow_partial=False):
    lines = []
    m = export(ExportOptions(checkpoint=str(ckpt), out=out, components=("text_encoder", "unet"),
                             loras=tuple(loras), lora_allow_partial=allow_partial), log=lines.append)
    return m, lines


def _diffusers_fused(ckpt, lora_path, scale):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ckpt, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(lora_scale=scale)
    return pipe.unet, pipe.text_encoder


def _textbook(tiny_modules, entries, scale):
    modules = {k: copy.deepcopy(tiny_modules[k]) for k in ("unet", "text_encoder")}
    textbook_merge(modules, entries, scale)
    return modules["unet"], modules["text_encoder"]


@pytest.fixture(scope="module")
def base_outputs(tiny_modules):
    return _torch_outputs(tiny_modules["unet"], tiny_modules["text_encoder"])


FORMATS = {
    # name: (writer, entries kwargs, diffusers still loads it?)
    "kohya": (lambda e, p: write_kohya(e, p / "l.safetensors"), {}, True),
    "diffusers-attn-procs": (lambda e, p: write_attn_procs(e, p / "pytorch_lora_weights.bin"),
                             dict(alpha=None, text_encoder=False, attention_only=True), False),
    "diffusers": (lambda e, p: write_diffusers(e, p / "l.safetensors"), dict(alpha=None, attention_only=True), True),
    "peft": (lambda e, p: write_peft(e, p / "l.safetensors", rank=4, alpha=2.0), dict(attention_only=True), True),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_merges_with_parity(fmt, tiny_checkpoint, tiny_modules, base_outputs, tmp_path):
    writer, kwargs, diffusers_loads = FORMATS[fmt]
    entries = random_entries(tiny_modules, seed=3, **kwargs)
    path = writer(entries, tmp_path)
    scale = 0.8
    manifest, lines = _export(tiny_checkpoint, tmp_path / "eng", LoraSpec(path, scale))
    te, unet = _onnx_outputs(tmp_path / "eng")

    ref_unet, ref_te = _textbook(tiny_modules, entries, scale)
    ref = _torch_outputs(ref_unet, ref_te)
    assert _rel(te, ref[0]) <= LORA_PARITY_RTOL and _rel(unet, ref[1]) <= LORA_PARITY_RTOL
    if diffusers_loads:
        d_unet, d_te = _diffusers_fused(tiny_checkpoint, path, scale)
        d = _torch_outputs(d_unet, d_te)
        assert _rel(unet, d[1]) <= LORA_PARITY_RTOL and _rel(te, d[0]) <= LORA_PARITY_RTOL
    # The LoRA changed what it should, visibly.
    assert _rel(unet, base_outputs[1]) > 1e-3
    assert (_rel(te, base_outputs[0]) > 1e-3) == any(e.component == "text_encoder" for e in entries)
    (record,) = manifest.loras
    n_unet = sum(e.component == "unet" for e in entries)
    n_te = len(entries) - n_unet
    assert (record.format, record.scale, record.file) == (fmt, scale, path.name)
    assert record.modules_changed == {"unet": n_unet, "text_encoder": n_te}
    assert len(record.sha256) == 64
    assert any(line == f"lora {path.name} ({fmt}) x0.8: unet {n_unet} modules, text_encoder {n_te} modules"
               for line in lines)


def test_two_loras_with_scales(tiny_checkpoint, tiny_modules, tmp_path):
    a = random_entries(tiny_modules, seed=5)
    b = random_entries(tiny_modules, seed=6, attention_only=True)
    pa, pb = write_kohya(a, tmp_path / "a.safetensors"), write_peft(b, tmp_path / "b.safetensors", 4, 2.0)
    manifest, _ = _export(tiny_checkpoint, tmp_path / "eng", LoraSpec(pa, 0.5), LoraSpec(pb, -0.3))
    modules = {k: copy.deepcopy(tiny_modules[k]) for k in ("unet", "text_encoder")}
    textbook_merge(modules, a, 0.5)
    textbook_merge(modules, b, -0.3)
    ref = _torch_outputs(modules["unet"], modules["text_encoder"])
    te, unet = _onnx_outputs(tmp_path / "eng")
    assert _rel(te, ref[0]) <= LORA_PARITY_RTOL and _rel(unet, ref[1]) <= LORA_PARITY_RTOL
    assert [(r.file, r.scale) for r in manifest.loras] == [("a.safetensors", 0.5), ("b.safetensors", -0.3)]


def test_lora_arg_parsing(tmp_path):
    assert LoraSpec.parse("x.safetensors") == LoraSpec(tmp_path.__class__("x.safetensors"), 1.0)
    assert LoraSpec.parse("dir/x.safetensors:0.7").scale == 0.7
    assert LoraSpec.parse("C:/models/x.safetensors").path.as_posix() == "C:/models/x.safetensors"


def _assert_refused(ckpt, tmp_path, lora_arg, *needles, extra=()):
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"), "--lora", lora_arg, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "eng").exists()
    assert not list(tmp_path.glob(".eng.*"))


def test_lora_for_another_family_is_refused(tiny_checkpoint, tiny_modules, tmp_path):
    # An SDXL-like LoRA: same module names, cross-attention keys of another width.
    entries = random_entries(tiny_modules, seed=1, text_encoder=False, attention_only=True)
    wide = [e if not e.module.endswith(("attn2.to_k", "attn2.to_v")) else
            type(e)(e.component, e.module, torch.randn(4, 2048), e.up, e.alpha) for e in entries]
    path = write_kohya(wide, tmp_path / "sdxl.safetensors")
    _assert_refused(tiny_checkpoint, tmp_path, str(path), "does not fit this checkpoint", "attn2_to_k",
                    "another model family")


def test_lora_matching_nothing_is_refused(tiny_checkpoint, tmp_path):
    sd = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640),
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4)}
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "sgm.safetensors")
    _assert_refused(tiny_checkpoint, tmp_path, str(tmp_path / "sgm.safetensors"), "matches nothing",
                    "lora_unet_input_blocks_4_1")


def test_leftover_keys_need_allow_partial(tiny_checkpoint, tiny_modules, tmp_path):
    from safetensors.torch import load_file, save_file

    entries = random_entries(tiny_modules, seed=2, attention_only=True)
    path = write_kohya(entries, tmp_path / "extra.safetensors")
    sd = load_file(path)
    sd["lora_unet_not_a_module.lora_down.weight"] = torch.randn(4, 8)
    sd["lora_unet_not_a_module.lora_up.weight"] = torch.randn(8, 4)
    save_file(sd, path)
    _assert_refused(tiny_checkpoint, tmp_path, str(path), "1 keys match nothing", "lora_unet_not_a_module",
                    "--lora-allow-partial")
    m, _ = _export(tiny_checkpoint, tmp_path / "eng", LoraSpec(path), allow_partial=True)
    assert m.loras[0].modules_changed["unet"] == sum(e.component == "unet" for e in entries)


@pytest.mark.parametrize("kind, needle", [("hada", "LyCORIS LoHa"), ("lokr", "LyCORIS LoKr"), ("dora", "DoRA")])
def test_unsupported_formats_named(tiny_checkpoint, tmp_path, kind, needle):
    from safetensors.torch import save_file

    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {"hada": {f"{base}.hada_w1_a": torch.randn(32, 4), f"{base}.hada_w1_b": torch.randn(4, 32)},
          "lokr": {f"{base}.lokr_w1": torch.randn(4, 4), f"{base}.lokr_w2": torch.randn(8, 8)},
          "dora": {f"{base}.lora_down.weight": torch.randn(4, 32), f"{base}.lora_up.weight": torch.randn(32, 4),
                   f"{base}.dora_scale": torch.randn(32, 1)}}[kind]
    save_file(sd, tmp_path / f"{kind}.safetensors")
    _assert_refused(tiny_checkpoint, tmp_path, str(tmp_path / f"{kind}.safetensors"), "unsupported LoRA format",
                    needle)


def test_code_carrying_pickle_is_refused(tiny_checkpoint, tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Boom()}))
    _assert_refused(tiny_checkpoint, tmp_path, str(path), "refused LoRA file", "carries code")


def test_missing_lora_file(tiny_checkpoint, tmp_path):
    _assert_refused(tiny_checkpoint, tmp_path, str(tmp_path / "none.safetensors:0.5"), "LoRA file not found")


def test_lcm_style_lora_runs_end_to_end(tiny_checkpoint, tiny_modules, tiny_engine, tmp_path):
    """A merged kohya LoRA engine runs with the lcm scheduler at 4 steps and differs from the base engine (the
    session's export of the same checkpoint without the LoRA)."""
    from sdrt.runtime.pipeline import Pipeline

    path = write_kohya(random_entries(tiny_modules, seed=9), tmp_path / "lcm_lora.safetensors")
    export(ExportOptions(checkpoint=str(tiny_checkpoint), out=tmp_path / "eng", loras=(LoraSpec(path),)),
           log=lambda s: None)
    kwargs = dict(steps=4, guidance_scale=1.0, scheduler="lcm", seed=0, output_type="np")
    merged = Pipeline.load(tmp_path / "eng", "cpu")("a red circle", **kwargs)
    base = Pipeline.load(tiny_engine, "cpu")("a red circle", **kwargs)
    assert merged.shape == base.shape == (1, 64, 64, 3) and np.isfinite(merged).all()
    assert float(np.abs(merged - base).max()) > 0.05  # a LoRA that changes nothing is a bug
