"""`sdrt bench` on the tiny model: the report's schema, the baseline's same-weights check, refusals, and
benchmarks/compare.py. No test asserts a speed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import assert_one_line_error, run_sdrt
from sdrt.runtime.manifest import LoraRecord, Manifest

REPO = Path(__file__).resolve().parent.parent
SDRT, BASELINE = "sdrt-ort-cpu", "diffusers-torch-fp32"
TXT2IMG_STAGES = {"text_encoder", "unet_step", "vae_decoder", "overhead"}


def _bench(engine: Path, out: Path, *args: str) -> dict:
    r = run_sdrt("bench", str(engine), "--baseline", "diffusers", "--steps", "2", "--json", str(out),
                 *(() if "--backend" in args else ("--backend", "cpu")), *args)
    assert r.returncode == 0, r.stderr
    assert "end to end" in r.stdout and "ratio" in r.stdout  # the table
    assert "run 1/" in r.stderr  # progress
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report_file(tiny_engine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    _bench(tiny_engine, out, "--runs", "2", "--warmup", "1")
    return out


def _check_result(r: dict, stages: set[str], runs: int) -> None:
    assert r["end_to_end"]["median_s"] > 0 and r["end_to_end"]["p90_s"] >= r["end_to_end"]["median_s"]
    assert set(r["stages"]) == stages
    assert all(v["median_s"] > 0 and v["p90_s"] >= v["median_s"] for k, v in r["stages"].items() if k != "overhead")
    assert r["images_per_s"] == pytest.approx(1 / r["end_to_end"]["median_s"])
    assert r["cold_start_s"] >= r["cold_start"]["load_s"] + r["cold_start"]["first_image_s"] > 0
    assert r["peak_memory"]["host_rss_bytes"] > 2**20 and r["peak_memory"]["gpu_bytes"] is None  # no GPU here
    assert len(r["runs_s"]) == runs


def test_report_schema(report_file, tiny_engine):
    report = json.loads(report_file.read_text())
    assert report["benchmark"] == "sdrt-bench" and report["schema_version"] == 1
    assert {"cpu_model", "cpu_count", "platform", "python", "gpu"} <= set(report["machine"])
    assert report["versions"]["sdrt"] and report["versions"]["torch"] and report["versions"]["diffusers"]
    s = report["settings"]
    assert (s["steps"], s["scheduler"], s["height"], s["width"], s["batch"], s["runs"], s["warmup"]) == \
        (2, "pndm", 64, 64, 1, 2, 1)
    assert report["command"].startswith(f"sdrt bench {tiny_engine} --baseline diffusers")
    assert [r["name"] for r in report["results"]] == [SDRT, BASELINE]
    for r in report["results"]:
        _check_result(r, TXT2IMG_STAGES, runs=2)
        assert r["unet_calls"] == 3  # PNDM: 2 steps after one warm-up step of its PLMS history
    ratios = report["ratios"][f"{SDRT} / {BASELINE}"]
    assert set(ratios) == TXT2IMG_STAGES | {"end_to_end", "cold_start", "host_rss"}
    e2e = [r["end_to_end"]["median_s"] for r in report["results"]]
    assert ratios["end_to_end"] == pytest.approx(e2e[0] / e2e[1])
    check = report["same_weights"]
    assert check["reference"] == BASELINE and check["max_abs_error"][SDRT] <= check["threshold"]


def test_img2img_adds_the_encoder_stage(tiny_engine, tmp_path):
    image = Image.new("RGB", (80, 96), (240, 240, 230))
    ImageDraw.Draw(image).ellipse((14, 12, 50, 48), fill=(200, 30, 40))
    image.save(tmp_path / "init.png")
    report = _bench(tiny_engine, tmp_path / "i2i.json", "--init-image", str(tmp_path / "init.png"),
                    "--strength", "0.5", "--runs", "1", "--warmup", "0")
    assert (report["settings"]["width"], report["settings"]["height"]) == (80, 96)  # the picture's size
    for r in report["results"]:
        _check_result(r, TXT2IMG_STAGES | {"vae_encoder"}, runs=1)
        assert r["unet_calls"] == 2  # strength 0.5 of 2 steps: one step, plus PNDM's warm-up


def test_baseline_must_run_the_same_weights(tiny_engine, tmp_path):
    from sdrt.export.random_model import write_random_checkpoint

    other = write_random_checkpoint(tmp_path / "other", "tiny", seed=1)
    r = run_sdrt("bench", str(tiny_engine), "--baseline", "diffusers", "--checkpoint", str(other), "--steps", "2",
                 "--json", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # after the workers' progress lines
    assert last.startswith("sdrt: error: diffusers-torch-fp32 does not run the engine's weights"), r.stderr
    assert not (tmp_path / "r.json").exists()


def test_baseline_refused_without_the_export_extra(tiny_engine):
    code = ("import sys; sys.modules['torch'] = None; from sdrt.runtime.cli import main; "
            f"sys.exit(main(['bench', {str(tiny_engine)!r}, '--baseline', 'diffusers']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, "--baseline diffusers needs the export extra (torch is missing)")


@pytest.mark.parametrize(("args", "needle"), [
    (["--runs", "0"], "--runs and --batch must be at least 1"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--guidance", "-1"], "--guidance must be a number >= 0"),
    (["--width", "60"], "width 60 is not a multiple of 8"),
    (["--init-image", "/no/such.png"], "init image not found"),
    (["--json", "/no/such/dir/r.json"], "output folder /no/such/dir does not exist"),
    (["--baseline", "diffusers", "--checkpoint", "/no/such"], "is not a diffusers folder"),
])
def test_refusals(tiny_engine, args, needle):
    assert_one_line_error(run_sdrt("bench", str(tiny_engine), *args), needle)


def test_baseline_refused_for_an_engine_with_a_lora(tiny_engine, tmp_path):
    engine = shutil.copytree(tiny_engine, tmp_path / "engine")
    lora = LoraRecord(file="style.safetensors", sha256="0" * 64, format="kohya", scale=1.0,
                      modules_changed={"unet": 1, "text_encoder": 0})
    dataclasses.replace(Manifest.load(engine), loras=(lora,)).save(engine)
    assert_one_line_error(run_sdrt("bench", str(engine), "--baseline", "diffusers"), "LoRA", "style.safetensors")


def test_bench_stays_lean():
    code = ("import sys, sdrt.runtime.bench, sdrt.runtime.bench_worker; "
            "bad = {'torch', 'diffusers', 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_renders_a_table_and_a_chart(report_file, tmp_path):
    other = json.loads(report_file.read_text())
    other["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "driver": "580", "memory_bytes": 80 * 2**30}
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), str(report_file),
                        str(tmp_path / "other.json"), "--markdown", str(tmp_path / "t.md"), "--png",
                        str(tmp_path / "c.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("| machine | model | size |") and len(lines) == 2 + 4  # 2 reports x 2 contenders
    assert sum(BASELINE in ln for ln in lines) == 2 and sum("NVIDIA H100" in ln for ln in lines) == 2
    assert "x |" in lines[2] and lines[3].endswith("baseline |")
    with Image.open(tmp_path / "c.png") as chart:
        assert chart.format == "PNG" and chart.width > 500 and chart.height > 100
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), str(tmp_path / "t.md")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr


def test_without_baseline_and_one_contender_per_backend(tiny_engine, tmp_path):
    """No baseline: no ratios and no weight check. "auto" resolves to the CPU backend (OpenVINO where it is
    installed), so it is measured once."""
    out = tmp_path / "r.json"
    cpu, name = ("openvino", "sdrt-openvino-f32") if importlib.util.find_spec("openvino") else ("cpu", SDRT)
    r = run_sdrt("bench", str(tiny_engine), "--backend", "auto", cpu, "--cpu-precision", "f32", "--steps", "2",
                 "--runs", "1", "--warmup", "0", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{cpu} is {name}, already measured" in r.stderr
    report = json.loads(out.read_text())
    assert [x["name"] for x in report["results"]] == [name]
    assert report["ratios"] == {} and report["same_weights"] is None and "torch" not in report["versions"]
    _check_result(report["results"][0], TXT2IMG_STAGES, runs=1)


def test_same_weights_bar_follows_the_coarser_precision():
    from sdrt.runtime.bench import SAME_WEIGHTS_BF16, SAME_WEIGHTS_FP16, SAME_WEIGHTS_FP32, tolerance

    assert tolerance("diffusers-torch-fp32", "sdrt-ort-cpu") == SAME_WEIGHTS_FP32
    assert tolerance("diffusers-torch-fp16-sdpa", "sdrt-tensorrt") == SAME_WEIGHTS_FP16
    assert tolerance("diffusers-torch-fp32", "sdrt-openvino-bf16") == SAME_WEIGHTS_BF16
    assert tolerance("diffusers-torch-fp32", "sdrt-openvino-f32") == SAME_WEIGHTS_FP32
    # Still far below what other weights miss by (the size of the output itself).
    assert SAME_WEIGHTS_BF16[1] < 0.1
