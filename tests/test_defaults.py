"""Recommended settings travel with the model: sdrt_defaults.json or `sdrt export --default-*` -> manifest
`defaults` -> Pipeline, `sdrt generate` and `sdrt inspect` when the user gives none."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_sdrt, unet_batches
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import BUILTIN_DEFAULTS, MANIFEST_FILE, GenerationDefaults, Manifest, SettingError

ENGINE_DEFAULTS = GenerationDefaults(guidance_scale=1.0, steps=3, scheduler="euler")


@pytest.fixture(scope="module")
def engine_with_defaults(tiny_engine, tmp_path_factory):
    """The tiny engine dir, recommending guidance 1 (no CFG: batch 1), 3 steps and Euler."""
    engine = tmp_path_factory.mktemp("defaults") / "engine"
    shutil.copytree(tiny_engine, engine)
    dataclasses.replace(Manifest.load(engine), defaults=ENGINE_DEFAULTS).save(engine)
    return engine


# --- the settings themselves ---------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "setting"), [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"), ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": "3"}, "guidance_scale"), ({"scheduler": ""}, "scheduler"),
])
def test_bad_settings_are_named(kwargs, setting):
    with pytest.raises(SettingError) as e:
        GenerationDefaults(**kwargs)
    assert e.value.setting == setting


def test_settings_layer_and_read_strictly():
    assert GenerationDefaults(guidance_scale=3).guidance_scale == 3.0
    assert isinstance(GenerationDefaults(guidance_scale=3).guidance_scale, float)
    assert GenerationDefaults(steps=5).over(BUILTIN_DEFAULTS) == GenerationDefaults(7.5, 5, None, 0.0)
    assert GenerationDefaults().over(ENGINE_DEFAULTS) == ENGINE_DEFAULTS
    assert GenerationDefaults.from_dict({"steps": 4}) == GenerationDefaults(steps=4)
    with pytest.raises(ValueError, match="unknown setting guidance "):
        GenerationDefaults.from_dict({"guidance": 3})


def test_manifest_carries_defaults(engine_with_defaults, tiny_engine, tmp_path):
    assert Manifest.load(engine_with_defaults).defaults == ENGINE_DEFAULTS
    assert Manifest.load(tiny_engine).defaults == GenerationDefaults()
    d = json.loads((tiny_engine / MANIFEST_FILE).read_text())
    del d["defaults"]  # written by an sdrt from before recommended settings: none
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    assert Manifest.load(tmp_path).defaults == GenerationDefaults()
    d["defaults"] = {"steps": 4, "clip_skip": 2}  # a setting from a newer sdrt: skipped, the rest kept
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    assert Manifest.load(tmp_path).defaults == GenerationDefaults(steps=4)
    d["defaults"] = {"steps": "many"}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(UserError, match="corrupt.*steps must be an integer"):
        Manifest.load(tmp_path)


# --- the runtime uses them -----------------------------------------------------------------------

def test_pipeline_uses_engine_defaults(engine_with_defaults, tiny_engine, monkeypatch):
    from sdrt.runtime import Pipeline

    # sdrt's + the checkpoint's
    assert Pipeline.load(tiny_engine, "cpu").defaults == GenerationDefaults(7.5, 30, "pndm", 0.0)
    pipe = Pipeline.load(engine_with_defaults, "cpu")
    assert pipe.defaults == ENGINE_DEFAULTS.over(BUILTIN_DEFAULTS)
    batches = unet_batches(pipe, monkeypatch)
    implicit = pipe("a red circle", seed=3, output_type="np")
    assert batches == [1, 1, 1]  # 3 Euler steps, guidance 1: the conditional half only
    explicit = pipe("a red circle", seed=3, steps=3, guidance_scale=1.0, scheduler="euler", output_type="np")
    assert np.array_equal(implicit, explicit)
    batches.clear()
    pipe("a red circle", seed=3, steps=2, guidance_scale=7.5, scheduler="ddim", output_type="np")
    assert batches == [2, 2]  # what the caller gives wins


def test_generate_and_inspect_show_engine_defaults(engine_with_defaults, tiny_engine, tmp_path):
    out = tmp_path / "a.png"
    r = run_sdrt("generate", str(engine_with_defaults), "a red circle", "--seed", "5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "Steps: 3, Sampler: Euler, CFG scale: 1.0, Seed: 5" in Image.open(out).text["parameters"]
    r = run_sdrt("generate", str(engine_with_defaults), "a red circle", "--seed", "5", "--steps", "2",
                 "--guidance-scale", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "Steps: 2, Sampler: Euler, CFG scale: 4.0, Seed: 5" in Image.open(out).text["parameters"]
    shown = run_sdrt("inspect", str(engine_with_defaults)).stdout
    assert "defaults     guidance 1   steps 3   scheduler euler   guidance rescale 0 (sdrt's)\n" in shown
    shown = run_sdrt("inspect", str(tiny_engine)).stdout
    assert "defaults     guidance 7.5 (sdrt's)   steps 30 (sdrt's)   scheduler the checkpoint's PNDMScheduler" in shown


# --- the exporter records them -------------------------------------------------------------------

def test_export_takes_checkpoint_file_then_flags(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "sdrt_defaults.json").write_text('{"guidance_scale": 4, "scheduler": "ddim"}')
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"), "--components",
                 "text_encoder", "--default-steps", "12", "--default-scheduler", "euler")
    assert r.returncode == 0, r.stderr
    assert Manifest.load(tmp_path / "eng").defaults == GenerationDefaults(4.0, 12, "euler")
    assert "recommended settings: guidance_scale 4, steps 12, scheduler euler" in r.stderr


@pytest.mark.parametrize(("content", "flags", "needle"), [
    ('{"guidance": 3}', [], "unknown setting guidance"),
    ('{"steps": 0}', [], "steps must be an integer >= 1, got 0"),
    ('{"scheduler": "heun"}', [], "unknown scheduler 'heun'"),
    ("[3, 25]", [], "expected a JSON object"),
    ("{steps: 25", [], "cannot read"),
    (None, ["--default-steps", "0"], "--default-steps must be an integer >= 1, got 0"),
    (None, ["--default-guidance", "-2"], "--default-guidance must be a number >= 0, got -2.0"),
])
def test_export_refuses_bad_defaults(tiny_checkpoint, tmp_path, content, flags, needle):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    if content is not None:
        (ckpt / "sdrt_defaults.json").write_text(content)
    r = run_sdrt("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eng"), *flags)
    assert_one_line_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
