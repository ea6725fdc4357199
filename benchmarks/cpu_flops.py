"""Each contender's fraction of the CPU's FLOP limit, from an `sdrt bench` report.

The work: the FLOPs of one UNet call and one VAE decode at the bench's size, counted from the engine dir's own
graphs (Conv, MatMul, Gemm and Attention; 2 FLOPs per multiply-add; shapes from kernels/shapes.py at the
bench's batch). The limit: the rate of a large square matrix product on this machine, measured with torch on
every core in fp32 and in bf16 (oneDNN; AMX where the CPU has it). A contender's fraction is its achieved rate
(FLOPs / median stage time) over the limit of the precision it computes in (bf16 for an openvino-bf16
contender, fp32 for the others).

    python benchmarks/cpu_flops.py ENGINE_DIR benchmarks/results/bench_cpu15_512.json --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from sdrt.kernels.shapes import static_shapes
from sdrt.runtime.manifest import Manifest

GEMM_N = 4096


def graph_flops(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> float:
    """Multiply-add FLOPs (x2) of the graph's Conv, MatMul, Gemm and Attention nodes at these input shapes."""
    shapes = {k: tuple(v) for k, v in static_shapes(model, input_shapes).items()}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    total = 0.0
    for n in model.graph.node:
        if n.op_type == "Conv":
            out, w = shapes.get(n.output[0]), shapes.get(n.input[1])
            if out and w:
                total += 2.0 * np.prod(out, dtype=np.float64) * np.prod(w[1:], dtype=np.float64)
        elif n.op_type in ("MatMul", "Gemm"):
            a, out = shapes.get(n.input[0]), shapes.get(n.output[0])
            if a and out:
                total += 2.0 * np.prod(out, dtype=np.float64) * a[-1]
        elif n.op_type == "Attention":
            q, k, v = (shapes.get(x) for x in n.input[:3])
            if q and k and v and len(q) == 4:
                b, h, sq, d = q
                total += 2.0 * b * h * sq * k[2] * (d + v[3])
    return total


def gemm_rate(dtype_name: str, seconds: float = 3.0) -> float:
    """FLOP/s of an N x N x N torch matrix product in this dtype, best of repeated runs for `seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(GEMM_N, GEMM_N).to(dtype) for _ in range(2))
    torch.matmul(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * GEMM_N**3 / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("engine_dir", type=Path, help="the engine dir the bench ran")
    p.add_argument("reports", nargs="+", type=Path, help="sdrt bench --json reports")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    m = Manifest.load(args.engine_dir)
    limits = {"fp32": gemm_rate("float32"), "bf16": gemm_rate("bfloat16")}
    print(f"GEMM {GEMM_N}^3: fp32 {limits['fp32'] / 1e9:.0f} GFLOP/s, bf16 {limits['bf16'] / 1e9:.0f} GFLOP/s",
          file=sys.stderr)
    out = {"gemm_limit_gflops": {k: round(v / 1e9, 1) for k, v in limits.items()}, "reports": []}
    graphs = {c: onnx.load(str(args.engine_dir / m.components[c].graph("fp32", "fp16").file), load_external_data=False)
              for c in ("unet", "vae_decoder")}
    for path in args.reports:
        report = json.loads(path.read_text())
        s = report["settings"]
        lh, lw = s["height"] // m.vae_scale_factor, s["width"] // m.vae_scale_factor
        rows = 2 * s["batch"] if s["guidance_scale"] > 1 else s["batch"]
        ctx = m.components["unet"].inputs[2].shape[-1]
        unet = graph_flops(graphs["unet"], {"sample": [rows, m.latent_channels, lh, lw], "timestep": [rows],
                                            "encoder_hidden_states": [rows, 77, ctx]})
        vae = graph_flops(graphs["vae_decoder"], {"latent": [s["batch"], m.latent_channels, lh, lw]})
        entry = {"report": str(path), "size": [s["height"], s["width"]], "unet_call_gflop": round(unet / 1e9, 1),
                 "vae_decode_gflop": round(vae / 1e9, 1), "contenders": {}}
        for r in report["results"]:
            limit = limits["bf16" if "bf16" in r["name"] else "fp32"]
            stages = r["stages"]
            row = {}
            for stage, flops in (("unet_step", unet), ("vae_decoder", vae)):
                if stage in stages:
                    rate = flops / stages[stage]["median_s"]
                    row[stage] = {"gflops": round(rate / 1e9, 1), "fraction_of_limit": round(rate / limit, 3)}
            entry["contenders"][r["name"]] = row
            print(f"{path.name} {r['name']:24} " + ", ".join(f"{k} {v['gflops']} GFLOP/s "
                  f"({v['fraction_of_limit']:.0%})" for k, v in row.items()), file=sys.stderr)
        out["reports"].append(entry)
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
