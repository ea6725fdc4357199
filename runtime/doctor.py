"""`sdrt doctor`: this machine's CPU, GPUs, driver and backends in one screen, and for an engine dir, which
backends can run it here and why the others cannot."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .backend import BACKENDS, resolve, unavailable
from .manifest import Manifest, package_versions

PACKAGES = ("sdrt", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "tensorrt-cu13",
            "tensorrt-cu12", "cuda-bindings", "nvidia-ml-py", "torch", "diffusers", "transformers")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    return {"name": name, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def report(engine_dir: Path | None = None) -> dict:
    from . import gpu

    found = gpu.probe()
    out = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_info(),
        "gpus": [{"index": g.index, "name": g.name, "compute_capability": g.compute_capability,
                  "memory_gib": round(g.memory_bytes / 2**30, 1)} for g in found.gpus],
        "gpu_problem": found.problem,
        "driver": found.driver,
        "cuda_driver": found.cuda,
        "packages": {k: v for k, v in package_versions(PACKAGES).items() if v},
        "backends": {k: unavailable(k) for k in BACKENDS if k != "auto"},
    }
    try:
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        out["onnxruntime_providers"] = []
    if engine_dir is not None:
        manifest = Manifest.load(engine_dir)
        graphs = sorted({a.precision for c in manifest.components.values() for a in c.artifacts if a.kind == "onnx"},
                        key=("fp32", "fp16").index)
        engines = [(n, a.engine) for n, c in manifest.components.items() for a in c.engines() if a.engine]
        out["engine_dir"] = {
            "path": str(engine_dir),
            "family": manifest.family,
            "graphs": graphs,
            "kept_fp32": manifest.kept_fp32,
            "engines": [f"{n}: compute {e.compute_capability}, TensorRT {e.tensorrt} ({e.gpu})" for n, e in engines],
            "backends": {k: unavailable(k, Path(engine_dir), manifest) for k in BACKENDS if k != "auto"},
            "auto": resolve("auto", Path(engine_dir), manifest),
        }
    return out


def render(r: dict) -> str:
    cpu = r["cpu"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    lines = [f"python     {r['python']}, {r['platform']}",
             f"cpu        {cpu['name']} ({cpu['cores']} cores): {flags}"]
    if r["gpus"]:
        for g in r["gpus"]:
            lines.append(f"gpu {g['index']}      {g['name']}, compute {g['compute_capability']}, {g['memory_gib']} GiB")
        lines.append(f"driver     {r['driver'] or 'unknown'} (supports CUDA {r['cuda_driver'] or 'unknown'})")
    else:
        lines.append(f"gpu        none: {r['gpu_problem']}")
    lines.append("packages   " + ", ".join(f"{k} {v}" for k, v in r["packages"].items()))
    lines.append("onnxruntime providers: " + (", ".join(r["onnxruntime_providers"]) or "none"))
    lines.append("backends on this machine:")
    lines += [f"  {k:9}  {'yes' if why is None else 'no: ' + why}" for k, why in r["backends"].items()]
    d = r.get("engine_dir")
    if d:
        lines.append(f"engine dir {d['path']}: {d['family']}, {'+'.join(d['graphs'])} graphs, "
                     f"{len(d['engines'])} TensorRT engine(s)")
        lines += [f"  kept fp32: {k}: {why}" for k, why in d["kept_fp32"].items()]
        lines += [f"  engine {e}" for e in d["engines"]]
        lines += [f"  {k:9}  {'can run it' if why is None else 'no: ' + why}" for k, why in d["backends"].items()]
        lines.append(f"  auto   -> {d['auto']}")
    return "\n".join(lines) + "\n"
