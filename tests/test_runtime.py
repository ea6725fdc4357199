"""The lean runtime around the pipeline: no heavy imports, input checks, session cache, `sdrt generate`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_sdrt, unet_batches
from sdrt.runtime.backend import ATTENTION_BUDGET, OrtBackend, check_feeds
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import Manifest

HEAVY = ("torch", "diffusers", "transformers")


def test_generation_imports_no_heavy_packages(tiny_engine):
    code = (
        "import sys\n"
        "from sdrt.runtime import Pipeline\n"
        f"pipe = Pipeline.load({str(tiny_engine)!r})\n"
        "img = pipe('a red circle', steps=2, seed=0)[0]\n"
        "assert img.size == (64, 64)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_feed_checks_name_the_input(tiny_engine):
    m = Manifest.load(tiny_engine)
    unet = m.components["unet"]
    ok = {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32),
          "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    check_feeds("unet", unet, ok)
    with pytest.raises(UserError, match=r"unet\.sample: latent_height = 7 is outside the engine's range 4\.\.16, multiple of 2"):
        check_feeds("unet", unet, {**ok, "sample": np.zeros((2, 4, 7, 8), np.float32)})
    with pytest.raises(UserError, match=r"unet\.timestep: dtype int64, expected float32"):
        check_feeds("unet", unet, {**ok, "timestep": np.zeros(2, np.int64)})
    with pytest.raises(UserError, match=r"unet\.encoder_hidden_states: batch = 3 but another input has 2"):
        check_feeds("unet", unet, {**ok, "encoder_hidden_states": np.zeros((3, 77, 32), np.float32)})
    with pytest.raises(UserError, match=r"unet\.encoder_hidden_states: shape \[2, 76, 32\], expected"):
        check_feeds("unet", unet, {**ok, "encoder_hidden_states": np.zeros((2, 76, 32), np.float32)})
    with pytest.raises(UserError, match="do not match the manifest"):
        check_feeds("unet", unet, {"sample": ok["sample"]})


def test_optimized_model_cache(tiny_engine, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine, ignore=shutil.ignore_patterns("*.ort-*", "openvino-cache"))
    m = Manifest.load(engine)
    OrtBackend(engine, m)

    def caches():
        return sorted(p.relative_to(engine).as_posix() for p in engine.glob("*/model.ort-*.onnx"))

    key = f"ort-{__import__('onnxruntime').__version__}-cpu-attn{ATTENTION_BUDGET >> 20}m"
    # The VAE encoder is loaded on its first call (image-to-image): text-to-image never holds it.
    assert caches() == [f"{name}/model.{key}.onnx" for name in sorted(m.components) if name != "vae_encoder"]
    backend = OrtBackend(engine, m)  # second load reads the caches
    x = {"input_ids": np.zeros((1, 77), np.int64)}
    (out,) = backend.run("text_encoder", x)
    assert out.shape == (1, 77, 32) and np.isfinite(out).all()
    assert "vae_encoder" not in backend.sessions
    backend.run("vae_encoder", {"image": np.zeros((1, 3, 64, 64), np.float32)})
    assert caches() == [f"{name}/model.{key}.onnx" for name in sorted(m.components)]


def test_generate_writes_png_with_parameters(tiny_engine, tmp_path):
    out = tmp_path / "cat.png"
    r = run_sdrt("generate", str(tiny_engine), "a red circle", "--negative-prompt", "blurry", "--steps", "3",
                 "--seed", "5", "--scheduler", "euler", "--guidance-scale", "6.5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = Image.open(out).text["parameters"]
    assert text == ("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 6.5, Seed: 5, "
                    f"Size: 64x64, Model: {tiny_engine.name}")
    assert "denoising" in r.stderr  # the step progress bar


def test_generate_numbers_several_images_and_img2img(tiny_engine, tmp_path):
    r = run_sdrt("generate", str(tiny_engine), "a red circle", "--steps", "2", "--seed", "1", "--num-images", "2",
                 "-o", str(tmp_path / "many.png"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many-1.png", "many-2.png"]
    a, b = (np.asarray(Image.open(tmp_path / f"many-{i}.png")) for i in (1, 2))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # two different noises
    # Image 2 is seeded seed + 1, says so, and remakes alone from it.
    assert "Seed: 2," in Image.open(tmp_path / "many-2.png").text["parameters"]
    r = run_sdrt("generate", str(tiny_engine), "a red circle", "--steps", "2", "--seed", "2", "-o",
                 str(tmp_path / "alone.png"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone.png")), b)
    (tmp_path / "alone.png").unlink()
    r = run_sdrt("generate", str(tiny_engine), "a red circle", "--steps", "4", "--seed", "1", "--init-image",
                 str(tmp_path / "many-1.png"), "--strength", "0.5", "-o", str(tmp_path / "i2i.png"))
    assert r.returncode == 0, r.stderr
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i2i.png").text["parameters"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--scheduler", "heun"], "invalid choice: 'heun'"),
        (["--height", "60"], "height 60 is not a multiple of 8"),
        (["--width", "512"], "width 512 is outside the engine's limits: 32..128 in steps of 16"),
        (["--init-image", "/no/such.png"], "init image not found"),
        (["--init-image", "IMG", "--strength", "0"], "--strength must be in (0, 1]"),
        (["--init-image", "IMG", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a number >= 0, got nan"),
    ],
)
def test_generate_refusals(tiny_engine, tmp_path, args, needle):
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    args = [str(tmp_path / "init.png") if a == "IMG" else a for a in args]
    r = run_sdrt("generate", str(tiny_engine), "a red circle", "-o", str(tmp_path / "out.png"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png"]


def test_checkpoint_scheduler_without_numpy_port(tiny_engine, tmp_path):
    """A checkpoint whose own scheduler sdrt lacks needs --scheduler, and says so in one line."""
    import json
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    d = json.loads((engine / "scheduler.json").read_text())
    d["class_name"] = "HeunDiscreteScheduler"
    (engine / "scheduler.json").write_text(json.dumps(d))
    r = run_sdrt("generate", str(engine), "a red circle", "--steps", "2", "-o", str(tmp_path / "a.png"))
    assert r.returncode == 2 and "HeunDiscreteScheduler has no sdrt equivalent" in r.stderr, r.stderr
    assert not (tmp_path / "a.png").exists()
    r = run_sdrt("generate", str(engine), "a red circle", "--steps", "2", "--scheduler", "euler",
                 "-o", str(tmp_path / "b.png"))
    assert r.returncode == 0 and (tmp_path / "b.png").is_file(), r.stderr


def test_batched_generations_equal_each_alone(tiny_engine, monkeypatch):
    """Pipeline.run with several prepared generations (the server's dynamic batching): one UNet call per step
    for all of them, and each result bit-equal to its solo run, for stochastic and multistep samplers."""
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_engine, "cpu")
    init = pipe("a blue square", steps=2, seed=3)[0]
    for scheduler, image in (("euler-a", None), ("dpmpp-2m-karras", None), ("pndm", None), ("ddim", init)):
        reqs = [pipe.request(p, n, steps=4, scheduler=scheduler, guidance_scale=6.0, image=image, strength=0.6)
                for p, n in (("a red circle", None), ("a blue square", "ugly"), ("a cat", ""))]
        alone = [pipe.run([pipe.prepare(r, 10 + i, image)])[0] for i, r in enumerate(reqs)]
        with monkeypatch.context() as m:
            calls = unet_batches(pipe, m)
            together = pipe.run([pipe.prepare(r, 10 + i, image) for i, r in enumerate(reqs)])
        assert set(calls) == {6}, (scheduler, calls)  # 3 generations x [uncond, cond]
        for a, b in zip(alone, together):
            assert np.array_equal(a, b), scheduler
    other = pipe.request("x", steps=5)
    with pytest.raises(ValueError, match="batch_key"):
        pipe.run([pipe.prepare(reqs[0], 1, init), pipe.prepare(other, 2)])
