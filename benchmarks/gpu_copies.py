"""Host<->device copies of one denoising step's latents, as the GPU backends make them, timed on a real GPU.

The numpy scheduler loop sends the UNet its latents and reads back its prediction every step. This measures what
that costs: for each latent size, one upload of the guided batch [2, 4, h, w] and one download of the prediction,
through the tensorrt backend's path (cuda-bindings, pageable numpy memory, one stream) and through the cuda
backend's (ONNX Runtime OrtValue), averaged over many repetitions. Writes JSON.

    python benchmarks/gpu_copies.py --json benchmarks/results/gpu_copies_h100.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SIZES = (512, 768, 1024)  # pixels; latents are 1/8


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def cuda_bindings_round_trip(x: np.ndarray, reps: int) -> float:
    from sdrt.runtime import gpu

    stream, buf = gpu.Stream(), gpu.DeviceBuffer(x.nbytes)
    out = np.empty_like(x)

    def trip():
        stream.upload(buf.ptr, x)
        stream.download(out, buf.ptr)
        stream.sync()

    seconds = _time(trip, reps)
    assert np.array_equal(out, x)
    return seconds


def ort_round_trip(x: np.ndarray, reps: int) -> float | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None

    def trip():
        v = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        assert v.numpy().shape == x.shape

    return _time(trip, reps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--reps", type=int, default=200, help="round trips per measurement")
    args = p.parse_args()
    from sdrt.runtime import gpu

    found = gpu.probe()
    rows = []
    for px in SIZES:
        x = np.random.default_rng(0).standard_normal((2, 4, px // 8, px // 8), dtype=np.float32)
        rows.append({"pixels": px, "latents_shape": list(x.shape), "bytes_each_way": x.nbytes,
                     "tensorrt_path_round_trip_ms": 1e3 * cuda_bindings_round_trip(x, args.reps),
                     "cuda_path_round_trip_ms": (lambda s: None if s is None else 1e3 * s)(ort_round_trip(x, args.reps))})
        print(rows[-1])
    report = {"gpu": found.gpu.name if found.gpu else None, "driver": found.driver, "reps": args.reps,
              "command": "python benchmarks/gpu_copies.py --json " + args.json, "results": rows}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
