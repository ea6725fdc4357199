"""The openvino backend on the engine dir's own ONNX graphs: f32 parity with ONNX Runtime, bf16 within its
measured quality bar, the compiled-model cache, static shapes, and `auto` picking it on a CPU."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'sdrt[openvino]')")

from sdrt.runtime import Pipeline  # noqa: E402
from sdrt.runtime.backend import make_backend, resolve  # noqa: E402
from sdrt.runtime.backend_openvino import CACHE_DIR, native_bf16  # noqa: E402
from sdrt.runtime.errors import UserError  # noqa: E402
from sdrt.runtime.manifest import Manifest  # noqa: E402

# f32: both compute in fp32, only the order of sums differs (measured: 2e-6 of a 1.1 UNet output).
F32_ATOL = 1e-4
# bf16: an 8-bit mantissa on every matrix product. One UNet call misses f32 by 1.5% of the output's range on the
# tiny model and 1.2% on SD 1.5 (measured); whole images are judged in test_demo and the benchmark's PSNR table.
BF16_RANGE_ERROR = 0.05
needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (avx512_bf16 or AMX)")


def _feeds(rng, component, manifest):
    out = {}
    for t in manifest.components[component].inputs:
        shape = [d if isinstance(d, int) else {"batch": 2}.get(d, manifest.components[component].axes[d].opt)
                 for d in t.shape]
        out[t.name] = (rng.integers(0, 400, shape) if t.dtype == "int64"
                       else rng.standard_normal(shape, dtype=np.float32))
    return out


@pytest.fixture(scope="module")
def engine(tiny_engine, tmp_path_factory):
    """A private copy: these tests write and delete the OpenVINO cache."""
    import shutil

    out = tmp_path_factory.mktemp("ov") / "engine"
    shutil.copytree(tiny_engine, out, ignore=shutil.ignore_patterns(CACHE_DIR, "*.ort-*"))  # others' caches
    return out


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_f32_matches_onnx_runtime(engine, component):
    manifest = Manifest.load(engine)
    ort, ov = make_backend("cpu", engine, manifest), make_backend("openvino", engine, manifest, cpu_precision="f32")
    assert ov.name == "openvino-f32"
    feeds = _feeds(np.random.default_rng(0), component, manifest)
    for a, b in zip(ort.run(component, feeds), ov.run(component, feeds)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.abs(a - b).max() <= F32_ATOL


@needs_bf16
def test_bf16_is_close_and_cached_apart_from_f32(engine):
    """f32 then bf16 on one cache: OpenVINO's cache key leaves the precision out, so a shared folder made the bf16
    load import the f32 blob and return NaN. bf16 compiles from its own fp16-weight IR, f32 from its blobs."""
    manifest = Manifest.load(engine)
    feeds = _feeds(np.random.default_rng(1), "unet", manifest)
    (f32,) = make_backend("openvino", engine, manifest, cpu_precision="f32").run("unet", feeds)
    bf16_backend = make_backend("openvino", engine, manifest, cpu_precision="bf16")
    (bf16,) = bf16_backend.run("unet", feeds)
    assert bf16_backend.name == "openvino-bf16"
    assert np.isfinite(bf16).all()
    error = np.abs(bf16 - f32).max() / np.ptp(f32)
    assert 0 < error <= BF16_RANGE_ERROR  # > 0: it really ran in bf16
    import openvino

    ir = engine / CACHE_DIR / f"ir-f16-{openvino.__version__.split('-')[0]}"
    assert sorted(p.name for p in (engine / CACHE_DIR).iterdir()) == ["f32", ir.name]
    assert sorted(p.name for p in ir.iterdir()) == sorted(f"{c}.{x}" for c in ("text_encoder", "unet", "vae_decoder")
                                                          for x in ("bin", "xml"))  # no staging folder left
    stamp = (ir / "unet.bin").stat().st_mtime_ns
    (again,) = make_backend("openvino", engine, manifest, cpu_precision="bf16").run("unet", feeds)
    assert np.array_equal(again, bf16) and (ir / "unet.bin").stat().st_mtime_ns == stamp  # read, not rewritten
    assert (ir / "unet.bin").stat().st_size < 0.6 * (engine / "unet" / "model.onnx").stat().st_size  # fp16


def test_cache_is_used_and_a_broken_blob_is_rebuilt(engine):
    manifest = Manifest.load(engine)
    feeds = _feeds(np.random.default_rng(2), "vae_decoder", manifest)
    (first,) = make_backend("openvino", engine, manifest, cpu_precision="f32").run("vae_decoder", feeds)
    blobs = sorted((engine / CACHE_DIR / "f32").glob("*.blob"))
    assert len(blobs) >= 3  # text encoder, UNet and VAE decoder were compiled at load; the encoder is lazy
    for b in blobs:
        b.write_bytes(b.read_bytes()[:100])  # a load killed while writing
    backend = make_backend("openvino", engine, manifest, cpu_precision="f32")
    (again,) = backend.run("vae_decoder", feeds)
    backend.run("vae_encoder", _feeds(np.random.default_rng(2), "vae_encoder", manifest))  # its blob too
    assert np.abs(again - first).max() <= F32_ATOL
    assert all(b.stat().st_size > 100 for b in (engine / CACHE_DIR / "f32").glob("*.blob"))


def test_read_only_engine_dir_runs_without_a_cache(engine, tmp_path, monkeypatch):
    import os
    import shutil

    ro = tmp_path / "ro"
    shutil.copytree(engine, ro, ignore=shutil.ignore_patterns(CACHE_DIR))
    # A read-only mount (root can write anywhere else, so the mount is simulated through os.access).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    backend = make_backend("openvino", ro, Manifest.load(ro), cpu_precision="f32")
    assert backend.cache_dir is None and not (ro / CACHE_DIR).exists()
    assert backend.run("unet", _feeds(np.random.default_rng(3), "unet", backend.manifest))[0].shape[0] == 2


def test_pipeline_f32_matches_onnx_runtime_images(engine):
    kwargs = dict(steps=3, seed=5, output_type="np")
    a = Pipeline.load(engine, "cpu")("a red circle", **kwargs)
    b = Pipeline.load(engine, "openvino", cpu_precision="f32")("a red circle", **kwargs)
    assert np.abs(a - b).max() <= 1e-3  # pixels in [0, 1] after 3 steps


def test_static_size_runs_that_size_and_refuses_others(engine):
    pipe = Pipeline.load(engine, "openvino", cpu_precision="f32", static_size=(64, 64, 1))
    ref = Pipeline.load(engine, "cpu")
    kwargs = dict(steps=2, seed=3, output_type="np")
    assert np.abs(pipe("a red circle", **kwargs) - ref("a red circle", **kwargs)).max() <= 1e-3
    with pytest.raises(UserError, match="unet"):
        pipe("a red circle", height=96, width=64, **kwargs)
    with pytest.raises(UserError, match="outside the engine's limits"):
        Pipeline.load(engine, "openvino", static_size=(4096, 64, 1))
    with pytest.raises(UserError, match="openvino backend"):
        Pipeline.load(engine, "cpu", static_size=(64, 64, 1))


def test_auto_picks_openvino_on_a_cpu_and_precision_is_checked(engine):
    manifest = Manifest.load(engine)
    from sdrt.runtime import gpu

    if gpu.probe().gpu is None:
        assert resolve("auto", engine, manifest) == "openvino"
        assert Pipeline.load(engine).backend.name.startswith("openvino-")
    with pytest.raises(UserError, match="needs the openvino backend"):
        make_backend("cpu", engine, manifest, cpu_precision="bf16")
    with pytest.raises(UserError, match="unknown CPU precision"):
        make_backend("openvino", engine, manifest, cpu_precision="fp8")


def test_warmup_builds_both_caches_and_times_the_cold_start(engine, tmp_path):
    import json
    import shutil

    from conftest import run_sdrt

    fresh = tmp_path / "fresh"
    shutil.copytree(engine, fresh, ignore=shutil.ignore_patterns(CACHE_DIR, "*.ort-*"))
    out = tmp_path / "warm.json"
    r = run_sdrt("warmup", str(fresh), "--backend", "cpu", "openvino", "--cpu-precision", "f32", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [x["backend"] for x in report] == ["ort-cpu", "openvino-f32"]
    for x in report:
        for run in ("first_load", "cached_load"):
            assert x[run]["load_s"] > 0 and x[run]["first_image_s"] > 0
    assert sorted(p.name for p in (fresh / CACHE_DIR).iterdir()) == ["f32"]
    assert len(list(fresh.glob("*/model.ort-*.onnx"))) == 3  # the VAE encoder waits for image-to-image
    assert "cached load" in r.stderr


def test_cli_refuses_bf16_on_onnx_runtime(engine, tmp_path):
    from conftest import assert_one_line_error, run_sdrt

    r = run_sdrt("generate", str(engine), "a red circle", "--backend", "cpu", "--cpu-precision", "bf16", "-o",
                 str(tmp_path / "x.png"))
    assert_one_line_error(r, "--cpu-precision bf16 needs the openvino backend")
    assert not (tmp_path / "x.png").exists()


def test_serve_config_takes_and_checks_the_cpu_precision(engine):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from sdrt.runtime.serve.config import on_cpu, serve_config

    assert serve_config(engine, backend="openvino", cpu_precision="f32").cpu_precision == "f32"
    assert on_cpu("openvino") and serve_config(engine, backend="openvino").max_batch == 1
    with pytest.raises(UserError, match="--cpu-precision must be one of auto, f32, bf16"):
        serve_config(engine, cpu_precision="fp8")
