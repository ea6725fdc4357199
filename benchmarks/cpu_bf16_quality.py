"""What bf16 costs in picture quality: the openvino backend's bf16 images against its f32 images, per scheduler.

For each engine dir and each scheduler, one text-to-image generation from the same seed and prompt in f32 and in
bf16 (every component; backend_openvino.F32_ONLY names any kept in f32), and for the VAE decoder alone the bf16
decode of the f32 run's final latents, so a loss in the decoder is told apart from drift in the denoising loop.
Reported: max and mean absolute pixel difference (0..255) and PSNR in dB. With --judge, the demo model's judge
(training/judge.py) on its 16 base cases in f32 and in bf16: the colour and shape accuracy of each.

    python benchmarks/cpu_bf16_quality.py demo-engine sd15-engine --steps 4 --judge demo-engine \
        --json benchmarks/results/cpu_bf16_quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sdrt.runtime import Pipeline
from sdrt.runtime.doctor import cpu_info
from sdrt.runtime.manifest import package_versions
from sdrt.runtime.schedulers import SCHEDULER_NAMES

PROMPT = "a red circle on a blue background"


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Pixel difference of two float [N, H, W, 3] images in [0, 1], as the 8-bit PNGs they become."""
    pa, pb = (np.round(x * 255).astype(np.float64) for x in (a, b))
    mse = float(np.mean((pa - pb) ** 2))
    return {"max_abs": float(np.abs(pa - pb).max()), "mean_abs": round(float(np.abs(pa - pb).mean()), 3),
            "psnr_db": round(10 * np.log10(255.0**2 / mse), 2) if mse else float("inf")}


def quality(engine_dir: Path, schedulers, steps: int, seed: int, size: int | None) -> dict:
    f32, bf16 = (Pipeline.load(engine_dir, "openvino", cpu_precision=p) for p in ("f32", "bf16"))
    rows = {}
    for name in schedulers:
        kwargs = dict(steps=steps, scheduler=name, seed=seed, height=size, width=size)
        start = time.perf_counter()
        req = f32.request(PROMPT, **{k: v for k, v in kwargs.items() if k != "seed"})
        gen = f32.prepare(req, seed)
        latents = f32.denoise(gen.latents, gen.cond, f32._sampler(req, False), req, [gen], False)
        ref = f32.decode(latents)
        low = bf16(PROMPT, output_type="np", **kwargs)
        rows[name] = {"image": compare(ref, low), "vae_decoder_only": compare(ref, bf16.decode(latents)),
                      "seconds": round(time.perf_counter() - start, 1)}
        print(f"{engine_dir.name} {name:16} PSNR {rows[name]['image']['psnr_db']:6} dB, max |d| "
              f"{rows[name]['image']['max_abs']:5} / 255; decoder alone {rows[name]['vae_decoder_only']['psnr_db']} dB",
              file=sys.stderr, flush=True)
    return {"engine_dir": str(engine_dir), "family": f32.manifest.family, "steps": steps, "seed": seed,
            "size": size or f32.manifest.native_resolution[0], "prompt": PROMPT, "schedulers": rows}


def judge_accuracy(engine_dir: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/ is beside benchmarks/, not installed
    from training.evaluate import BASE_CASES
    from training.judge import judge

    out = {}
    for precision in ("f32", "bf16"):
        pipe = Pipeline.load(engine_dir, "openvino", cpu_precision=precision)
        verdicts = [judge(pipe(c[0], seed=c[1])[0]) for c in BASE_CASES]
        out[precision] = {
            "colour_accuracy": sum(v.colour == c[2] for v, c in zip(verdicts, BASE_CASES)) / len(BASE_CASES),
            "shape_accuracy": sum(v.shape == c[3] for v, c in zip(verdicts, BASE_CASES)) / len(BASE_CASES)}
        print(f"judge {precision}: {out[precision]}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("engine_dirs", nargs="+", type=Path, metavar="ENGINE_DIR", help="engine dirs to measure")
    p.add_argument("--schedulers", nargs="+", choices=SCHEDULER_NAMES, default=list(SCHEDULER_NAMES),
                   help="schedulers to compare")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    p.add_argument("--seed", type=int, default=0, help="seed of every image")
    p.add_argument("--size", type=int, default=None, help="image side in pixels; default: each model's native")
    p.add_argument("--judge", type=Path, default=None, metavar="DEMO_ENGINE_DIR",
                   help="also run the demo model's judge in f32 and bf16 on this (demo) engine dir")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    import openvino

    report = {"cpu": cpu_info(), "openvino": openvino.__version__,
              "versions": package_versions(("sdrt", "numpy", "openvino")),
              "command": " ".join(["python", "benchmarks/cpu_bf16_quality.py", *(argv or sys.argv[1:])]),
              "models": [quality(d, args.schedulers, args.steps, args.seed, args.size) for d in args.engine_dirs]}
    if args.judge:
        report["demo_judge"] = judge_accuracy(args.judge)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
