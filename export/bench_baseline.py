"""The `sdrt bench` baseline: diffusers' own pipeline on the same checkpoint, as users run it today.

fp32 on a CPU; fp16 with PyTorch's SDPA attention (diffusers' default processor) on CUDA. The scheduler is the
diffusers class that sdrt's scheduler name reproduces (the runtime's one scheduler table). Stage times come
from hooks on the text encoder and UNet and wrappers of the VAE's encode/decode; on CUDA each stage ends
with a synchronize, so the time is the GPU's and not just the launch.

Runs as a bench worker process: `python -m sdrt.export.bench_baseline --settings JSON` (started by `sdrt bench`).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from sdrt.runtime.bench_worker import BenchSettings, serve, stage_times
from sdrt.runtime.schedulers import SCHEDULERS

from .checkpoint import SourceOptions, _quiet_loading, load_modules, open_checkpoint


class DiffusersContender:
    def __init__(self, settings: BenchSettings):
        import diffusers
        from PIL import Image

        self.s = settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.name = "diffusers-torch-fp16-sdpa" if self.device == "cuda" else "diffusers-torch-fp32"
        ckpt = open_checkpoint(settings.checkpoint, SourceOptions(**settings.checkpoint_options))
        spec = SCHEDULERS[settings.scheduler]
        # The family's own pipeline (StableDiffusion(XL)Pipeline), or its image-to-image sibling.
        name = ckpt.spec.pipeline.replace("Pipeline", "Img2ImgPipeline" if settings.init_image else "Pipeline")
        self.xl = "XL" in name
        extra = dict(add_watermarker=False) if self.xl else dict(safety_checker=None, requires_safety_checker=False)
        with _quiet_loading():
            if ckpt.single_file is None and ckpt.options == SourceOptions():
                base = getattr(diffusers, ckpt.model_index["scheduler"][1]).from_pretrained(ckpt.path / "scheduler")
                scheduler = getattr(diffusers, spec.diffusers_class).from_config(base.config, **spec.overrides)
                pipe = getattr(diffusers, name).from_pretrained(ckpt.path, scheduler=scheduler, torch_dtype=dtype,
                                                                **extra)
            else:  # a single file or a replaced VAE: the modules sdrt's export read, in diffusers' pipeline
                modules = load_modules(ckpt)
                base = modules.pop("scheduler")
                if ckpt.options.prediction_type:
                    base = base.from_config(base.config, prediction_type=ckpt.options.prediction_type)
                scheduler = getattr(diffusers, spec.diffusers_class).from_config(base.config, **spec.overrides)
                parts = {**modules, **({} if self.xl else dict(feature_extractor=None))}
                pipe = getattr(diffusers, name)(scheduler=scheduler, **parts, **extra).to(dtype=dtype)
            self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if settings.vae_tiling:
            self.pipe.vae.enable_tiling()
        self.image = Image.open(settings.init_image).convert("RGB") if settings.init_image else None
        self.calls: list[tuple[str, float]] = []
        for role in ckpt.spec.text_encoders:
            self._time_module(role.component, getattr(self.pipe, role.component))
        self._time_module("unet", self.pipe.unet)
        vae = self.pipe.vae
        vae.decode = self._timed("vae_decoder", vae.decode)
        vae.encode = self._timed("vae_encoder", vae.encode)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.calls.append((name, time.perf_counter() - t))
            return out

        return call

    def _time_module(self, name: str, module: torch.nn.Module) -> None:
        started = []

        def pre(*_):
            self._sync()
            started.append(time.perf_counter())

        def post(*_):
            self._sync()
            self.calls.append((name, time.perf_counter() - started.pop()))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def generate(self, seed: int) -> dict:
        s = self.s
        kwargs = dict(image=self.image, strength=s.strength) if self.image is not None else dict(height=s.height,
                                                                                               width=s.width)
        if s.guidance_rescale:  # StableDiffusionImg2ImgPipeline has no such setting; the others do
            kwargs["guidance_rescale"] = s.guidance_rescale
        self.calls.clear()
        t = time.perf_counter()
        with torch.inference_mode():
            self.pipe(s.prompt, negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
                      guidance_scale=s.guidance_scale, num_images_per_prompt=s.batch, output_type="np",
                      generator=torch.Generator(self.device).manual_seed(seed), **kwargs)
        self._sync()
        return stage_times(self.calls, time.perf_counter() - t)

    def first_unet_output(self, latents: np.ndarray) -> np.ndarray:
        """The guided batch's UNet output at the first step, from these unit-normal latents (fp32 out)."""
        s, pipe = self.s, self.pipe
        with torch.inference_mode():
            kwargs = dict(device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                          negative_prompt=s.negative_prompt or None)
            added = {}
            if self.xl:
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(s.prompt, **kwargs)
                h, w = (n * pipe.vae_scale_factor for n in latents.shape[-2:])
                added = dict(added_cond_kwargs={
                    "text_embeds": torch.cat([uncond_pooled, pooled]),
                    "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=cond.dtype, device=self.device)})
            else:
                cond, uncond = pipe.encode_prompt(s.prompt, **kwargs)
            pipe.scheduler.set_timesteps(s.steps, device=self.device)
            t = pipe.scheduler.timesteps[0]
            x = torch.from_numpy(latents).to(self.device, cond.dtype) * pipe.scheduler.init_noise_sigma
            x = pipe.scheduler.scale_model_input(torch.cat([x, x]), t)
            out = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond]), **added).sample
        return out.float().cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="the diffusers baseline worker of `sdrt bench` (not run by people)")
    p.add_argument("--settings", required=True, help="BenchSettings as JSON")
    args = p.parse_args(argv)
    settings = BenchSettings.from_json(args.settings)
    return serve(lambda: DiffusersContender(settings))


if __name__ == "__main__":
    sys.exit(main())
