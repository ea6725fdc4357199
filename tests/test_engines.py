"""TensorRT bookkeeping without TensorRT: profiles, engine keys, `sdrt build`'s manifest updates, backend choice.

The TensorRT calls themselves (TrtBuilder, TensorRTBackend) run only on a GPU (tests/test_gpu.py); here a
`Builder` that returns fixed bytes stands in for TensorRT so that everything around the build is exercised.
"""

from __future__ import annotations

import shutil
import sys
import threading
import types
from pathlib import Path

import pytest

from sdrt.runtime import backend, gpu
from sdrt.runtime.backend_cuda import ReusedInputs
from sdrt.runtime.engines import BuildShapes, covers, engine_key, graph_sha256, matching_engines, mismatch, parse_size
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.tensorrt_build import BuildSettings, build_engines

H100 = gpu.Gpu(0, "NVIDIA H100 80GB HBM3", "9.0", 80 * 2**30)


class FakeBuilder:
    """Stands in for TensorRT: the bytes of a 'plan' that names what it was asked to build."""

    tensorrt_version, compute_capability, gpu_name = "11.4.0.106", "9.0", "NVIDIA H100 80GB HBM3"

    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on = [], fail_on

    def build(self, onnx_path: Path, profile: dict, timing_cache: Path, label: str):
        self.calls.append((onnx_path, profile))
        if self.fail_on and self.fail_on in label:
            raise UserError(f"{label}: TensorRT could not build the engine: out of memory")
        timing_cache.write_bytes(b"cache")
        return f"plan of {onnx_path.name} {sorted(profile)}".encode(), 123 << 20


@pytest.fixture
def engine_dir(tiny_engine, tmp_path) -> Path:
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    return out


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parse_size():
    assert parse_size("512x768", "--static") == (512, 768) and parse_size("640", "--min") == (640, 640)
    for bad in ("512x", "axb", "0x512", "1x2x3"):
        with pytest.raises(UserError, match="--static .* is not a size"):
            parse_size(bad, "--static")


def test_default_profiles(tiny_engine):
    m = Manifest.load(tiny_engine)  # tiny: native 64 px, latent 8, axes 4..16 latent cells in steps of 2
    shapes = BuildShapes.default(m)
    assert (shapes.min_size, shapes.opt_size, shapes.max_size) == ((32, 32), (64, 64), (128, 128))
    unet = shapes.profile("unet", m.components["unet"], m.vae_scale_factor)
    assert unet["sample"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    assert unet["timestep"] == {"min": [1], "opt": [2], "max": [8]}
    assert unet["encoder_hidden_states"]["max"] == [8, 77, 32]
    te = shapes.profile("text_encoder", m.components["text_encoder"], m.vae_scale_factor)
    assert te == {"input_ids": {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}}
    enc = shapes.profile("vae_encoder", m.components["vae_encoder"], m.vae_scale_factor)
    assert enc["image"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [4, 3, 128, 128]}


def test_static_and_range_flags(tiny_engine):
    m = Manifest.load(tiny_engine)
    s = BuildShapes.from_flags(m, static="64x96", batch=2)
    unet = s.profile("unet", m.components["unet"], m.vae_scale_factor)
    assert unet["sample"] == {k: [4, 4, 8, 12] for k in ("min", "opt", "max")}
    dec = s.profile("vae_decoder", m.components["vae_decoder"], m.vae_scale_factor)
    assert dec["latent"]["min"] == dec["latent"]["max"] == [2, 4, 8, 12]
    r = BuildShapes.from_flags(m, min_size="48x48", opt_size="64x64", max_size="96x96", max_batch=2)
    assert r.profile("unet", m.components["unet"], 8)["sample"]["max"] == [4, 4, 12, 12]
    assert "static 64x96" in s.describe() and "1..2 image" in r.describe()
    for kwargs, needle in [
        (dict(static="100x64"), "--static height 100 is outside the engine dir's range: 32..128 in steps of 16"),
        (dict(max_size="256x256"), "--max height 256 is outside"),
        (dict(min_size="96x96", opt_size="64x64"), "--min <= --opt <= --max"),
        (dict(static="64x64", max_batch=3), "cannot be combined"),
        (dict(batch=0), "--batch must be at least 1"),
        (dict(batch=5, max_batch=2), "--batch 5 exceeds --max-batch 2"),
    ]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("+", r"\+")):
            BuildShapes.from_flags(m, **kwargs)


def test_engine_key_names_everything():
    base = dict(compute_capability="9.0", tensorrt="11.4.0.106", onnx_sha256="ab" * 32, profile={"x": {"min": [1]}},
                settings={"optimization_level": 3})
    key = engine_key(**base)
    assert key.startswith("sm90-trt11.4.0.106-abababababab-") and key == engine_key(**base)
    for change in (dict(compute_capability="8.6"), dict(tensorrt="10.14.1"), dict(onnx_sha256="cd" * 32),
                   dict(profile={"x": {"min": [2]}}), dict(settings={"optimization_level": 5})):
        assert engine_key(**{**base, **change}) != key


def test_covers_names_input_and_range():
    profile = {"sample": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}}
    assert covers(profile, {"sample": (2, 4, 12, 8)}) is None
    assert covers(profile, {"sample": (2, 4, 20, 8)}) == \
        "sample: shape [2, 4, 20, 8] is outside the TensorRT profile [1, 4, 4, 4]..[8, 4, 16, 16]"


def test_build_writes_engines_and_manifest(engine_dir):
    builder = FakeBuilder()
    lines = []
    m = build_engines(engine_dir, builder, log=lines.append)
    assert len(builder.calls) == 4 and "H100" in lines[0]
    again = Manifest.load(engine_dir)
    assert again == m
    for name, c in again.components.items():
        (e,) = c.engines()
        info = e.engine
        assert e.kind == "tensorrt" and e.precision == "fp32"  # a dir without fp16 graphs builds from fp32
        assert e.file == f"{name}/engine-{info.key}.plan" and (engine_dir / e.file).read_bytes().startswith(b"plan")
        assert info.compute_capability == "9.0" and info.tensorrt == "11.4.0.106" and info.onnx == f"{name}/model.onnx"
        assert info.onnx_sha256 == graph_sha256(engine_dir, c.artifact("onnx", "fp32"))
        assert info.device_memory_bytes == 123 << 20 and info.profile
        assert matching_engines(c, "9.0", "11.4.0.106") == (e,) and not matching_engines(c, "8.6", "11.4.0.106")
    assert (engine_dir / "timing-sm90-trt11.4.0.106.cache").read_bytes() == b"cache"
    # Up to date: nothing rebuilt; --force rebuilds; another profile adds a second engine beside the first.
    build_engines(engine_dir, builder, log=lines.append)
    assert len(builder.calls) == 4 and "up to date" in lines[-2]
    build_engines(engine_dir, builder, components=("unet",), force=True, log=lines.append)
    assert len(builder.calls) == 5 and len(Manifest.load(engine_dir).components["unet"].engines()) == 1
    static = BuildShapes.from_flags(Manifest.load(engine_dir), static="64x64")
    build_engines(engine_dir, builder, static, components=("unet",), log=lines.append)
    assert len(Manifest.load(engine_dir).components["unet"].engines()) == 2
    assert "tensorrt fp32" in __import__("sdrt.runtime.inspect", fromlist=["render"]).render(
        Manifest.load(engine_dir), engine_dir)


def test_failed_build_leaves_dir_unchanged(engine_dir):
    before = _snapshot(engine_dir)
    with pytest.raises(UserError, match="unet: TensorRT could not build"):
        build_engines(engine_dir, FakeBuilder(fail_on="unet"), components=("unet",), log=lambda s: None)
    assert _snapshot(engine_dir) == before


def test_concurrent_builds_keep_both(engine_dir):
    errors = []

    def run(component):
        try:
            build_engines(engine_dir, FakeBuilder(), components=(component,), log=lambda s: None)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in ("unet", "vae_decoder", "text_encoder")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    m = Manifest.load(engine_dir)
    assert all(len(m.components[c].engines()) == 1 for c in ("unet", "vae_decoder", "text_encoder"))


def test_build_refuses_read_only_dir_and_unknown_component(engine_dir, monkeypatch):
    with pytest.raises(UserError, match="has no text_encoder_2"):
        build_engines(engine_dir, FakeBuilder(), components=("text_encoder_2",), log=lambda s: None)
    before = _snapshot(engine_dir)
    # A read-only mount (root can write anywhere else, so the mount is simulated through os.access).
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(UserError, match="is not writable: TensorRT engines are written into the engine dir"):
        build_engines(engine_dir, FakeBuilder(), log=lambda s: None)
    assert _snapshot(engine_dir) == before


def test_mismatch_lines(engine_dir):
    build_engines(engine_dir, FakeBuilder(), components=("unet",), log=lambda s: None)
    c = Manifest.load(engine_dir).components
    line = mismatch("unet", c["unet"], "8.6", "10.14.1", "NVIDIA A10")
    assert "compute 9.0 (NVIDIA H100 80GB HBM3) with TensorRT 11.4.0.106" in line
    assert "this machine has compute 8.6 (NVIDIA A10) with TensorRT 10.14.1" in line and "sdrt build" in line
    assert mismatch("vae_decoder", c["vae_decoder"], "9.0", "11.4.0.106", "H100").startswith(
        "vae_decoder has no TensorRT engine")


def _machine(monkeypatch, gpu_present=True, tensorrt=None, ort_cuda=False):
    """Pretend this machine has (or lacks) a GPU, TensorRT of a version, and onnxruntime's CUDA provider."""
    probe = gpu.GpuProbe((H100,) if gpu_present else (), "580.159.04", "13.0", None if gpu_present else "no driver")
    monkeypatch.setattr(gpu, "probe", lambda: probe)
    real_installed = gpu.installed
    monkeypatch.setattr(gpu, "installed", lambda m: bool(tensorrt) if m in ("tensorrt", "cuda.bindings")
                        else real_installed(m))
    if tensorrt:
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=tensorrt))
    from sdrt.runtime import backend_cuda

    monkeypatch.setattr(backend_cuda, "cuda_provider_problem",
                        lambda: None if ort_cuda else "the cuda backend needs onnxruntime-gpu")


def test_auto_prefers_tensorrt_then_cuda_then_openvino_then_cpu(engine_dir, monkeypatch):
    from sdrt.runtime import backend_openvino

    m = Manifest.load(engine_dir)
    _machine(monkeypatch, gpu_present=False)
    monkeypatch.setattr(backend_openvino, "openvino_problem", lambda: None)
    assert backend.resolve("auto", engine_dir, m) == "openvino"
    monkeypatch.setattr(backend_openvino, "openvino_problem", lambda: "the openvino backend needs OpenVINO")
    assert backend.resolve("auto", engine_dir, m) == "cpu"
    assert "needs an NVIDIA GPU: no driver" in backend.unavailable("cuda", engine_dir, m)
    _machine(monkeypatch, tensorrt="11.4.0.106", ort_cuda=True)
    assert backend.resolve("auto", engine_dir, m) == "cuda"  # TensorRT is there, engines are not
    assert "has no TensorRT engine" in backend.unavailable("tensorrt", engine_dir, m)
    build_engines(engine_dir, FakeBuilder(), log=lambda s: None)
    m = Manifest.load(engine_dir)
    assert backend.resolve("auto", engine_dir, m) == "tensorrt"
    _machine(monkeypatch, tensorrt="11.5.0.1", ort_cuda=False)  # a TensorRT upgrade: the plans no longer load
    assert "rebuild" in backend.unavailable("tensorrt", engine_dir, m).lower()
    assert backend.resolve("auto", engine_dir, m) == "cpu"
    _machine(monkeypatch, tensorrt=None, ort_cuda=False)
    assert backend.unavailable("tensorrt") == "the tensorrt backend needs TensorRT: pip install 'sdrt[tensorrt]'"
    with pytest.raises(UserError, match="unknown backend 'rocm'"):
        backend.make_backend("rocm", engine_dir, m)


def test_reused_inputs_only_for_read_only_same_array():
    uploads = []
    r = ReusedInputs()

    def up(a):
        uploads.append(a)
        return len(uploads)

    import numpy as np

    cond = np.ones(3, np.float32)
    cond.setflags(write=False)
    assert r.get("unet", "c", cond, up) == r.get("unet", "c", cond, up) == 1
    latents = np.ones(3, np.float32)  # writable: copied every call, it may have changed in place
    assert r.get("unet", "x", latents, up) == 2 and r.get("unet", "x", latents, up) == 3
    other = np.ones(3, np.float32)
    other.setflags(write=False)
    assert r.get("unet", "c", other, up) == 4


def test_cuda_bindings_without_driver():
    """cuda-bindings imports on a machine without a driver; its calls fail as one named line."""
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed (pip install 'sdrt[tensorrt]')")
    found = gpu._probe_cudart()
    assert found.gpus == () and "no usable CUDA driver" in found.problem
    with pytest.raises(gpu.GpuError, match=r"^CUDA cudaMalloc failed: cudaError"):
        gpu.DeviceBuffer(1024)


def test_pipeline_marks_conditioning_read_only(tiny_engine, monkeypatch):
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_engine, "cpu")
    seen = []
    run = pipe.backend.run

    def spy(name, feeds):
        if name == "unet":
            seen.append({k: v.flags.writeable for k, v in feeds.items()})
        return run(name, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    pipe("a red circle", steps=2, seed=0, output_type="np")
    assert seen and all(s == {"sample": True, "timestep": True, "encoder_hidden_states": False} for s in seen)


def test_build_settings_in_key(engine_dir):
    a = build_engines(engine_dir, FakeBuilder(), components=("unet",), settings=BuildSettings(optimization_level=3),
                      log=lambda s: None)
    b = build_engines(engine_dir, FakeBuilder(), components=("unet",), settings=BuildSettings(optimization_level=5),
                      log=lambda s: None)
    keys = {e.engine.key for e in b.components["unet"].engines()}
    assert len(keys) == 2 and a.components["unet"].engines()[0].engine.key in keys


def test_cuda_provider_problem_names_the_fix(monkeypatch):
    """Here onnxruntime is the CPU build: the line says what to install, and names a shadowed GPU build."""
    from sdrt.runtime import backend_cuda, manifest

    assert "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu" in backend_cuda.cuda_provider_problem()
    monkeypatch.setattr(manifest, "package_versions", lambda names: {"onnxruntime": "1.32.0",
                                                                     "onnxruntime-gpu": "1.31.1"})
    line = backend_cuda.cuda_provider_problem()
    assert "onnxruntime-gpu 1.31.1 is installed but the CPU build onnxruntime 1.32.0 shadows it" in line


def test_doctor_json(tiny_engine):
    import json

    from conftest import run_sdrt

    r = run_sdrt("doctor", str(tiny_engine), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["gpus"] == [] and d["gpu_problem"] and d["backends"]["cpu"] is None
    cpu = "cpu" if d["backends"]["openvino"] else "openvino"  # auto takes OpenVINO where it is installed
    assert d["engine_dir"]["auto"] == cpu and d["engine_dir"]["graphs"] == ["fp32"]
    assert "cuda backend needs an NVIDIA GPU" in d["engine_dir"]["backends"]["cuda"]
    assert run_sdrt("doctor", str(tiny_engine / "nope")).returncode == 2
