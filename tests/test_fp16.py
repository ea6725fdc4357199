"""fp16 graphs: export and validation per family, op budgets, the per-family fp32 policy, the overflow screen."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_line_error, run_sdrt
from sdrt.export.exporter import ExportOptions, export
from sdrt.export.precision import FP16_MAX, activation_peak
from sdrt.export.random_model import write_random_checkpoint
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline

# The fp16-only engine dir on the CPU backend against the fp32 dir, same seed: pixels in [0, 1]. fp16 rounding
# through 4 steps of a tiny model moves a pixel by ~1e-3; a wrong graph moves it by tenths.
FP16_IMAGE_ATOL = 2e-2


@pytest.fixture(scope="module")
def tiny_fp16(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported fp16 only; its fp32 twin is the session's `tiny_engine` (same checkpoint,
    same trace: the same fp32 graphs an fp32+fp16 export writes)."""
    out = tmp_path_factory.mktemp("fp16") / "engine"
    lines = []
    export(ExportOptions(checkpoint=str(tiny_checkpoint), out=out, precisions=("fp16",)), log=lines.append)
    return out, lines


def _fp16_only(name: str, tmp_path_factory, components: tuple[str, ...]):
    root = tmp_path_factory.mktemp(name)
    ckpt = write_random_checkpoint(root / "ckpt", name, seed=0)
    lines = []
    export(ExportOptions(checkpoint=str(ckpt), out=root / "engine", components=components, precisions=("fp16",)),
           log=lines.append)
    return root / "engine", lines


def _graph(engine, name, precision):
    a = Manifest.load(engine).components[name].artifact("onnx", precision)
    return a, onnx.load(str(engine / a.file))


def _float_initializers(model) -> dict[int, int]:
    counts: dict[int, int] = {}
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            counts[init.data_type] = counts.get(init.data_type, 0) + int(np.prod(init.dims))
    return counts


def test_fp16_graphs(tiny_fp16, tiny_engine):
    engine, lines = tiny_fp16
    m, m32 = Manifest.load(engine), Manifest.load(tiny_engine)
    assert m.kept_fp32 == {}
    for name, c in m.components.items():
        (fp16,) = c.artifacts  # fp16 only: no fp32 graph was written
        fp32 = m32.components[name].artifact("onnx", "fp32")
        assert fp16.precision == "fp16" and fp16.file == f"{name}/model.fp16.onnx"
        assert (engine / fp16.file).is_file() and not (engine / name / "model.onnx").exists()
        assert c.inputs == m32.components[name].inputs and c.outputs == m32.components[name].outputs
        v = fp16.validation
        assert v.reference == "torch fp32" and v.tolerance.startswith("fp16: ")
        assert 0 < v.max_abs_error <= v.threshold
        assert v.max_abs_error > fp32.validation.max_abs_error  # the fp16 graph really computes in fp16
        assert v.peak_activation and v.peak_activation < FP16_MAX and v.peak_module
        assert fp32.validation.tolerance.startswith("fp32: ")
    assert any("fp16 max|onnx - torch|" in line for line in lines)


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_fp16_op_budgets_and_types(tiny_fp16, tiny_engine, name):
    """The fused ops survive the cast, the weights are fp16, and the graph's I/O is the fp32 graph's."""
    engine, _ = tiny_fp16
    a32, g32 = _graph(tiny_engine, name, "fp32")
    a16, g16 = _graph(engine, name, "fp16")
    for op in ("Attention", "GroupNormalization", "LayerNormalization", "Conv", "MatMul"):
        assert a16.op_counts.get(op, 0) == a32.op_counts.get(op, 0), op
    assert a16.op_counts.get("Attention", 0) > 0
    assert "Softmax" not in a16.op_counts and "InstanceNormalization" not in a16.op_counts
    # Only Casts at the edges (and the float32 timestep embedding's) come on top of the fp32 graph.
    extra = sum(a16.op_counts.values()) - sum(a32.op_counts.values())
    assert 0 < a16.op_counts["Cast"] - a32.op_counts.get("Cast", 0) == extra <= 8
    weights = _float_initializers(g16)
    assert weights.get(onnx.TensorProto.FLOAT16, 0) > 100 * weights.get(onnx.TensorProto.FLOAT, 0)
    assert [(i.name, i.type.tensor_type.elem_type) for i in g16.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in g32.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in g16.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in g32.graph.output]
    for node in g16.graph.node:
        if node.op_type == "GroupNormalization":  # statistics in fp32 (ONNX's stash_type 1)
            assert {a.name: a.i for a in node.attribute}.get("stash_type", 1) == 1


def test_fp16_image_matches_fp32_on_cpu(tiny_fp16, tiny_engine):
    """The fp16-only dir runs on the CPU backend (ORT casts), and its picture is the fp32 dir's within fp16 noise."""
    engine, _ = tiny_fp16
    kwargs = dict(steps=4, seed=3, output_type="np")
    ours = Pipeline.load(engine, backend="cpu")("a red circle", **kwargs)
    ref = Pipeline.load(tiny_engine, backend="cpu")("a red circle", **kwargs)
    err = float(np.abs(ours - ref).max())
    assert 0 < err <= FP16_IMAGE_ATOL


def test_sd2_upcast_attention_stays_fp32(tmp_path_factory):
    """A UNet whose config says upcast_attention (SD 2.1) gets fp32 Attention nodes inside its fp16 graph."""
    engine, _ = _fp16_only("tiny-sd2", tmp_path_factory, ("unet",))
    a16, g16 = _graph(engine, "unet", "fp16")
    producers = {out: node for node in g16.graph.node for out in node.output}
    attention = [n for n in g16.graph.node if n.op_type == "Attention"]
    assert attention and a16.validation.max_abs_error <= a16.validation.threshold
    for node in attention:
        for name in node.input[:3]:  # q, k, v come from Casts to float32
            p = producers[name]
            assert p.op_type == "Cast" and {a.name: a.i for a in p.attribute}["to"] == onnx.TensorProto.FLOAT
    consumers = [n for n in g16.graph.node if attention[0].output[0] in n.input]
    assert consumers[0].op_type == "Cast"  # and back to fp16 after it


def test_sdxl_vae_stays_fp32_by_policy(tmp_path_factory):
    """The SDXL VAE's force_upcast keeps it fp32 (no fp16 graph, reason in the manifest); the pooled text encoder
    goes fp16."""
    engine, lines = _fp16_only("tiny-sdxl", tmp_path_factory, ("text_encoder_2", "vae_decoder"))
    m = Manifest.load(engine)
    assert set(m.kept_fp32) == {"vae_decoder"} and "force_upcast" in m.kept_fp32["vae_decoder"]
    assert [a.precision for a in m.components["vae_decoder"].artifacts] == ["fp32"]
    assert [a.precision for a in m.components["text_encoder_2"].artifacts] == ["fp16"]
    assert any("vae_decoder: stays fp32" in line for line in lines)


def test_taiyi_bert_fp16(tmp_path_factory):
    engine, _ = _fp16_only("tiny-taiyi", tmp_path_factory, ("text_encoder",))
    a16, g16 = _graph(engine, "text_encoder", "fp16")
    assert a16.op_counts.get("Attention", 0) == 2 and a16.validation.max_abs_error <= a16.validation.threshold


def test_overflow_keeps_component_fp32(tmp_path):
    """A VAE whose decoder activations exceed fp16's range: the screen names the module and keeps it fp32; torch
    fp16 on the CPU confirms the overflow is real."""
    from diffusers import AutoencoderKL

    ckpt = write_random_checkpoint(tmp_path / "ckpt", "tiny", seed=0)
    vae = AutoencoderKL.from_pretrained(ckpt / "vae")
    with torch.no_grad():
        # Weights fp16 can hold (8000 < 65504), sums of 36 of them it cannot; the next GroupNorm brings them back
        # to normal in fp32.
        vae.decoder.conv_in.weight.fill_(8000.0)
    vae.save_pretrained(ckpt / "vae")
    lines = []
    export(ExportOptions(checkpoint=str(ckpt), out=tmp_path / "engine", components=("vae_decoder",),
                         precisions=("fp16",)), log=lines.append)
    m = Manifest.load(tmp_path / "engine")
    assert set(m.kept_fp32) == {"vae_decoder"}
    assert "exceed fp16's 65504 from vae.decoder.conv_in on" in m.kept_fp32["vae_decoder"]
    fp32 = m.components["vae_decoder"].artifact("onnx", "fp32")
    assert fp32.validation.peak_activation > FP16_MAX and [a.precision for a in m.components["vae_decoder"].artifacts] \
        == ["fp32"]
    assert any("vae_decoder: stays fp32" in line for line in lines)
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(vae.decode(latent).sample).all()
        assert not torch.isfinite(vae.half().decode(latent.half()).sample).all()


def test_activation_peak_names_first_nan():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity())
    with torch.no_grad(), activation_peak(seq) as peak:
        seq(torch.tensor([[1.0, 2.0]]))
    assert peak[0].module in ("0", "1", "(output)") and not peak[0].overflows_fp16
    with torch.no_grad(), activation_peak(seq) as peak:
        seq(torch.tensor([[float("nan"), 2.0]]))
    assert peak[0].module == "0" and peak[0].first_overflow == "0" and peak[0].overflows_fp16


def test_precision_flag(tiny_checkpoint, tmp_path):
    r = run_sdrt("export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--precision", "fp8")
    assert r.returncode == 2 and "invalid choice: 'fp8'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="unknown precision bf16"):
        ExportOptions(checkpoint=str(tiny_checkpoint), out=tmp_path / "e", precisions=("bf16",))
    assert ExportOptions(checkpoint="x", out=tmp_path, precisions=("fp16", "fp32", "fp16")).precisions == \
        ("fp32", "fp16")


def test_inspect_and_doctor_show_fp16(tiny_fp16):
    engine, _ = tiny_fp16
    r = run_sdrt("inspect", str(engine))
    assert r.returncode == 0 and "fp16" in r.stdout and "model.fp16.onnx" in r.stdout
    r = run_sdrt("doctor", str(engine))
    assert r.returncode == 0, r.stderr
    cpu = "openvino" if importlib.util.find_spec("openvino") else "cpu"  # auto's CPU backend where it is installed
    assert "sd1, fp16 graphs" in r.stdout and f"auto   -> {cpu}" in r.stdout


def test_gpu_backends_refused_without_gpu(tiny_fp16):
    """Here (no GPU): each GPU request is one line and leaves the engine dir as it was."""
    engine, _ = tiny_fp16
    before = {p: p.stat().st_mtime_ns for p in engine.rglob("*")}
    for args, needle in [(("generate", str(engine), "a cat", "--backend", "cuda"), "cuda backend needs"),
                         (("generate", str(engine), "a cat", "--backend", "tensorrt"), "tensorrt backend needs"),
                         (("bench", str(engine), "--backend", "cuda", "--runs", "1"), "cuda backend needs"),
                         (("build", str(engine)), "TensorRT")]:
        assert_one_line_error(run_sdrt(*args), needle)
    assert {p: p.stat().st_mtime_ns for p in engine.rglob("*")} == before
