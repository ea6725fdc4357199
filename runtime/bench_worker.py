"""One `sdrt bench` contender in its own process, so its load time and peak memory are its own.

The parent (`bench.py`) starts a worker, waits for it to load and draw its first image (the cold start), then
sends it one command per line on stdin and reads one JSON reply per line:

    {"cmd": "run", "seed": 3}                      -> {"event": "result", "end_to_end_s", "stages", "unet_calls"}
    {"cmd": "first_unet", "latents": A, "out": B}  -> {"event": "done"}   (the weight check: UNet output at step 1)
    {"cmd": "exit"}                                -> {"event": "bye", "peak_rss_bytes": ..., "peak_gpu_bytes": ...}

A failure is {"event": "error", "message": "..."} and exit code 2. Replies go to a private copy of stdout; the
process's own stdout is pointed at stderr, so whatever a library prints cannot break the protocol.

This module holds the protocol, the memory meters and the sdrt contender (lean: no torch). The diffusers
contender lives on the torch side (`sdrt.export.bench_baseline`) and serves through `serve` too.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError

GPU_POLL_S = 0.005  # NVML poll period, as ONNX Runtime's SD benchmark measures VRAM


@dataclass(frozen=True)
class BenchSettings:
    """One generation's settings, identical for every contender; defaults already resolved by the parent."""

    engine_dir: str
    checkpoint: str | None  # the baseline's checkpoint: a diffusers folder or a single file
    prompt: str
    negative_prompt: str
    height: int
    width: int
    batch: int
    steps: int
    scheduler: str
    guidance_scale: float
    init_image: str | None  # image-to-image when set
    strength: float
    guidance_rescale: float = 0.0  # the engine dir's recommendation; the baseline applies it too
    checkpoint_options: dict = field(default_factory=dict)  # how the export read it (SourceOptions fields)
    cpu_precision: str = "auto"  # sdrt's openvino backend
    vae_tiling: bool = False  # every contender decodes in tiles (diffusers: vae.enable_tiling())

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> BenchSettings:
        return cls(**json.loads(text))


def stage_times(calls: list[tuple[str, float]], end_to_end: float) -> dict:
    """One generation's stages from its timed engine calls: totals, the UNet per call (a step), the rest as
    overhead; and how many UNet calls it made."""
    total = {name: sum(s for n, s in calls if n == name) for name in dict.fromkeys(n for n, _ in calls)}
    unet_calls = sum(1 for n, _ in calls if n == "unet")
    stages = {name: s for name, s in total.items() if name != "unet"}
    if unet_calls:
        stages["unet_step"] = total["unet"] / unet_calls
    stages["overhead"] = end_to_end - sum(total.values())  # tokenizing, scheduler math, copies, pre/post
    return {"stages": stages, "unet_calls": unet_calls}


class GpuMemoryPeak:
    """Peak device memory in use above what was in use at start, polled through NVML; None without a GPU."""

    def __init__(self):
        self.peak: int | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._used = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:  # no nvidia-ml-py, no driver, no device: a CPU machine
            return
        self._base, self.peak = self._used(), 0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            self.peak = max(self.peak, self._used() - self._base)
            time.sleep(GPU_POLL_S)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class SdrtContender:
    """sdrt's Pipeline on one backend, every engine call timed."""

    def __init__(self, settings: BenchSettings, backend: str):
        from . import images
        from .pipeline import Pipeline

        self.s = settings
        self.pipe = Pipeline.load(settings.engine_dir, backend=backend, cpu_precision=settings.cpu_precision)
        self.name = f"sdrt-{self.pipe.backend.name}"
        self.image = images.load_image(Path(settings.init_image)) if settings.init_image else None
        self.calls: list[tuple[str, float]] = []
        run = self.pipe.backend.run

        def timed(name, feeds):
            t = time.perf_counter()
            out = run(name, feeds)
            self.calls.append((name, time.perf_counter() - t))
            return out

        self.pipe.backend.run = timed

    def generate(self, seed: int) -> dict:
        s = self.s
        self.calls.clear()
        t = time.perf_counter()
        self.pipe(s.prompt, s.negative_prompt or None, steps=s.steps, guidance_scale=s.guidance_scale,
                  guidance_rescale=s.guidance_rescale,
                  scheduler=s.scheduler, seed=seed, height=s.height, width=s.width, num_images_per_prompt=s.batch,
                  image=self.image, strength=s.strength, output_type="np", vae_tiling=s.vae_tiling)
        return stage_times(self.calls, time.perf_counter() - t)

    def first_unet_output(self, latents: np.ndarray) -> np.ndarray:
        """The guided batch's UNet output at the first step, from these unit-normal latents."""
        from .families import MicroConditioning
        from .schedulers import make_sampler

        s, pipe = self.s, self.pipe
        h, w = latents.shape[-2] * pipe.manifest.vae_scale_factor, latents.shape[-1] * pipe.manifest.vae_scale_factor
        negatives = (s.negative_prompt,) if s.negative_prompt else None  # as generate() passes it
        cond = pipe.encoder((s.prompt,), negatives, 1, True, h, w, MicroConditioning())
        sampler = make_sampler(s.scheduler, pipe.scheduler_config, s.steps)
        x = sampler.scale_model_input(latents * np.float32(sampler.init_noise_sigma), 0)
        feeds = {"sample": np.concatenate([x, x]), "timestep": np.full(2, sampler.timesteps[0], np.float32), **cond}
        (out,) = pipe.backend.run("unet", feeds)
        return out


def serve(make: Callable[[], object]) -> int:
    """Build the contender, draw the first image, then answer the parent's commands until it says exit."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # library prints go to stderr; replies to the private copy of stdout
    replies = os.fdopen(reply_fd, "w", buffering=1)

    def say(**event) -> None:
        replies.write(json.dumps(event) + "\n")

    gpu = GpuMemoryPeak()
    try:
        t0 = time.perf_counter()
        contender = make()
        t1 = time.perf_counter()
        contender.generate(0)
        say(event="ready", name=contender.name, load_s=t1 - t0, first_image_s=time.perf_counter() - t1)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "run":
                t = time.perf_counter()
                timings = contender.generate(int(cmd["seed"]))
                say(event="result", end_to_end_s=time.perf_counter() - t, **timings)
            elif cmd["cmd"] == "first_unet":
                np.save(cmd["out"], contender.first_unet_output(np.load(cmd["latents"])))
                say(event="done")
            elif cmd["cmd"] == "exit":
                say(event="bye", peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=gpu.peak)
                return 0
        return 0
    except UserError as e:
        say(event="error", message=str(e))
        return 2


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="an sdrt bench worker (started by `sdrt bench`, not by people)")
    p.add_argument("--settings", required=True, help="BenchSettings as JSON")
    p.add_argument("--backend", required=True, help="sdrt backend to run")
    args = p.parse_args(argv)
    settings = BenchSettings.from_json(args.settings)
    return serve(lambda: SdrtContender(settings, args.backend))


if __name__ == "__main__":
    sys.exit(main())
