"""SD 2.x (v-prediction), SDXL and Taiyi: each exports, generates, and matches diffusers' own pipelines.

Tiny random models of each family (export/random_model.py) with the real classes; diffusers' pipelines get the
same weights, prompts, starting latents and noise, and their scheduler at construction, as users pass it.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_one_line_error, run_sdrt, unet_batches
from lora_factory import random_entries, textbook_merge, write_attn_procs
from sdrt.export.exporter import ExportOptions, export
from sdrt.export.lora_merge import LoraSpec
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import MANIFEST_FILE, SDXL_TIME_IDS, Manifest
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from test_parity import DIFFUSERS_CLASS, PIXEL_PARITY_ATOL

PROMPTS = ["a red circle", "a photo of a cat"]
NEGATIVE = ["blurry", ""]
ZH_PROMPTS = ["一只可爱的猫", "飞流直下三千尺，油画"]
ZH_NEGATIVE = "广告, ，, ！, 。, ；, 资讯, 新闻, 水印"  # Taiyi's recommended negative prompt


def _reference(kind: str, ckpt, name: str | None = None, **modules):
    """diffusers' pipeline `kind` on the checkpoint, with sdrt scheduler `name`'s diffusers class (None: its own)."""
    import diffusers

    kwargs = dict(modules)
    if name is not None:
        config = diffusers.DDIMScheduler.load_config(ckpt / "scheduler")
        cls, extra = DIFFUSERS_CLASS[name]
        kwargs["scheduler"] = getattr(diffusers, cls).from_config(config, **extra)
    if "XL" in kind:
        kwargs["add_watermarker"] = False
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, kind).from_pretrained(ckpt, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diff(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def _init_image(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (240, 240, 230))
    ImageDraw.Draw(im).ellipse((w // 5, h // 6, 4 * w // 5, 3 * h // 4), fill=(200, 30, 40))
    return im


def _latents(seed: int, n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, h // 8, w // 8), dtype=np.float32)


def _txt2img_parity(kind: str, ckpt, pipe, prompt, negative, latents: np.ndarray, name: str | None = None,
                    steps: int = 6, noise=None, **settings) -> np.ndarray:
    """sdrt's text-to-image against diffusers' pipeline `kind` from the same latents (and the same per-step noise
    when `noise` is the shared_noise fixture); `settings` (guidance_scale, sizes, ...) go to both under diffusers'
    names. Returns sdrt's images."""
    if noise:
        noise(11)
    ours = pipe(prompt, negative, steps=steps, scheduler=name, seed=11, latents=latents, output_type="np",
                **settings)
    if noise:
        noise(11)
    theirs = _reference(kind, ckpt, name)(prompt, negative_prompt=negative, num_inference_steps=steps,
                                          latents=torch.from_numpy(latents), output_type="np", **settings).images
    assert _diff(ours, theirs) <= PIXEL_PARITY_ATOL, name
    return ours


@pytest.fixture(scope="module")
def sd2v(family_engine):
    ckpt, engine = family_engine("tiny-sd2-v")
    return ckpt, Pipeline.load(engine, "cpu")


@pytest.fixture(scope="module")
def sdxl(family_engine):
    ckpt, engine = family_engine("tiny-sdxl")
    return ckpt, Pipeline.load(engine, "cpu")


@pytest.fixture(scope="module")
def taiyi(family_engine):
    ckpt, engine = family_engine("tiny-taiyi")
    return ckpt, Pipeline.load(engine, "cpu")


# --- SD 2.x ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_sd2_v_prediction_under_every_scheduler(sd2v, shared_noise, name):
    ckpt, pipe = sd2v
    steps, guidance = (4, 1.0) if name == "lcm" else (8, 7.5)
    latents = _latents(7, 2, 96, 96)  # the "768" model in miniature: native 96 px, not 64
    ours = _txt2img_parity("StableDiffusionPipeline", ckpt, pipe, PROMPTS, NEGATIVE, latents, name, steps,
                           shared_noise, guidance_scale=guidance)
    assert ours.shape == (2, 96, 96, 3)


def test_sd2_manifest_and_tokenizer(sd2v, family_engine):
    ckpt, pipe = sd2v
    m = pipe.manifest
    assert (m.family, m.native_resolution, m.scheduler["prediction_type"]) == ("sd2", (96, 96), "v_prediction")
    base = Manifest.load(family_engine("tiny-sd2")[1])
    assert (base.family, base.native_resolution, base.scheduler["prediction_type"]) == ("sd2", (64, 64), "epsilon")
    # OpenCLIP pads with "!" (id 0), not with the end token as CLIP-L does.
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(ckpt / "tokenizer")
    assert m.tokenizers["text_encoder"]["pad_token"] == "!" and reference.pad_token == "!"
    prompts = ["a red circle", "", "a photo of a cat " * 30]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ids = pipe.tokenizer(prompts)
    assert ids.tolist() == expected and ids[1, -1] == reference.convert_tokens_to_ids("!")


def test_sd2_base_matches_diffusers(family_engine):
    ckpt, engine = family_engine("tiny-sd2")
    _txt2img_parity("StableDiffusionPipeline", ckpt, Pipeline.load(engine, "cpu"), "a red circle", "blurry",
                    _latents(3, 1, 64, 64))


def test_guidance_rescale_matches_diffusers(sd2v):
    ckpt, pipe = sd2v
    latents = _latents(5, 1, 96, 96)
    ours = _txt2img_parity("StableDiffusionPipeline", ckpt, pipe, PROMPTS[0], None, latents, "ddim",
                           guidance_scale=9.0, guidance_rescale=0.7)
    plain = pipe(PROMPTS[0], steps=6, guidance_scale=9.0, scheduler="ddim", latents=latents, output_type="np")
    assert _diff(ours, plain) > 10 * PIXEL_PARITY_ATOL  # the rescale did something


def _img2img_parity(kind: str, ckpt, pipe, shared_noise, name: str | None, image, prompt: str, negative=None,
                    strength: float = 0.6) -> np.ndarray:
    """sdrt's image-to-image against diffusers' pipeline `kind`, with the same noise; returns sdrt's images."""
    shared_noise(21)
    ours = pipe(prompt, negative, steps=10, strength=strength, scheduler=name, seed=21, image=image,
                output_type="np")
    shared_noise(21)
    theirs = _reference(kind, ckpt, name)(prompt, image=image, negative_prompt=negative, num_inference_steps=10,
                                          strength=strength, output_type="np").images
    assert _diff(ours, theirs) <= PIXEL_PARITY_ATOL, name
    return ours


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "euler-a"])
def test_sd2_v_img2img(sd2v, shared_noise, name):
    ckpt, pipe = sd2v
    _img2img_parity("StableDiffusionImg2ImgPipeline", ckpt, pipe, shared_noise, name, _init_image(96, 96),
                    "a red circle", "blurry")


# --- SDXL ------------------------------------------------------------------------------------------

def test_sdxl_manifest(sdxl):
    _, pipe = sdxl
    m = pipe.manifest
    c = m.conditioning
    assert m.family == "sdxl"
    assert c.text_encoders == ("text_encoder", "text_encoder_2") and c.pooled == "text_encoder_2"
    assert c.time_ids == SDXL_TIME_IDS and c.force_zeros_for_empty_prompt
    assert c.context_dim == 32 + 48  # the two encoders' widths, concatenated
    unet_inputs = [t.name for t in m.components["unet"].inputs]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.name for t in m.components["text_encoder_2"].outputs] == ["penultimate_hidden_state", "text_embeds"]
    assert m.vae.scaling_factor == pytest.approx(0.13025) and m.vae.force_upcast
    assert m.tokenizers["text_encoder_2"]["file"] == "tokenizer_2.json"
    assert m.tokenizers["text_encoder_2"]["pad_token"] == "!" and m.tokenizers["text_encoder"]["pad_token"] != "!"


@pytest.mark.parametrize("name", ["euler", "euler-a", "dpmpp-2m-karras", "ddim", "unipc"])
def test_sdxl_txt2img_non_square(sdxl, shared_noise, name):
    ckpt, pipe = sdxl
    h, w = 48, 80
    ours = _txt2img_parity("StableDiffusionXLPipeline", ckpt, pipe, PROMPTS, NEGATIVE, _latents(7, 4, h, w), name, 8,
                           shared_noise, height=h, width=w, num_images_per_prompt=2)
    assert ours.shape == (4, h, w, 3)
    assert _diff(ours[0], ours[2]) > 0.01  # distinct prompts give distinct images


@pytest.mark.parametrize("negative", [None, "", "blurry"])
def test_sdxl_negative_and_empty_prompts(sdxl, negative):
    ckpt, pipe = sdxl
    _txt2img_parity("StableDiffusionXLPipeline", ckpt, pipe, "a red circle", negative, _latents(9, 1, 64, 64))


def test_sdxl_no_negative_prompt_means_zeros(sdxl, monkeypatch):
    """force_zeros_for_empty_prompt: no negative prompt is a zero unconditional input, not the encoding of ""."""
    _, pipe = sdxl
    latents = _latents(9, 1, 64, 64)
    none = pipe("a red circle", None, steps=4, latents=latents, output_type="np")
    empty = pipe("a red circle", "", steps=4, latents=latents, output_type="np")
    assert _diff(none, empty) > 10 * PIXEL_PARITY_ATOL
    fed = []
    run = pipe.backend.run
    monkeypatch.setattr(pipe.backend, "run", lambda n, f: (fed.append((n, f)), run(n, f))[1])
    pipe("a red circle", None, steps=1, latents=latents, output_type="np")
    unet_feeds = next(f for n, f in fed if n == "unet")
    assert not unet_feeds["encoder_hidden_states"][0].any() and not unet_feeds["text_embeds"][0].any()
    assert unet_feeds["encoder_hidden_states"][1].any()


def test_sdxl_micro_conditioning_and_rescale(sdxl):
    ckpt, pipe = sdxl
    latents = _latents(4, 1, 64, 64)
    micro = dict(original_size=(128, 96), crops_coords_top_left=(8, 16), target_size=(64, 48))
    ours = _txt2img_parity("StableDiffusionXLPipeline", ckpt, pipe, "a red circle", "blurry", latents,
                           guidance_rescale=0.5, **micro)
    default = pipe("a red circle", "blurry", steps=6, guidance_rescale=0.5, latents=latents, output_type="np")
    assert _diff(ours, default) > 2 * PIXEL_PARITY_ATOL  # the sizes reach the UNet (tiny random weights: weakly)


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m"])
def test_sdxl_img2img(sdxl, shared_noise, name):
    ckpt, pipe = sdxl
    ours = _img2img_parity("StableDiffusionXLImg2ImgPipeline", ckpt, pipe, shared_noise, name, _init_image(80, 48),
                           PROMPTS[0], "blurry")
    assert ours.shape == (1, 48, 80, 3)


# --- Taiyi -----------------------------------------------------------------------------------------

def test_taiyi_tokenizer_matches_transformers(taiyi):
    from transformers import BertTokenizer

    ckpt, pipe = taiyi
    reference = BertTokenizer.from_pretrained(ckpt / "tokenizer")
    prompts = [*ZH_PROMPTS, ZH_NEGATIVE, "", "A Photo of a CAT, 红色的圆形", "宝可梦，皮卡丘" * 100]
    expected = reference(prompts, padding="max_length", max_length=512, truncation=True).input_ids
    ids = pipe.tokenizer(prompts)
    assert ids.shape == (len(prompts), 512) and ids.tolist() == expected
    assert ids[0, 0] == 101 and ids[-1, -1] == 102  # [CLS] first; an over-long prompt keeps its [SEP]
    assert len(set(ids[0, 1:7].tolist())) == 6  # one token per Chinese character


def test_taiyi_txt2img_chinese(taiyi):
    ckpt, pipe = taiyi
    assert pipe.manifest.conditioning.context_length == 512
    ours = _txt2img_parity("StableDiffusionPipeline", ckpt, pipe, ZH_PROMPTS, [ZH_NEGATIVE] * 2, _latents(2, 2, 64, 64),
                           steps=8)
    assert _diff(ours[0], ours[1]) > 0.01


def test_taiyi_img2img(taiyi, shared_noise):
    ckpt, pipe = taiyi
    _img2img_parity("StableDiffusionImg2ImgPipeline", ckpt, pipe, shared_noise, "euler-a", _init_image(64, 64),
                    ZH_PROMPTS[0], strength=0.7)


def test_seed_case_taiyi_attn_procs_lora_50_steps(taiyi, tmp_path):
    """The case sdrt was first asked for: a Taiyi model with a legacy attn-procs LoRA, a Chinese prompt, 50 steps,
    guidance 7.5. diffusers >= 0.40 no longer loads attn-procs files, so its pipeline runs on the textbook merge."""
    from diffusers import UNet2DConditionModel

    ckpt, _ = taiyi
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    entries = random_entries({"unet": unet}, alpha=None, text_encoder=False, attention_only=True, seed=5)
    lora = write_attn_procs(entries, tmp_path / "pytorch_lora_weights.bin")
    m = export(ExportOptions(checkpoint=str(ckpt), out=tmp_path / "eng", loras=(LoraSpec(lora, 1.0),)),
               log=lambda s: None)
    assert m.loras[0].format == "diffusers-attn-procs" and m.loras[0].modules_changed["unet"] == len(entries)
    merged = {"unet": copy.deepcopy(unet)}
    textbook_merge(merged, entries, 1.0)
    latents = _latents(1, 1, 64, 64)
    ours = Pipeline.load(tmp_path / "eng", "cpu")("宝可梦，皮卡丘", steps=50, guidance_scale=7.5, latents=latents,
                                           output_type="np")
    theirs = _reference("StableDiffusionPipeline", ckpt, unet=merged["unet"])(
        "宝可梦，皮卡丘", num_inference_steps=50, guidance_scale=7.5, latents=torch.from_numpy(latents),
        output_type="np").images
    base = _reference("StableDiffusionPipeline", ckpt)("宝可梦，皮卡丘", num_inference_steps=50, guidance_scale=7.5,
                                                       latents=torch.from_numpy(latents), output_type="np").images
    assert _diff(ours, theirs) <= PIXEL_PARITY_ATOL
    assert _diff(ours, base) > 10 * PIXEL_PARITY_ATOL  # the LoRA shows


# --- refusals --------------------------------------------------------------------------------------

def test_micro_conditioning_is_sdxl_only(tiny_engine):
    pipe = Pipeline.load(tiny_engine, "cpu")
    with pytest.raises(UserError, match="SDXL engines only"):
        pipe("a red circle", steps=1, original_size=(64, 64), output_type="np")
    with pytest.raises(UserError, match="crops_coords_top_left must be two non-negative integers"):
        pipe("a red circle", steps=1, crops_coords_top_left=(-1, 0), output_type="np")
    with pytest.raises(UserError, match=r"guidance_rescale must be a number in \[0, 1\]"):
        pipe("a red circle", steps=1, guidance_rescale=1.5, output_type="np")


def test_sdxl_guidance_off_runs_conditional_half(sdxl, monkeypatch):
    _, pipe = sdxl
    batches = unet_batches(pipe, monkeypatch)
    pipe("a red circle", steps=2, guidance_scale=1.0, output_type="np")
    assert batches == [1, 1]


def test_export_refuses_a_component_the_family_lacks(tiny_checkpoint, tmp_path):
    r = run_sdrt("export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "eng"),
                 "--components", "text_encoder_2")
    assert_one_line_error(r, "a sd1 checkpoint has no component text_encoder_2")
    assert not (tmp_path / "eng").exists()


def test_cli_guidance_rescale_and_inspect(sdxl, tmp_path):
    _, pipe = sdxl
    r = run_sdrt("generate", str(pipe.engine_dir), "a red circle", "--guidance-rescale", "2", "-o",
                 str(tmp_path / "a.png"))
    assert_one_line_error(r, "--guidance-rescale must be a number in [0, 1], got 2.0")
    r = run_sdrt("generate", str(pipe.engine_dir), "a red circle", "--guidance-rescale", "0.7", "--steps", "2",
                 "--seed", "1", "-o", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert "Guidance rescale: 0.7" in Image.open(tmp_path / "a.png").text["parameters"]
    shown = run_sdrt("inspect", str(pipe.engine_dir)).stdout
    assert ("conditioning text_encoder + text_encoder_2 -> [77, 80], text_embeds from text_encoder_2, time_ids (6), "
            "zeros for no negative prompt") in shown
    assert "tokenizer    text_encoder_2: tokenizer_2.json  max_length 77  pad '!'" in shown
    assert "defaults     guidance 5   steps 30 (sdrt's)" in shown  # the SDXL pipeline's guidance


# --- format version 1 ------------------------------------------------------------------------------

def test_version_1_engine_dirs_still_run(tiny_engine, tiny_checkpoint, tmp_path):
    """A dir written before families (format 1) loads and gives the same images as its re-export."""
    old = tmp_path / "v1"
    shutil.copytree(tiny_engine, old)
    d = json.loads((old / MANIFEST_FILE).read_text())
    d["format_version"] = 1
    d["tokenizer"] = d.pop("tokenizers")["text_encoder"]
    d["vae_scaling_factor"] = d.pop("vae")["scaling_factor"]
    del d["conditioning"]
    d["defaults"].pop("guidance_rescale")
    (old / MANIFEST_FILE).write_text(json.dumps(d))
    sched = json.loads((old / "scheduler.json").read_text())  # version 1 wrote the config as shipped
    sched["config"] = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    (old / "scheduler.json").write_text(json.dumps(sched))
    m = Manifest.load(old)
    assert m.conditioning == Manifest.load(tiny_engine).conditioning and m.vae.scaling_factor == pytest.approx(0.18215)
    for name in ("ddim", "pndm"):  # clip_sample and steps_offset matter to these
        a = Pipeline.load(old, "cpu")("a red circle", steps=4, scheduler=name, seed=1, output_type="np")
        b = Pipeline.load(tiny_engine, "cpu")("a red circle", steps=4, scheduler=name, seed=1, output_type="np")
        assert np.array_equal(a, b)
    d["format_version"] = 3
    (old / MANIFEST_FILE).write_text(json.dumps(d))
    r = run_sdrt("inspect", str(old))
    assert_one_line_error(r, "manifest format version 3 is not supported", "re-export the checkpoint")


def test_vae_latent_statistics_follow_diffusers():
    """A VAE with latents_mean/latents_std (diffusers' SDXL pipelines' formulas); without them, plain scaling."""
    from sdrt.runtime.manifest import VaeInfo

    x = np.random.default_rng(0).standard_normal((2, 4, 3, 5), dtype=np.float32)
    mean, std = (0.1, -0.2, 0.3, 0.0), (0.9, 1.1, 1.0, 0.5)
    vae = VaeInfo(scaling_factor=0.5, latents_mean=mean, latents_std=std)
    m, s = np.array(mean, np.float32).reshape(1, 4, 1, 1), np.array(std, np.float32).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(vae.to_latents(x), (x - m) * 0.5 / s, rtol=1e-6)  # img2img prepare_latents
    np.testing.assert_allclose(vae.from_latents(x), x * s / 0.5 + m, rtol=1e-6)  # before vae.decode
    np.testing.assert_allclose(vae.from_latents(vae.to_latents(x)), x, atol=1e-6)
    plain = VaeInfo(scaling_factor=0.13025)
    np.testing.assert_allclose(plain.to_latents(x), x * np.float32(0.13025), rtol=1e-6)
    assert plain.to_latents(x).dtype == np.float32 and vae.from_latents(x).dtype == np.float32
