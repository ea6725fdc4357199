"""Random checkpoints of every family load in diffusers' own pipelines and look like the real repositories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.export.random_model import CONFIGS, main, write_random_checkpoint

TINY_FAMILIES = ("tiny-sd2", "tiny-sd2-v", "tiny-sdxl", "tiny-taiyi")
# Weights digest of `tiny`, seed 0, computed with the SD 1.x-only random_model.py before the other families were
# added; other tests and benchmarks rely on tiny/sd15 weights staying the same.
TINY_WEIGHTS_SHA256 = "296e47e2051ea5c66586999d4e442a28c5b4cbce9006f1a8f82b3aa2805bd9ff"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    return {name: write_random_checkpoint(root / name, name, seed=0) for name in TINY_FAMILIES}


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor's component/name, dtype, shape and bytes, in sorted order."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(folder.glob("*/*.safetensors")):
        with safe_open(f, "pt") as s:
            for key in sorted(s.keys()):
                t = s.get_tensor(key)
                h.update(f"{f.parent.name}/{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def test_configs_list_every_family():
    assert set(CONFIGS) == {"tiny", "sd15", "tiny-sd2", "tiny-sd2-v", "sd21-768", "tiny-sdxl", "sdxl",
                            "tiny-taiyi", "taiyi", "ldm-sd1", "ldm-sd2-v", "ldm-sdxl", "ldm-taiyi"}


def test_tiny_weights_unchanged(tmp_path):
    assert weights_digest(write_random_checkpoint(tmp_path / "tiny", "tiny", seed=0)) == TINY_WEIGHTS_SHA256


@pytest.mark.parametrize(
    "name, pipeline, prompt, size",
    [
        ("tiny-sd2", "StableDiffusionPipeline", "a red circle", 64),
        ("tiny-sd2-v", "StableDiffusionPipeline", "a red circle", 96),  # SD 2.1's 768 vs 512, in miniature
        ("tiny-sdxl", "StableDiffusionXLPipeline", "a red circle", 64),
        ("tiny-taiyi", "StableDiffusionPipeline", "一只可爱的猫", 64),
    ],
)
def test_diffusers_loads_and_generates(checkpoints, name, pipeline, prompt, size):
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(checkpoints[name])
    assert type(pipe).__name__ == pipeline
    image = pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()


def test_sd2_schedulers(checkpoints):
    from diffusers import DDIMScheduler, PNDMScheduler

    v = DDIMScheduler.from_pretrained(checkpoints["tiny-sd2-v"] / "scheduler")
    assert v.config.prediction_type == "v_prediction" and v.config.steps_offset == 1 and not v.config.clip_sample
    base = PNDMScheduler.from_pretrained(checkpoints["tiny-sd2"] / "scheduler")
    assert base.config.prediction_type == "epsilon" and base.config.skip_prk_steps
    unet = json.loads((checkpoints["tiny-sd2"] / "unet/config.json").read_text())
    assert unet["use_linear_projection"] and unet["upcast_attention"] and unet["attention_head_dim"] == [2, 4]


def test_sd2_tokenizer_pads_with_bang(checkpoints):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(checkpoints["tiny-sd2"] / "tokenizer")
    assert tok.pad_token == "!" and tok.pad_token_id == tok.get_vocab()["!"] != tok.eos_token_id
    ids = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.eos_token_id in ids and ids[-1] == tok.pad_token_id
    text_config = json.loads((checkpoints["tiny-sd2"] / "text_encoder/config.json").read_text())
    assert text_config["hidden_act"] == "gelu" and text_config["pad_token_id"] == tok.pad_token_id


def test_sdxl_layout(checkpoints):
    from transformers import CLIPTokenizer

    folder = checkpoints["tiny-sdxl"]
    index = model_index(folder)
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["force_zeros_for_empty_prompt"] is True
    te1 = json.loads((folder / "text_encoder/config.json").read_text())
    te2 = json.loads((folder / "text_encoder_2/config.json").read_text())
    unet = json.loads((folder / "unet/config.json").read_text())
    assert te1["hidden_size"] != te2["hidden_size"] != te2["projection_dim"]
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert json.loads((folder / "vae/config.json").read_text())["scaling_factor"] == 0.13025
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["timestep_spacing"] == "leading"
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    assert tok1.pad_token_id == tok1.eos_token_id and tok2.pad_token == "!"


def test_taiyi_tokenizer_is_bert_vocab_txt(checkpoints):
    from transformers import BertTokenizer

    folder = checkpoints["tiny-taiyi"]
    assert not list(folder.rglob("tokenizer.json"))  # the real repo ships vocab.txt only
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [
        "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    index = model_index(folder)
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["tokenizer"] == ["transformers", "BertTokenizer"]

    tok = BertTokenizer.from_pretrained(folder / "tokenizer")
    assert tok.tokenize("A Photo of a CAT") == ["a", "photo", "of", "a", "cat"]
    assert tok.tokenize("一只可爱的猫") == list("一只可爱的猫")
    negative = tok.tokenize("广告, ，, ！, 。, ；, 资讯, 新闻, 水印")
    assert "[UNK]" not in negative and "，" in negative and "讯" in negative
    ids = tok("宝可梦，皮卡丘", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 512 and ids[0] == 101 and ids[8] == 102 and ids[9:] == [0] * 503
    assert tok.unk_token_id not in ids
    bert = json.loads((folder / "text_encoder/config.json").read_text())
    assert bert["vocab_size"] == len(tok) and bert["max_position_embeddings"] == 512
    unet = json.loads((folder / "unet/config.json").read_text())
    assert unet["cross_attention_dim"] == bert["hidden_size"]


def test_cli_writes_a_new_family(tmp_path, capsys):
    assert main([str(tmp_path / "sd2"), "--model", "tiny-sd2"]) == 0
    assert model_index(tmp_path / "sd2")["text_encoder"] == ["transformers", "CLIPTextModel"]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--model", "sd3"])
