"""Export time and peak RSS of a model architecture with random weights (any export/random_model.py name).

    python benchmarks/export_time.py --components unet --json benchmarks/results/export_sd15_unet_cpu.json
    python benchmarks/export_time.py --model tiny --components text_encoder unet vae_decoder vae_encoder \
        --json benchmarks/results/export_tiny_cpu.json
    python benchmarks/export_time.py --model sdxl --components text_encoder text_encoder_2 unet \
        --json benchmarks/results/export_sdxl_cpu.json
    python benchmarks/export_time.py --model sd15 --single-file --components text_encoder unet \
        vae_decoder vae_encoder --json benchmarks/results/export_sd15_single_file_cpu.json

Writes a random-weight diffusers folder with the real architecture (export/random_model.py CONFIGS), or
with --single-file one .safetensors file in the original LDM/A1111 layout, runs `sdrt export` on it in a
child process and reports wall time and the child's peak RSS, plus each component's validation error from
the manifest. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import command, machine, write_json  # benchmarks/ is on sys.path when a script runs


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; returns (wall seconds, peak RSS of the child in GiB). Raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise RuntimeError("the child's peak RSS is hidden by an earlier, larger child; run it first")
    return wall, peak_kib / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--components", nargs="+", default=["unet"], help="components to export")
    p.add_argument("--model", default="sd15", help="random architecture from sdrt.export.random_model.CONFIGS")
    p.add_argument("--single-file", action="store_true",
                   help="write the checkpoint as one LDM-layout .safetensors file (as civitai/A1111 users hold them)")
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        ckpt = Path(scratch) / ("checkpoint.safetensors" if args.single_file else "checkpoint")
        out = Path(scratch) / "engine"
        # RUSAGE_CHILDREN keeps the largest child ever waited for, so the export is measured inside a
        # fresh helper process (--_measure) whose only child is the export.
        writer = "write_random_single_file" if args.single_file else "write_random_checkpoint"
        write = [sys.executable, "-c",
                 f"import sys; from sdrt.export.random_model import {writer} as w; "
                 f"w(sys.argv[1], {args.model!r})", str(ckpt)]
        t = time.perf_counter()
        subprocess.run(write, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        write_s = time.perf_counter() - t
        export = [sys.executable, "-m", "sdrt.runtime.cli", "export", "--checkpoint", str(ckpt),
                  "--out", str(out), "--components", *args.components]
        measure = [sys.executable, str(Path(__file__).resolve()), "--_measure", *export]
        result = subprocess.run(measure, check=True, capture_output=True, text=True)
        wall, peak = json.loads(result.stdout.strip().splitlines()[-1])
        manifest = json.loads((out / "manifest.json").read_text())
        files = [ckpt] if ckpt.is_file() else [f for f in ckpt.rglob("*") if f.is_file()]
        ckpt_bytes = sum(f.stat().st_size for f in files)

    components = {
        name: {
            "onnx_bytes": c["artifacts"][0]["bytes"],
            "external_data": c["artifacts"][0]["external_data"],
            "max_abs_error": c["artifacts"][0]["validation"]["max_abs_error"],
            "threshold": c["artifacts"][0]["validation"]["threshold"],
            "attention_nodes": c["artifacts"][0]["op_counts"].get("Attention", 0),
            "group_norm_nodes": c["artifacts"][0]["op_counts"].get("GroupNormalization", 0),
        }
        for name, c in manifest["components"].items()
    }
    report = {
        "benchmark": "export_time",
        "model": args.model,
        "checkpoint_format": "single-file" if args.single_file else "diffusers",
        "components": components,
        "checkpoint_gib": ckpt_bytes / 2**30,
        "write_checkpoint_s": write_s,
        "export_wall_s": wall,
        "export_peak_rss_gib": peak,
        "machine": machine(),
        "versions": manifest["versions"],
        "command": command(),
    }
    write_json(args.json, report)
    print(f"{args.model} {' '.join(args.components)}: export {wall:.0f} s, peak RSS {peak:.2f} GiB")
    for name, c in components.items():
        print(f"  {name}: {c['onnx_bytes'] / 2**30:.2f} GiB, max|err| {c['max_abs_error']:.2e} "
              f"(threshold {c['threshold']:.1e}), Attention {c['attention_nodes']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_measure":
        # A fresh process whose only child is the export, so RUSAGE_CHILDREN is the export's own peak.
        print(json.dumps(run_child(sys.argv[2:])))
        sys.exit(0)
    sys.exit(main())
