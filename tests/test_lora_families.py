"""LoRA merge for SDXL (two text encoders, kohya SGM names) and Taiyi (BERT text encoder), against diffusers.

The modules are tiny and built in memory from the real diffusers/transformers classes: an SDXL set shaped like
diffusers' own tiny SDXL test, and a Taiyi set (the SD1 UNet layout, a transformers BertModel). The oracle is
diffusers' loader on the same weights (`pipe.load_lora_weights` + `fuse_lora`, or `unet.load_lora_adapter`
for the legacy attn-procs format that `load_lora_weights` no longer loads), and the textbook
W + scale * alpha / r * up @ down where diffusers loads nothing (BERT text-encoder keys).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lora_factory import (random_entries, textbook_merge, write_attn_procs, write_diffusers, write_kohya,
                          write_peft)
from sdrt.export.lora_merge import LoraSpec, merge_loras
from sdrt.export.lora_sgm import sgm_module_names, uses_sgm_names
from sdrt.runtime.errors import UserError

# write_peft's header lists target suffixes (`conv1`), which name more modules than the file has; peft says so.
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")

# max |W_sdrt - W_reference| over every weight of every component, after the merge (fp32; measured 0.0).
WEIGHT_ATOL = 1e-5
SCALE = 0.7
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJ, TIME_DIM = 32, 48, 40, 8  # te1 and te2 differ so a crossed key cannot fit


def _clip_config(hidden: int, proj: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=hidden,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu",
                          projection_dim=proj)


def _frozen(modules: dict) -> dict:
    for m in modules.values():
        m.eval().requires_grad_(False)
    return modules


@pytest.fixture(scope="module")
def sdxl() -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + TE2_PROJ, cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN)
    return _frozen({"unet": unet, "text_encoder": CLIPTextModel(_clip_config(TE1_HIDDEN, TE1_HIDDEN)),
                    "text_encoder_2": CLIPTextModelWithProjection(_clip_config(TE2_HIDDEN, TE2_PROJ))})


@pytest.fixture(scope="module")
def taiyi() -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64), add_pooling_layer=False)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=bert.config.hidden_size)
    return _frozen({"unet": unet, "text_encoder": bert})


def _copy(modules: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in modules.items()}


def _sdrt(modules: dict, path, allow_partial: bool = False) -> tuple[dict, object, list[str]]:
    merged, lines = _copy(modules), []
    (record,) = merge_loras((LoraSpec(path, SCALE),), merged, allow_partial, lines.append)
    return merged, record, lines


def _diffusers_sdxl(modules: dict, path) -> dict:
    from diffusers import StableDiffusionXLPipeline

    m = _copy(modules)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"],
                                     tokenizer=None, tokenizer_2=None, unet=m["unet"], scheduler=None)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go, so the module names match again
    return m


def _textbook(modules: dict, entries) -> dict:
    m = _copy(modules)
    textbook_merge(m, entries, SCALE)
    return m


def _targets(modules: dict, entries) -> dict[str, set[str]]:
    """Per component, the weights the entries should change (file names may carry CLIP's `text_model.`)."""
    out = {comp: set() for comp in modules}
    for e in entries:
        names = dict(modules[e.component].named_modules())
        out[e.component].add((e.module if e.module in names else e.module.removeprefix("text_model.")) + ".weight")
    return out


def _assert_same_weights(base: dict, merged: dict, reference: dict, entries) -> None:
    """Every weight within WEIGHT_ATOL of the reference, and exactly the entries' weights changed."""
    expected = _targets(base, entries)
    for comp in base:
        b, ours, ref = base[comp].state_dict(), merged[comp].state_dict(), reference[comp].state_dict()
        assert set(ref) == set(b), comp
        err = max(float((ours[k] - ref[k]).abs().max()) for k in b)
        assert err <= WEIGHT_ATOL, f"{comp}: max |sdrt - reference| = {err:.3g}"
        assert {k for k in b if not torch.equal(b[k], ours[k])} == expected[comp], comp


def _counts(entries, components) -> dict[str, int]:
    return {comp: sum(e.component == comp for e in entries) for comp in components}


# --- the SGM name map ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sdxl", "taiyi"])
def test_sgm_names_invert_diffusers_ldm_converter(family, request):
    """Renaming every UNet weight to its SGM name and back through diffusers' own LDM converter is the identity."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = request.getfixturevalue(family)["unet"]
    names = sgm_module_names(unet)
    ldm = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        assert module in names, f"{key} has no SGM name"
        ldm[f"model.diffusion_model.{names[module]}.{param}"] = value
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
    # SDXL's downsampler is an `op` conv and its upsampler follows the transformer; in the SD1 layout the
    # first up block has no transformer, so its upsampler is layer 1.
    if family == "sdxl":
        assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
        assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
        assert names["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == \
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    else:
        assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.1.conv"
    assert uses_sgm_names(unet) == (family == "sdxl")


# --- SDXL ---------------------------------------------------------------------------------------------------

# kohya UNet trees: sd-scripts writes SGM names; diffusers' convert_state_dict_to_kohya writes the diffusers tree.
# diffusers 0.42.1 silently drops diffusers-tree `add_embedding` kohya keys (its converter knows only SGM's
# `label_emb`), so that file leaves them out for the oracle's sake; the SGM file has every layer.
KOHYA_TREES = {"sgm": (True, ()), "diffusers": (False, ("add_embedding",))}


@pytest.mark.parametrize("tree", KOHYA_TREES)
def test_sdxl_kohya_every_layer_matches_diffusers(tree, sdxl, tmp_path):
    sgm, exclude = KOHYA_TREES[tree]
    # Every Linear/Conv2d: attention, ff, proj_in/out, resnet convs (3x3 LoCon), shortcuts, time/label
    # embeddings, down/up samplers, conv_in/out, both CLIP encoders. text_projection: not a kohya target.
    entries = random_entries(sdxl, seed=1, every_layer=True, exclude=("text_projection",) + exclude)
    path = write_kohya(entries, tmp_path / f"sdxl_{tree}.safetensors", te_prefix="lora_te1_",
                       unet_names=sgm_module_names(sdxl["unet"]) if sgm else None)
    merged, record, lines = _sdrt(sdxl, path)
    _assert_same_weights(sdxl, merged, _diffusers_sdxl(sdxl, path), entries)
    _assert_same_weights(sdxl, merged, _textbook(sdxl, entries), entries)
    counts = _counts(entries, ("unet", "text_encoder", "text_encoder_2"))
    assert min(counts.values()) > 0 and record.modules_changed == counts
    assert lines == [f"lora {path.name} (kohya) x{SCALE:g}: unet {counts['unet']} modules, text_encoder "
                     f"{counts['text_encoder']} modules, text_encoder_2 {counts['text_encoder_2']} modules"]


SDXL_FORMATS = {
    "peft": lambda e, p: write_peft(e, p / "l.safetensors", rank=4, alpha=2.0),
    "diffusers": lambda e, p: write_diffusers(e, p / "l.safetensors"),
}


@pytest.mark.parametrize("fmt", SDXL_FORMATS)
def test_sdxl_text_encoder_2_keys_match_diffusers(fmt, sdxl, tmp_path):
    """`text_encoder_2.text_model...` keys (CLIPTextModelWithProjection keeps the level CLIPTextModel lost)."""
    entries = random_entries(sdxl, seed=2, alpha=None if fmt == "diffusers" else 2.0)
    assert any(e.component == "text_encoder_2" and e.module.startswith("text_model.") for e in entries)
    path = SDXL_FORMATS[fmt](entries, tmp_path)
    merged, record, _ = _sdrt(sdxl, path)
    _assert_same_weights(sdxl, merged, _diffusers_sdxl(sdxl, path), entries)
    assert record.format == fmt and record.modules_changed == _counts(entries, ("unet", "text_encoder",
                                                                                 "text_encoder_2"))


def test_sd1_lora_into_sdxl_names_the_misfits(sdxl, taiyi, tmp_path):
    """An SD1-layout LoRA (cross-attention 32 wide) shares module names with SDXL, not shapes: refused by key."""
    path = write_kohya(random_entries(taiyi, seed=3, text_encoder=False), tmp_path / "sd1.safetensors")
    with pytest.raises(UserError) as err:
        _sdrt(sdxl, path)
    msg = str(err.value)
    assert "does not fit this checkpoint" in msg and "another model family" in msg
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k" in msg


def test_sdxl_sgm_lora_into_taiyi_matches_nothing(sdxl, taiyi, tmp_path):
    """SGM names exist only for SDXL UNets; CLIP keys do not name BERT modules; Taiyi has no text_encoder_2."""
    entries = random_entries(sdxl, seed=4, attention_only=True)
    sgm = sgm_module_names(sdxl["unet"])
    unet_only = write_kohya([e for e in entries if e.component == "unet"], tmp_path / "unet.safetensors",
                            unet_names=sgm)
    whole = write_kohya(entries, tmp_path / "sdxl.safetensors", te_prefix="lora_te1_", unet_names=sgm)
    for path, needles in ((unet_only, ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_",)),
                          (whole, ("it has no text_encoder_2", "lora_te1_text_model_encoder_layers_0_self_attn_"))):
        with pytest.raises(UserError) as err:
            _sdrt(taiyi, path)
        assert "matches nothing in this checkpoint" in str(err.value)
        assert all(n in str(err.value) for n in needles), str(err.value)


# --- Taiyi --------------------------------------------------------------------------------------------------

def test_legacy_attn_procs_into_taiyi_unet_matches_diffusers(taiyi, tmp_path):
    """`pipe.unet.load_attn_procs(file)` as the Taiyi LoRA model cards do; diffusers 0.42.1 loads it only
    through `unet.load_lora_adapter(sd, prefix=None)`, which we fuse as the oracle."""
    entries = random_entries(taiyi, seed=5, alpha=None, text_encoder=False, attention_only=True)
    path = write_attn_procs(entries, tmp_path / "pytorch_lora_weights.bin")
    merged, record, _ = _sdrt(taiyi, path)
    reference = _copy(taiyi)
    reference["unet"].load_lora_adapter(torch.load(path, weights_only=True), prefix=None, adapter_name="legacy")
    reference["unet"].fuse_lora(lora_scale=SCALE)
    reference["unet"].unload_lora()
    _assert_same_weights(taiyi, merged, reference, entries)
    _assert_same_weights(taiyi, merged, _textbook(taiyi, entries), entries)
    assert record.modules_changed == {"unet": len(entries), "text_encoder": 0}


BERT_FORMATS = {
    "kohya": lambda e, p: write_kohya(e, p / "l.safetensors"),
    "peft": lambda e, p: write_peft(e, p / "l.safetensors", rank=4, alpha=2.0),
}


@pytest.mark.parametrize("fmt", BERT_FORMATS)
def test_bert_text_encoder_keys_match_textbook(fmt, taiyi, tmp_path):
    """`lora_te_encoder_layer_0_attention_self_query` / `text_encoder.encoder.layer.0.attention.self.query`.
    diffusers cannot load PEFT keys into a BertModel ("Could not automatically infer state dict type")."""
    entries = random_entries(taiyi, seed=6)
    assert any(e.module.endswith("attention.self.query") for e in entries)
    path = BERT_FORMATS[fmt](entries, tmp_path)
    merged, record, _ = _sdrt(taiyi, path)
    _assert_same_weights(taiyi, merged, _textbook(taiyi, entries), entries)
    assert record.modules_changed == _counts(entries, ("unet", "text_encoder"))


def test_te2_keys_into_taiyi_are_named_then_skipped_only_when_allowed(sdxl, taiyi, tmp_path):
    unet = random_entries(taiyi, seed=7, text_encoder=False)
    te2 = [e for e in random_entries(sdxl, seed=7, attention_only=True) if e.component == "text_encoder_2"]
    path = write_kohya(unet + te2, tmp_path / "mixed.safetensors")
    with pytest.raises(UserError) as err:
        _sdrt(taiyi, path)
    msg = str(err.value)
    assert f"{len(te2)} keys match nothing" in msg and "it has no text_encoder_2" in msg
    assert "lora_te2_text_model_encoder_layers_0_self_attn_" in msg and "--lora-allow-partial" in msg
    merged, record, lines = _sdrt(taiyi, path, allow_partial=True)
    _assert_same_weights(taiyi, merged, _textbook(taiyi, unet), unet)
    assert record.modules_changed == {"unet": len(unet), "text_encoder": 0}
    assert f"; {len(te2)} keys skipped (--lora-allow-partial): lora_te2_" in lines[0]


def test_legacy_clip_text_encoder_keys_into_bert_are_named(taiyi, tmp_path):
    """diffusers wrote legacy text-encoder LoRA only for CLIP: those keys name CLIP modules, not BERT's."""
    from safetensors.torch import load_file, save_file

    unet = random_entries(taiyi, seed=8, alpha=None, text_encoder=False, attention_only=True)
    path = write_attn_procs(unet, tmp_path / "unet.safetensors")
    sd = {f"unet.{k}": v for k, v in load_file(path).items()}
    te_key = "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora"
    sd.update({f"{te_key}.down.weight": torch.randn(4, 32), f"{te_key}.up.weight": torch.randn(32, 4)})
    save_file(sd, tmp_path / "legacy_te.safetensors")
    with pytest.raises(UserError) as err:
        _sdrt(taiyi, tmp_path / "legacy_te.safetensors")
    assert "1 keys match nothing" in str(err.value) and te_key in str(err.value)
