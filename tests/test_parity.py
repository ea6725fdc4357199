"""The headline check: sdrt's images equal diffusers' own pipelines on the same weights, prompts and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import unet_batches
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.schedulers import SCHEDULER_NAMES

# Max |sdrt - diffusers| per pixel in [0, 1] (the bar: a 2e-3 difference is half an 8-bit level).
PIXEL_PARITY_ATOL = 2e-3

DIFFUSERS_CLASS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
PROMPTS = ["a red circle", "a photo of a cat, 红色的圆形"]
NEGATIVE = ["blurry", ""]


def test_every_scheduler_is_covered():
    assert set(DIFFUSERS_CLASS) == set(SCHEDULER_NAMES)


@pytest.fixture(scope="module")
def sdrt_pipe(tiny_engine):
    return Pipeline.load(tiny_engine, "cpu")


def _scheduler(ckpt, name):
    import diffusers

    base = diffusers.PNDMScheduler.from_pretrained(ckpt / "scheduler")
    cls, extra = DIFFUSERS_CLASS[name]
    return getattr(diffusers, cls).from_config(base.config, **extra)


def _diffusers(kind, ckpt, name):
    import diffusers

    cls = getattr(diffusers, kind)
    # The scheduler is given at construction, as users do; the pipeline then applies its config fixes.
    pipe = cls.from_pretrained(ckpt, scheduler=_scheduler(ckpt, name), safety_checker=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_txt2img_matches_diffusers(sdrt_pipe, tiny_checkpoint, shared_noise, name):
    steps = 4 if name == "lcm" else 8
    guidance = 1.0 if name == "lcm" else 7.5  # LCM runs without guidance, as LCM-LoRA is used
    latents = np.random.default_rng(7).standard_normal((4, 4, 8, 8), dtype=np.float32)
    shared_noise(11)
    ours = sdrt_pipe(PROMPTS, NEGATIVE, steps=steps, guidance_scale=guidance, scheduler=name, seed=11,
                     num_images_per_prompt=2, latents=latents, output_type="np")
    shared_noise(11)
    ref = _diffusers("StableDiffusionPipeline", tiny_checkpoint, name)
    theirs = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                 num_images_per_prompt=2, latents=torch.from_numpy(latents), output_type="np").images
    assert ours.shape == theirs.shape == (4, 64, 64, 3)
    err = float(np.abs(ours - theirs).max())
    assert err <= PIXEL_PARITY_ATOL, f"{name}: max pixel diff {err:.2e}"
    assert float(np.abs(ours[0] - ours[2]).max()) > 0.01  # distinct prompts give distinct images


def test_ddim_eta_matches_diffusers(sdrt_pipe, tiny_checkpoint, shared_noise):
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    shared_noise(5)
    ours = sdrt_pipe(PROMPTS[0], steps=6, scheduler="ddim", eta=0.7, seed=5, latents=latents, output_type="np")
    shared_noise(5)
    ref = _diffusers("StableDiffusionPipeline", tiny_checkpoint, "ddim")
    theirs = ref(PROMPTS[0], num_inference_steps=6, eta=0.7, latents=torch.from_numpy(latents),
                 output_type="np").images
    assert float(np.abs(ours - theirs).max()) <= PIXEL_PARITY_ATOL


def _init_image() -> Image.Image:
    im = Image.new("RGB", (64, 64), (240, 240, 230))
    ImageDraw.Draw(im).ellipse((14, 12, 50, 48), fill=(200, 30, 40))
    return im


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(sdrt_pipe, tiny_checkpoint, shared_noise, name):
    image = _init_image()
    shared_noise(21)
    ours = sdrt_pipe("a red circle", "blurry", steps=10, strength=0.6, scheduler=name, seed=21, image=image,
                     output_type="np")
    shared_noise(21)
    ref = _diffusers("StableDiffusionImg2ImgPipeline", tiny_checkpoint, name)
    theirs = ref("a red circle", image=image, negative_prompt="blurry", num_inference_steps=10, strength=0.6,
                 output_type="np").images
    err = float(np.abs(ours - theirs).max())
    assert err <= PIXEL_PARITY_ATOL, f"{name}: max pixel diff {err:.2e}"


def test_guidance_off_runs_conditional_half(sdrt_pipe, monkeypatch):
    batches = unet_batches(sdrt_pipe, monkeypatch)
    sdrt_pipe("a red circle", steps=2, guidance_scale=1.0, scheduler="euler", seed=0, output_type="np")
    sdrt_pipe("a red circle", steps=2, guidance_scale=7.5, scheduler="euler", seed=0, output_type="np")
    assert batches == [1, 1, 2, 2]


def test_seed_reproducible(sdrt_pipe):
    a = sdrt_pipe("a red circle", steps=3, seed=42, scheduler="euler-a", output_type="np")
    b = sdrt_pipe("a red circle", steps=3, seed=42, scheduler="euler-a", output_type="np")
    c = sdrt_pipe("a red circle", steps=3, seed=43, scheduler="euler-a", output_type="np")
    assert np.array_equal(a, b)
    assert float(np.abs(a - c).max()) > 0.01


def test_tokenizer_matches_transformers(sdrt_pipe, tiny_modules):
    reference = tiny_modules["tokenizer"]
    prompts = ["a red circle", "", "ünïcödé café — naïve", "红色的圆形，蓝色的正方形", "a photo of a cat " * 30]
    ids = sdrt_pipe.tokenizer(prompts)
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int64 and ids.shape == (len(prompts), 77)
    assert ids.tolist() == expected
