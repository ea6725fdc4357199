"""Runtime overhead: time spent outside engine calls (tokenizing, scheduler math, copies) per UNet step.

    python benchmarks/runtime_overhead.py --json benchmarks/results/runtime_overhead_sd15_cpu.json

Without --engine it writes a random-weight SD 1.5 checkpoint (real architecture) and exports the text
encoder, UNet and VAE decoder into a scratch folder first. Each generation runs at the native 512x512 with
classifier-free guidance; every engine call is timed, and everything else in the call is overhead. The
target is overhead per step < 1% of one UNet step. Also records the import time of `sdrt.runtime`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ is on sys.path when a script runs.
from import_time import import_seconds
from report import command, machine, write_json

TARGET_FRACTION = 0.01


def export_engine(scratch: Path, model: str) -> Path:
    ckpt, engine = scratch / "checkpoint", scratch / "engine"
    subprocess.run([sys.executable, "-m", "sdrt.export.random_model", str(ckpt), "--model", model], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", "export", "--checkpoint", str(ckpt), "--out",
                    str(engine), "--components", "text_encoder", "unet", "vae_decoder"], check=True)
    return engine


def measure(engine: Path, steps: int, repeats: int, scheduler: str) -> dict:
    from sdrt.runtime import Pipeline

    pipe = Pipeline.load(engine)
    calls: list[tuple[str, float]] = []
    run = pipe.backend.run

    def timed(name, feeds):
        t = time.perf_counter()
        out = run(name, feeds)
        calls.append((name, time.perf_counter() - t))
        return out

    pipe.backend.run = timed
    pipe("warm-up", steps=1, seed=0, scheduler=scheduler, output_type="np")
    totals, overheads, unet_calls = [], [], []
    for r in range(repeats):
        calls.clear()
        t = time.perf_counter()
        pipe("a photograph of an astronaut riding a horse", "blurry", steps=steps, seed=r, scheduler=scheduler,
             output_type="np")
        total = time.perf_counter() - t
        engine_s = sum(s for _, s in calls)
        totals.append(total)
        overheads.append((total - engine_s) / steps)
        unet_calls += [s for n, s in calls if n == "unet"]
    unet = statistics.median(unet_calls)
    overhead = statistics.median(overheads)
    return {
        "steps": steps,
        "repeats": repeats,
        "scheduler": scheduler,
        "resolution": list(pipe.manifest.native_resolution),
        "median_generation_s": statistics.median(totals),
        "median_unet_step_s": unet,
        "median_overhead_per_step_s": overhead,
        "overhead_fraction_of_unet_step": overhead / unet,
        "target_fraction": TARGET_FRACTION,
        "meets_target": overhead / unet < TARGET_FRACTION,
        "engine_calls": sorted({n for n, _ in calls}),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, default=None, help="existing engine dir (default: export a random one)")
    p.add_argument("--model", default="sd15", help="random architecture to export when --engine is not given")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per generation")
    p.add_argument("--repeats", type=int, default=3, help="measured generations (after one warm-up)")
    p.add_argument("--scheduler", default="dpmpp-2m", help="sampler (the overhead differs little between them)")
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        engine = args.engine or export_engine(Path(scratch), args.model)
        result = measure(engine, args.steps, args.repeats, args.scheduler)
        manifest = json.loads((engine / "manifest.json").read_text())
    report = {
        "benchmark": "runtime_overhead",
        "model": "engine " + str(args.engine) if args.engine else args.model,
        **result,
        "import_sdrt_runtime_s": import_seconds("import sdrt.runtime", 5),
        "machine": machine(),
        "versions": manifest["versions"],
        "command": command(),
    }
    write_json(args.json, report)
    print(f"UNet step {result['median_unet_step_s']:.3f} s, overhead/step {result['median_overhead_per_step_s'] * 1e3:.2f} ms "
          f"= {result['overhead_fraction_of_unet_step'] * 100:.3f}% (target < {TARGET_FRACTION * 100:.0f}%), "
          f"import sdrt.runtime {report['import_sdrt_runtime_s'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
