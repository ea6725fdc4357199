"""Tiny-model export: engine dir layout, op budgets, dynamic shapes, assets, manifest round trip."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from sdrt.export.checkpoint import fingerprint
from sdrt.export.exporter import geometry
from sdrt.export.specs import build_specs
from sdrt.export.families import FAMILIES
from sdrt.runtime.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest

FAMILY_COMPONENTS = FAMILIES["sd1"].components

# torch fp32 vs ONNX Runtime fp32 on the tiny model at shapes the export never saw.
DYNAMIC_SHAPE_ATOL = 1e-4


def _session(engine, name):
    m = Manifest.load(engine)
    return ort.InferenceSession(str(engine / m.components[name].artifact().file), providers=["CPUExecutionProvider"])


def test_engine_dir_layout(tiny_engine, tiny_checkpoint):
    m = Manifest.load(tiny_engine)
    assert m.format_version == FORMAT_VERSION and m.family == "sd1"
    assert tuple(m.components) == FAMILY_COMPONENTS
    assert m.native_resolution == (64, 64) and m.vae_scale_factor == 8 and m.latent_channels == 4
    assert m.vae.scaling_factor == pytest.approx(0.18215)
    assert m.source["fingerprint"] == fingerprint(tiny_checkpoint)
    for key in ("sdrt", "torch", "onnx", "diffusers"):
        assert m.versions[key] != "unknown"
    for name, c in m.components.items():
        a = c.artifact("onnx", "fp32")
        assert (tiny_engine / a.file).is_file() and a.file == f"{name}/model.onnx"
        assert a.external_data is None  # tiny graphs stay in one file
        assert a.opset == 23
        assert a.validation.max_abs_error <= a.validation.threshold
        assert a.validation.shapes[c.inputs[0].name][0] == 1  # validated at batch 1, traced at batch 2
    # Nothing but the engine dir itself: no staging folders beside it.
    assert [p.name for p in tiny_engine.parent.iterdir()] == [tiny_engine.name]


def test_graph_io_matches_manifest(tiny_engine):
    m = Manifest.load(tiny_engine)
    for name, c in m.components.items():
        s = _session(tiny_engine, name)
        assert [i.name for i in s.get_inputs()] == [t.name for t in c.inputs]
        assert [o.name for o in s.get_outputs()] == [t.name for t in c.outputs]
        for i, t in zip(s.get_inputs(), c.inputs):
            assert i.type == {"float32": "tensor(float)", "int64": "tensor(int64)"}[t.dtype]
            dynamic = [isinstance(d, str) for d in t.shape]
            assert [not isinstance(d, int) for d in i.shape] == dynamic, (name, t.name, i.shape)
    unet = {t.name: t for t in m.components["unet"].inputs}
    assert unet["timestep"].dtype == "float32" and unet["timestep"].shape == ("batch",)


def _attention_modules(module) -> int:
    from diffusers.models.attention_processor import Attention

    n = sum(isinstance(x, Attention) for x in module.modules())
    return n or sum(type(x).__name__.endswith("Attention") for x in module.modules())


@pytest.mark.parametrize(
    "name, torch_name",
    [("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae"), ("vae_encoder", "vae")],
)
def test_op_budgets(tiny_engine, tiny_modules, name, torch_name):
    """Every attention block is one fused Attention node and every group norm one GroupNormalization."""
    m = Manifest.load(tiny_engine)
    counts = m.components[name].artifact().op_counts
    model = onnx.load(str(tiny_engine / m.components[name].artifact().file))
    recount = {}
    for node in model.graph.node:
        recount[node.op_type] = recount.get(node.op_type, 0) + 1
    assert counts == recount  # the manifest records the graph as written
    module = tiny_modules[torch_name]
    if name == "text_encoder":
        expected_attn, expected_gn = module.config.num_hidden_layers, 0
    else:
        part = {"vae_decoder": "decoder", "vae_encoder": "encoder"}.get(name)
        part = getattr(module, part) if part else module
        expected_attn = _attention_modules(part)
        expected_gn = sum(isinstance(x, torch.nn.GroupNorm) for x in part.modules())
    assert expected_attn > 0
    assert counts.get("Attention", 0) == expected_attn
    assert counts.get("GroupNormalization", 0) == expected_gn
    # Decomposed leftovers would mean the fusion failed somewhere.
    assert "Softmax" not in counts and "InstanceNormalization" not in counts


@pytest.mark.parametrize("name", FAMILY_COMPONENTS)
def test_dynamic_shapes(tiny_engine, tiny_modules, name):
    """Two batch sizes x two resolutions per component, against the torch module."""
    specs = build_specs(geometry(FAMILIES["sd1"], tiny_modules))
    spec = specs[name]
    module = spec.wrapper(tiny_modules).eval()
    session = _session(tiny_engine, name)
    gen = torch.Generator().manual_seed(1)
    spatial = [a for a in spec.axes if a != "batch"]
    sizes_seen = set()
    for batch in (1, 3):
        for k in (0, 1):
            sizes = {"batch": batch}
            for axis in spatial:
                ax = spec.axes[axis]
                sizes[axis] = ax.min if k == 0 else ax.max - ax.multiple_of
            inputs = spec.sample_inputs(sizes, gen)
            with torch.no_grad():
                ref = module(*inputs)
            refs = ref if isinstance(ref, tuple) else (ref,)
            outs = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})
            for o, r in zip(outs, refs):
                assert o.shape == tuple(r.shape)
                np.testing.assert_allclose(o, r.numpy(), atol=DYNAMIC_SHAPE_ATOL, rtol=0)
            sizes_seen.add(tuple(outs[0].shape))
    assert len(sizes_seen) == (4 if spatial else 2)


def test_tokenizer_json(tiny_engine, tiny_modules):
    m = Manifest.load(tiny_engine)
    tok = Tokenizer.from_file(str(tiny_engine / m.tokenizers["text_encoder"]["file"]))
    reference = tiny_modules["tokenizer"]
    assert m.tokenizers["text_encoder"]["max_length"] == 77
    for prompt in ["a red circle", "", "a photo of a cat, 红色的圆形 ünïcode", "a red circle " * 40]:
        ids = tok.encode(prompt).ids
        expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == expected
        assert len(ids) == 77 and ids[0] == m.tokenizers["text_encoder"]["bos_id"]
    long_ids = tok.encode("a red circle " * 40).ids
    assert long_ids[-1] == m.tokenizers["text_encoder"]["eos_id"]  # truncation keeps the end-of-text token
    short = tok.encode("a red circle").ids
    assert short[-1] == m.tokenizers["text_encoder"]["pad_id"]


def test_scheduler_json(tiny_engine, tiny_modules):
    m = Manifest.load(tiny_engine)
    d = json.loads((tiny_engine / m.scheduler["file"]).read_text())
    assert d["class_name"] == m.scheduler["class_name"] == "PNDMScheduler"
    assert m.scheduler["prediction_type"] == d["config"]["prediction_type"] == "epsilon"
    saved = np.asarray(d["alphas_cumprod"], dtype=np.float32)
    assert saved.shape == (1000,)
    # Bit-exact: the runtime must see torch's float32 values, not a numpy recomputation.
    assert np.array_equal(saved, tiny_modules["scheduler"].alphas_cumprod.numpy())
    assert d["config"]["steps_offset"] == 1 and d["config"]["skip_prk_steps"] is True


def test_manifest_round_trip(tiny_engine):
    text = (tiny_engine / MANIFEST_FILE).read_text()
    m = Manifest.load(tiny_engine)
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again == m
    assert m.to_json() == text  # what was written is what a reload writes back


def test_manifest_rejects_other_versions(tiny_engine, tmp_path):
    from sdrt.runtime.errors import UserError

    d = json.loads((tiny_engine / MANIFEST_FILE).read_text())
    d["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(UserError, match="format version"):
        Manifest.load(tmp_path)
