"""`sdrt bench`: per-stage latency and memory of sdrt, with diffusers' own pipeline measured in the same run.

Each contender runs in its own worker process (`bench_worker.py`), started one after another so that cold
starts do not overlap. Before timing, a baseline must show it runs the same weights: its first-step UNet
output on shared latents equals sdrt's within SAME_WEIGHTS_*. Then runs alternate between contenders
(warm-up runs first, then measured runs), so drift on a shared machine hits every contender alike. Times are
medians and 90th percentiles over the measured runs; ratios are sdrt's median time over the baseline's.

The JSON schema is documented in benchmarks/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bench_worker import BenchSettings
from .errors import UserError
from .manifest import GenerationDefaults, Manifest, package_versions
from .schedulers import SCHEDULER_NAMES

SCHEMA_VERSION = 1
BASELINES = ("diffusers",)
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
# Same weights: max |sdrt - baseline| of the first-step UNet output <= ATOL + RTOL * max|baseline|. fp32 is the
# export's own torch-vs-ONNX Runtime bar; an fp16 baseline rounds every activation to 11 bits. Another model
# (other weights, another LoRA merged) misses by the size of the output itself.
SAME_WEIGHTS_FP32 = (1e-4, 1e-4)
SAME_WEIGHTS_FP16 = (1e-2, 2e-2)
# A bf16 contender (OpenVINO) rounds every matrix product's inputs to 8 bits: measured 1.2% of the output's range
# on SD 1.5 at 512x512 (tests/test_openvino.py bounds it at 5%).
SAME_WEIGHTS_BF16 = (1e-2, 5e-2)
STAGE_ORDER = ("text_encoder", "text_encoder_2", "vae_encoder", "unet_step", "vae_decoder", "overhead")
HEAVY_FOR_BASELINE = ("torch", "diffusers", "transformers")
SOURCE_FORMATS = ("diffusers", "single-file")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The export's source overrides the baseline repeats, so that it runs the engine dir's weights and scheduler.
BASELINE_OVERRIDES = ("vae", "prediction_type", "native_size", "tokenizer", "ema")


@dataclass(frozen=True)
class BenchRequest:
    """What the user asked for; None takes the engine dir's recommended setting (else sdrt's default)."""

    engine_dir: Path
    backends: tuple[str, ...] = ("auto",)
    baseline: str | None = None
    checkpoint: Path | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1
    steps: int | None = None
    scheduler: str | None = None
    guidance_scale: float | None = None
    init_image: Path | None = None
    strength: float = 0.8
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    runs: int = 3
    warmup: int = 1
    command: str = ""
    cpu_precision: str = "auto"
    vae_tiling: bool = False


# --- settings --------------------------------------------------------------------------------------------

def _baseline_checkpoint(req: BenchRequest, manifest: Manifest) -> Path:
    missing = [m for m in HEAVY_FOR_BASELINE if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--baseline {req.baseline} needs the export extra ({missing[0]} is missing): "
                        "pip install 'sdrt[export]'")
    if manifest.loras:
        raise UserError(f"{req.engine_dir} has LoRA weights merged in ({manifest.loras[0].file}); the baseline "
                        "would run other weights than sdrt: bench an engine dir without LoRAs")
    path = req.checkpoint or Path(manifest.source.get("path", ""))
    if req.checkpoint is None and manifest.source.get("format") not in SOURCE_FORMATS:
        raise UserError("the engine dir's source is not a checkpoint sdrt reads; give the baseline one with "
                        "--checkpoint")
    if not (path / "model_index.json").is_file() and not (path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES):
        raise UserError(f"baseline checkpoint {path} is not a diffusers folder or a single-file checkpoint "
                        "(give one with --checkpoint)")
    return path


def _baseline_options(req: BenchRequest, manifest: Manifest) -> dict:
    """How the export read its source (--vae, --tokenizer, ...): the baseline reads it the same way."""
    if req.checkpoint is not None:
        return {}
    overrides = manifest.source.get("overrides", {})
    return {k: overrides[k] for k in BASELINE_OVERRIDES if k in overrides}


def resolve_settings(req: BenchRequest, scratch: Path) -> tuple[BenchSettings, Manifest]:
    """Every setting checked and made explicit, before any worker starts; and the engine dir's manifest."""
    from . import images  # pillow and the pipeline's imports: only once a bench runs, not for `sdrt --help`
    from .pipeline import PIXEL_MULTIPLE, check_size, manifest_scheduler_config, resolve_defaults

    if req.runs < 1 or req.warmup < 0 or req.batch < 1:
        raise UserError("--runs and --batch must be at least 1, --warmup at least 0")
    if req.baseline is not None and req.baseline not in BASELINES:
        raise UserError(f"unknown baseline '{req.baseline}' (available: {', '.join(BASELINES)})")
    if not 0.0 < req.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {req.strength}")
    manifest = Manifest.load(req.engine_dir)
    defaults = resolve_defaults(manifest, manifest_scheduler_config(req.engine_dir, manifest))
    s = GenerationDefaults.from_flags({"guidance_scale": "--guidance", "steps": "--steps"}, req.guidance_scale,
                                      req.steps, req.scheduler).over(defaults)
    if s.scheduler not in SCHEDULER_NAMES:
        raise UserError(f"give --scheduler (one of: {', '.join(SCHEDULER_NAMES)}); the checkpoint's own has no "
                        "sdrt equivalent")
    checkpoint = _baseline_checkpoint(req, manifest) if req.baseline else None
    options = _baseline_options(req, manifest) if req.baseline else {}
    init = None
    if req.init_image is not None:
        image = images.load_image(req.init_image)
        h = req.height or image.height // PIXEL_MULTIPLE * PIXEL_MULTIPLE
        w = req.width or image.width // PIXEL_MULTIPLE * PIXEL_MULTIPLE
        check_size(manifest, h, w)
        init = scratch / "init.png"  # both contenders read the same picture, already at the size asked
        image.convert("RGB").resize((w, h)).save(init)
    else:
        h, w = req.height or manifest.native_resolution[0], req.width or manifest.native_resolution[1]
        check_size(manifest, h, w)
    settings = BenchSettings(engine_dir=str(req.engine_dir), checkpoint=str(checkpoint) if checkpoint else None,
                             prompt=req.prompt, negative_prompt=req.negative_prompt, height=h, width=w,
                             batch=req.batch, steps=s.steps, scheduler=s.scheduler, guidance_scale=s.guidance_scale,
                             init_image=str(init) if init else None, strength=req.strength,
                             guidance_rescale=s.guidance_rescale, checkpoint_options=options,
                             cpu_precision=req.cpu_precision, vae_tiling=req.vae_tiling)
    return settings, manifest


# --- workers ---------------------------------------------------------------------------------------------

class Worker:
    """A contender's process: started, waited for (its cold start), then driven one command at a time."""

    def __init__(self, argv: list[str], label: str, scratch: Path):
        self.label = label
        self.log = (scratch / f"{label}.log").open("w+")
        t = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        ready = self.read("ready")
        self.cold_start_s = time.perf_counter() - t
        self.name, self.load_s, self.first_image_s = ready["name"], ready["load_s"], ready["first_image_s"]

    def read(self, expected: str) -> dict:
        line = self.proc.stdout.readline()
        event = json.loads(line) if line.strip() else {"event": "died"}
        if event["event"] == "error":
            raise UserError(f"{self.label}: {event['message']}")
        if event["event"] != expected:
            self.log.seek(0)
            last = ([ln for ln in self.log.read().splitlines() if ln.strip()] or ["no output"])[-1]
            raise UserError(f"{self.label} worker failed (exit {self.proc.poll()}): {last}")
        return event

    def ask(self, expected: str, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        return self.read(expected)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _worker_argv(kind: str, settings: BenchSettings) -> list[str]:
    if kind == "diffusers":
        return [sys.executable, "-m", "sdrt.export.bench_baseline", "--settings", settings.to_json()]
    return [sys.executable, "-m", "sdrt.runtime.bench_worker", "--settings", settings.to_json(), "--backend", kind]


def tolerance(baseline: str, contender: str) -> tuple[float, float]:
    """The same-weights bar between a baseline and a contender, by the coarser of their precisions."""
    if "bf16" in contender:
        return SAME_WEIGHTS_BF16
    return SAME_WEIGHTS_FP16 if "fp16" in baseline else SAME_WEIGHTS_FP32


def same_weights(workers: list[Worker], baseline: Worker, shape: tuple[int, ...], scratch: Path) -> dict:
    """Compare every sdrt contender's first-step UNet output with the baseline's, on the same latents."""
    latents = scratch / "latents.npy"
    np.save(latents, np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    outputs = {}
    for w in workers:
        out = scratch / f"unet-{w.label}.npy"
        w.ask("done", cmd="first_unet", latents=str(latents), out=str(out))
        outputs[w] = np.load(out)
    ref = outputs[baseline]
    peak = float(np.abs(ref).max())
    others = [w for w in workers if w is not baseline]
    errors = {w.name: float(np.abs(outputs[w] - ref).max()) for w in others}
    thresholds = {w.name: (lambda atol, rtol: atol + rtol * peak)(*tolerance(baseline.name, w.name)) for w in others}
    for name, error in errors.items():
        if error > thresholds[name]:
            raise UserError(f"{baseline.name} does not run the engine's weights: first-step UNet output differs "
                            f"from {name} by {error:.3g} (threshold {thresholds[name]:.3g}); check --checkpoint")
    return {"reference": baseline.name, "max_abs_error": errors, "threshold": max(thresholds.values()),
            "thresholds": thresholds}


# --- the run ---------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict:
    return {"median_s": float(np.median(values)), "p90_s": float(np.percentile(values, 90))}


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = None
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        gpu = {"name": pynvml.nvmlDeviceGetName(h), "driver": pynvml.nvmlSystemGetDriverVersion(),
               "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)}
    except Exception:  # no nvidia-ml-py or no GPU
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "gpu": gpu}


def run_bench(req: BenchRequest, log=lambda s: print(s, file=sys.stderr)) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdrt-bench-") as tmp:
        scratch = Path(tmp)
        settings, m = resolve_settings(req, scratch)
        from .backend import unavailable

        for kind in dict.fromkeys(req.backends):  # before any worker starts: one line, no progress
            if kind != "auto" and (problem := unavailable(kind, Path(req.engine_dir), m)):
                raise UserError(problem)
        kinds = list(dict.fromkeys(req.backends)) + ([req.baseline] if req.baseline else [])
        workers: list[Worker] = []
        try:
            for kind in kinds:
                log(f"sdrt bench: starting {kind} (load + first image)")
                worker = Worker(_worker_argv(kind, settings), kind, scratch)
                workers.append(worker)
                if worker.name in [w.name for w in workers[:-1]]:  # "auto" resolved to a backend already listed
                    workers.pop().close()
                    log(f"sdrt bench: {kind} is {worker.name}, already measured")
                    continue
                log(f"sdrt bench: {worker.name} ready, cold start {worker.cold_start_s:.2f} s")
            baseline = workers[-1] if req.baseline else None
            check = None
            if baseline is not None:
                shape = (1, m.latent_channels, settings.height // m.vae_scale_factor, settings.width // m.vae_scale_factor)
                check = same_weights(workers, baseline, shape, scratch)
            runs: dict[Worker, list[dict]] = {w: [] for w in workers}
            for i in range(req.warmup + req.runs):
                label = f"warm-up {i + 1}/{req.warmup}" if i < req.warmup else f"run {i - req.warmup + 1}/{req.runs}"
                for w in workers:
                    runs[w].append(w.ask("result", cmd="run", seed=i + 1))
                log(f"sdrt bench: {label}: " + ", ".join(f"{w.name} {runs[w][-1]['end_to_end_s']:.3f} s"
                                                         for w in workers))
            peaks = {w: w.ask("bye", cmd="exit") for w in workers}
        finally:
            for w in workers:
                w.close()
    results = [_result(w, runs[w][req.warmup:], peaks[w], settings.batch) for w in workers]
    return {
        "benchmark": "sdrt-bench",
        "schema_version": SCHEMA_VERSION,
        "machine": _machine(),
        "versions": package_versions(["sdrt", "numpy", "onnxruntime", "openvino"]
                                     + (list(HEAVY_FOR_BASELINE) if req.baseline else [])),
        "settings": {**settings.__dict__, "model": Path(req.engine_dir).resolve().name, "runs": req.runs,
                     "warmup": req.warmup, "init_image": str(req.init_image) if req.init_image else None},
        "command": req.command,
        "same_weights": check,
        "results": results,
        "ratios": _ratios(results[:-1], results[-1]) if req.baseline else {},
    }


def _result(w: Worker, runs: list[dict], peak: dict, batch: int) -> dict:
    stages = [name for name in STAGE_ORDER if name in runs[0]["stages"]]
    end_to_end = _summary([r["end_to_end_s"] for r in runs])
    return {
        "name": w.name,
        "end_to_end": end_to_end,
        "images_per_s": batch / end_to_end["median_s"],
        "stages": {name: _summary([r["stages"][name] for r in runs]) for name in stages},
        "unet_calls": runs[0]["unet_calls"],  # per generation: a UNet step's time times this is the UNet's share
        "cold_start_s": w.cold_start_s,
        # start_s: interpreter start and imports, the rest of the cold start
        "cold_start": {"start_s": w.cold_start_s - w.load_s - w.first_image_s, "load_s": w.load_s,
                       "first_image_s": w.first_image_s},
        "peak_memory": {"host_rss_bytes": peak["peak_rss_bytes"], "gpu_bytes": peak["peak_gpu_bytes"]},
        "runs_s": [r["end_to_end_s"] for r in runs],
    }


def _ratios(contenders: list[dict], baseline: dict) -> dict:
    """sdrt's median time over the baseline's, per stage (< 1: sdrt is faster)."""
    out = {}
    for c in contenders:
        r = {"end_to_end": c["end_to_end"]["median_s"] / baseline["end_to_end"]["median_s"],
             "cold_start": c["cold_start_s"] / baseline["cold_start_s"],
             "host_rss": c["peak_memory"]["host_rss_bytes"] / baseline["peak_memory"]["host_rss_bytes"]}
        for name, st in c["stages"].items():
            if name in baseline["stages"] and baseline["stages"][name]["median_s"] > 0:
                r[name] = st["median_s"] / baseline["stages"][name]["median_s"]
        out[f"{c['name']} / {baseline['name']}"] = r
    return out


# --- the table -------------------------------------------------------------------------------------------

def _seconds(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def render(report: dict) -> str:
    s, results = report["settings"], report["results"]
    mode = f"img2img strength {s['strength']}" if s["init_image"] else "txt2img"
    lines = [f"sdrt bench: {s['model']}  {s['width']}x{s['height']}  batch {s['batch']}  {s['steps']} steps "
             f"{s['scheduler']}  guidance {s['guidance_scale']:g}  {mode}  "
             f"{s['runs']} runs after {s['warmup']} warm-up (median, p90)"]
    ratio = next(iter(report["ratios"].values()), None) if len(results) == 2 else None
    header = ["", *[r["name"] for r in results]] + (["ratio"] if ratio else [])
    rows = [header]

    def row(label, cells, key=None):
        rows.append([label, *cells] + ([f"{ratio[key]:.2f}" if key in ratio else ""] if ratio else []))

    row("end to end", [f"{_seconds(r['end_to_end']['median_s'])} ({_seconds(r['end_to_end']['p90_s'])})"
                       for r in results], "end_to_end")
    for name in STAGE_ORDER:
        if any(name in r["stages"] for r in results):
            row(name, [f"{_seconds(r['stages'][name]['median_s'])} ({_seconds(r['stages'][name]['p90_s'])})"
                       if name in r["stages"] else "-" for r in results], name)
    row("images/s", [f"{r['images_per_s']:.3g}" for r in results])
    row("cold start", [_seconds(r["cold_start_s"]) for r in results], "cold_start")
    row("peak RSS", [f"{r['peak_memory']['host_rss_bytes'] / 2**30:.2f} GiB" for r in results], "host_rss")
    if any(r["peak_memory"]["gpu_bytes"] is not None for r in results):
        row("peak GPU", [f"{(r['peak_memory']['gpu_bytes'] or 0) / 2**30:.2f} GiB" for r in results])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    if report["same_weights"]:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in report["same_weights"]["max_abs_error"].items())
        lines.append(f"same weights: first-step UNet max|diff| {errs} (threshold "
                     f"{report['same_weights']['threshold']:.1e}); ratio = sdrt time / baseline time")
    return "\n".join(lines) + "\n"
