"""Tiled VAE (runtime/vae_tiling.py) against diffusers' own AutoencoderKL.enable_tiling().

The tiny engine's VAE has sample_size 64: tiles of 8 latent cells / 64 px, stride 6 / 48, blend 16 px / 2 cells,
and its axes take 4..16 latent cells in steps of 2 (32..128 px in steps of 16). So a latent side of 14 ends in a
2-cell tile and an image side of 112 px in a 16 px tile, both below the engine's minimum: the fallback cases.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_sdrt
from PIL import Image, ImageDraw
from sdrt.runtime.manifest import Axis, Manifest
from sdrt.runtime.pipeline import Pipeline, batch_key
from sdrt.runtime.vae_tiling import accepted_size, needs_tiling, tile_sizes, tiled_decode, tiled_encode

# Max |ours - diffusers| of a fake model: the same float32 arithmetic, summed in another order.
FAKE_ATOL = 1e-5
# Max |engine tiles - diffusers' torch tiles| relative to max |diffusers|: fp32 ONNX Runtime vs torch (the export's
# own validation allows 1e-4 + 1e-4 * peak per graph).
ENGINE_RTOL = 1e-4
# Max |sdrt - diffusers| per pixel in [0, 1], as tests/test_parity.py.
PIXEL_PARITY_ATOL = 2e-3
F = 8  # the tiny VAE's scale factor
TILE_LATENT, TILE_SAMPLE = 8, 64
LATENT_AXIS = Axis(min=4, opt=8, max=16, multiple_of=2)  # the tiny engine's


# -- the pure functions, with fake models, against diffusers' own loops --------------------------------------

def _up(t):
    """Nearest upsampling by F: a decoder that commutes with cropping."""
    return np.repeat(np.repeat(t[:, :3], F, axis=-2), F, axis=-1)


def _fake_decode(t):
    """Upsampling plus a per-tile offset (the tile's mean): tiles disagree, so the blend shows."""
    return _up(t) + 0.5 * t.mean(axis=(1, 2, 3), keepdims=True)


def _pool(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // F, F, w // F, F).mean(axis=(3, 5))


def _fake_encode(x):
    m = _pool(x) + 0.5 * x.mean(axis=(1, 2, 3), keepdims=True)
    return m, 0.25 * m - 1.0


def _torch(fn):
    return lambda t: torch.from_numpy(np.ascontiguousarray(fn(t.numpy())))


def _diffusers_tiled(kind: str, x: np.ndarray, fake) -> np.ndarray:
    """diffusers' AutoencoderKL.tiled_decode / _tiled_encode themselves, run around a fake model."""
    from diffusers import AutoencoderKL

    vae = SimpleNamespace(tile_latent_min_size=TILE_LATENT, tile_sample_min_size=TILE_SAMPLE,
                          tile_overlap_factor=0.25, config=SimpleNamespace(use_post_quant_conv=False,
                                                                           use_quant_conv=False))
    vae.blend_v = lambda a, b, e: AutoencoderKL.blend_v(vae, a, b, e)
    vae.blend_h = lambda a, b, e: AutoencoderKL.blend_h(vae, a, b, e)
    if kind == "decode":
        vae.decoder = _torch(fake)
        return AutoencoderKL.tiled_decode(vae, torch.from_numpy(x), return_dict=False)[0].numpy()
    vae.encoder = _torch(lambda t: np.concatenate(fake(t), axis=1))
    return AutoencoderKL._tiled_encode(vae, torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("h, w", [(12, 16), (16, 10), (9, 8), (13, 20), (14, 14), (7, 25)])
def test_tiled_decode_matches_diffusers_loop(h, w):
    z = np.random.default_rng(h * 100 + w).standard_normal((2, 4, h, w), dtype=np.float32)
    ours = tiled_decode(z, _fake_decode, TILE_LATENT, TILE_SAMPLE)
    theirs = _diffusers_tiled("decode", z, _fake_decode)
    assert ours.shape == theirs.shape == (2, 3, h * F, w * F)
    assert float(np.abs(ours - theirs).max()) <= FAKE_ATOL
    # The tiles' offsets differ: tiling changed something.
    assert float(np.abs(ours - _fake_decode(z)).max()) > 100 * FAKE_ATOL


@pytest.mark.parametrize("h, w", [(96, 128), (128, 80), (72, 64), (112, 200)])
def test_tiled_encode_matches_diffusers_loop(h, w):
    x = np.random.default_rng(h + w).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    mean, logvar = tiled_encode(x, _fake_encode, TILE_SAMPLE, TILE_LATENT)
    theirs = _diffusers_tiled("encode", x, _fake_encode)
    assert mean.shape == logvar.shape == (2, 3, h // F, w // F)
    assert float(np.abs(np.concatenate([mean, logvar], axis=1) - theirs).max()) <= FAKE_ATOL


@pytest.mark.parametrize("axes", [None, (LATENT_AXIS, LATENT_AXIS), (Axis(12, 12, 16, 4), Axis(10, 12, 40, 2))])
def test_blend_is_seamless(axes):
    """A decoder that commutes with cropping decodes the same tiled as whole: no seam, no shift, whatever the
    windows (exact tiles, last tiles grown back, tiles grown forward past a minimum above the tile)."""
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 38), dtype=np.float32)
    calls = []

    def decode(t):
        calls.append(t.shape[-2:])
        return _up(t)

    out = tiled_decode(z, decode, TILE_LATENT, TILE_SAMPLE, axes)
    assert float(np.abs(out - _up(z)).max()) <= FAKE_ATOL
    if axes is not None:
        assert all(axes[0].check(h) and axes[1].check(w) for h, w in calls), calls


def test_refused_tile_runs_on_a_larger_window():
    """Latent rows 14 end in a 2-row tile the engine refuses (min 4): it runs on rows 10..14 and is cropped.
    Everything above its 16 output rows is diffusers' exactly; those rows differ (the model saw more)."""
    z = np.random.default_rng(1).standard_normal((1, 4, 14, 10), dtype=np.float32)
    calls = []

    def decode(t):
        calls.append(t.shape[-2:])
        return _fake_decode(t)

    ours = tiled_decode(z, decode, TILE_LATENT, TILE_SAMPLE, (LATENT_AXIS, LATENT_AXIS))
    theirs = _diffusers_tiled("decode", z, _fake_decode)
    assert calls == [(8, 8), (8, 4), (8, 8), (8, 4), (4, 8), (4, 4)]
    assert ours.shape == theirs.shape
    assert float(np.abs(ours[..., :12 * F, :] - theirs[..., :12 * F, :]).max()) <= FAKE_ATOL
    assert float(np.abs(ours[..., 12 * F:, :] - theirs[..., 12 * F:, :]).max()) > 0.01


def test_no_accepted_window_is_an_error():
    z = np.zeros((1, 4, 14, 5), np.float32)  # a width the engine refuses (min 6), too narrow to grow into
    with pytest.raises(ValueError, match="5-long VAE tile fits no size from 5 to 5"):
        tiled_decode(z, _up, TILE_LATENT, TILE_SAMPLE, (LATENT_AXIS, Axis(6, 8, 8, 2)))
    assert accepted_size(Axis(6, 8, 8, 2), 2, 14) == 6 and accepted_size(Axis(5, 8, 16, 3), 2, 14) == 6
    assert accepted_size(Axis(6, 8, 8, 2), 2, 5) is None


# -- the engine's tiles against diffusers' AutoencoderKL with enable_tiling() --------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine, "cpu")


@pytest.fixture(scope="module")
def tiled_vae(tiny_checkpoint):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_checkpoint / "vae").eval()
    vae.enable_tiling()
    return vae


def test_manifest_records_the_vae_sample_size(tiny_engine, tmp_path):
    m = Manifest.load(tiny_engine)
    assert m.vae.sample_size == 64 and tile_sizes(m) == (TILE_LATENT, TILE_SAMPLE)
    # An engine dir exported before sample_size was recorded falls back to the native size; a VAE field a
    # newer sdrt adds is skipped.
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    d = json.loads((engine / "manifest.json").read_text())
    del d["vae"]["sample_size"]
    d["vae"]["from_the_future"] = 1
    (engine / "manifest.json").write_text(json.dumps(d))
    old = Manifest.load(engine)
    assert old.vae.sample_size is None and tile_sizes(old) == (TILE_LATENT, TILE_SAMPLE)


def _engine_decode(pipe, z):
    return tiled_decode(z, lambda t: pipe.backend.run("vae_decoder", {"latent": t})[0], TILE_LATENT, TILE_SAMPLE,
                        pipe._spatial_axes("vae_decoder"))


@pytest.mark.parametrize("h, w", [(12, 16), (16, 10), (14, 12)])
def test_engine_tiled_decode_matches_diffusers(pipe, tiled_vae, h, w):
    z = np.random.default_rng(h * w).standard_normal((2, 4, h, w), dtype=np.float32)
    ours = _engine_decode(pipe, z)
    with torch.no_grad():
        theirs = tiled_vae.decode(torch.from_numpy(z)).sample.numpy()
    assert ours.shape == theirs.shape == (2, 3, h * F, w * F)
    tol = ENGINE_RTOL * float(np.abs(theirs).max())
    if h != 14:
        err = float(np.abs(ours - theirs).max())
        assert err <= tol, f"{h}x{w}: max |sdrt - diffusers| {err:.2e} (threshold {tol:.1e})"
    else:  # the fallback: a last 2-row tile decoded on a 4-row window changes its 16 px strip only
        err = float(np.abs(ours[..., :12 * F, :] - theirs[..., :12 * F, :]).max())
        assert err <= tol, f"{h}x{w} above the last strip: max |sdrt - diffusers| {err:.2e} (threshold {tol:.1e})"
        assert float(np.abs(ours[..., 12 * F:, :] - theirs[..., 12 * F:, :]).max()) > 10 * tol


@pytest.mark.parametrize("h, w", [(96, 128), (128, 80), (112, 96)])
def test_engine_tiled_encode_matches_diffusers(pipe, tiled_vae, h, w):
    x = np.random.default_rng(h + w).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
    ours = tiled_encode(x, lambda t: pipe.backend.run("vae_encoder", {"image": t}), TILE_SAMPLE, TILE_LATENT,
                        pipe._spatial_axes("vae_encoder"))
    with torch.no_grad():
        dist = tiled_vae.encode(torch.from_numpy(x)).latent_dist
    rows = 12 if h == 112 else h // F  # 112 px ends in a 16 px tile, encoded on a 32 px window: its 2 rows differ
    for name, a, b in zip(("mean", "logvar"), ours, (dist.mean.numpy(), dist.logvar.numpy())):
        assert a.shape == b.shape == (2, 4, h // F, w // F)
        tol = ENGINE_RTOL * float(np.abs(b).max())
        err = float(np.abs(a[..., :rows, :] - b[..., :rows, :]).max())
        assert err <= tol, f"{h}x{w} {name}: max |sdrt - diffusers| {err:.2e} (threshold {tol:.1e})"
        if rows < h // F:
            assert float(np.abs(a[..., rows:, :] - b[..., rows:, :]).max()) > 10 * tol


# -- the pipeline ---------------------------------------------------------------------------------------------

def _init_image(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (240, 240, 230))
    ImageDraw.Draw(im).ellipse((14, 12, w - 14, h - 16), fill=(200, 30, 40))
    return im


def _diffusers_pipeline(kind, ckpt):
    import diffusers

    ref = getattr(diffusers, kind).from_pretrained(ckpt, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.vae.enable_tiling()  # what StableDiffusionPipeline.enable_vae_tiling() does
    return ref


def test_txt2img_with_vae_tiling_matches_diffusers(pipe, tiny_checkpoint):
    latents = np.random.default_rng(4).standard_normal((1, 4, 12, 16), dtype=np.float32)
    kw = dict(steps=4, scheduler="pndm", height=96, width=128, latents=latents, output_type="np")
    ours = pipe("a red circle", "blurry", vae_tiling=True, **kw)
    untiled = pipe("a red circle", "blurry", **kw)
    ref = _diffusers_pipeline("StableDiffusionPipeline", tiny_checkpoint)  # the checkpoint's own PNDM
    theirs = ref("a red circle", negative_prompt="blurry", num_inference_steps=4, height=96, width=128,
                 latents=torch.from_numpy(latents), output_type="np").images
    err = float(np.abs(ours - theirs).max())
    assert ours.shape == theirs.shape == (1, 96, 128, 3)
    assert err <= PIXEL_PARITY_ATOL, f"max pixel diff {err:.2e}"
    assert float(np.abs(ours - untiled).max()) > 0.01  # the decode was tiled


def test_img2img_with_vae_tiling_matches_diffusers(pipe, tiny_checkpoint, shared_noise):
    image = _init_image(128, 96)
    shared_noise(8)
    ours = pipe("a red circle", steps=6, strength=0.6, scheduler="pndm", seed=8, image=image, vae_tiling=True,
                output_type="np")
    shared_noise(8)
    ref = _diffusers_pipeline("StableDiffusionImg2ImgPipeline", tiny_checkpoint)
    theirs = ref("a red circle", image=image, num_inference_steps=6, strength=0.6, output_type="np").images
    err = float(np.abs(ours - theirs).max())
    assert ours.shape == theirs.shape == (1, 96, 128, 3)
    assert err <= PIXEL_PARITY_ATOL, f"max pixel diff {err:.2e}"


@pytest.mark.parametrize("h, w", [(64, 64), (48, 64)])
def test_no_larger_than_a_tile_is_untouched(pipe, monkeypatch, h, w):
    """At or below one tile, vae_tiling changes nothing, bit for bit: one VAE call, as diffusers."""
    assert not needs_tiling(h, w, TILE_SAMPLE)
    image = _init_image(w, h)
    calls = []
    run = pipe.backend.run

    def spy(name, feeds):
        calls.append(name)
        return run(name, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    for img in (None, image):
        kw = dict(steps=3, seed=2, height=h, width=w, image=img, strength=0.5, output_type="np")
        calls.clear()
        tiled = pipe("a red circle", vae_tiling=True, **kw)
        assert calls.count("vae_decoder") == 1 and calls.count("vae_encoder") == (img is not None)
        assert np.array_equal(tiled, pipe("a red circle", **kw))


def test_vae_tiling_is_per_generation(pipe):
    """vae_tiling is not part of batch_key: generations that differ in it share UNet calls, each decoded as
    it asked."""
    a, b = (pipe.request("a red circle", steps=3, height=96, width=96, vae_tiling=t) for t in (True, False))
    assert batch_key(a, False) == batch_key(b, False)
    alone = [pipe.run([pipe.prepare(r, 5)])[0] for r in (a, b)]
    together = pipe.run([pipe.prepare(r, 5) for r in (a, b)])
    assert all(np.array_equal(x, y) for x, y in zip(alone, together))
    assert float(np.abs(together[0] - together[1]).max()) > 0.01


def test_generate_vae_tiling_flag(tiny_engine, tmp_path):
    out = tmp_path / "big.png"
    r = run_sdrt("generate", str(tiny_engine), "a red circle", "--steps", "2", "--seed", "3", "--height", "96",
                 "--width", "112", "--vae-tiling", "--backend", "cpu", "-o", str(out))
    assert r.returncode == 0, r.stderr
    pipe = Pipeline.load(tiny_engine, "cpu")
    expected = pipe("a red circle", steps=2, seed=3, height=96, width=112, vae_tiling=True)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
