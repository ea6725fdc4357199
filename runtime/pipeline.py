"""Text-to-image and image-to-image: the numpy scheduler loop around the engine calls, for every family.

Matches diffusers' StableDiffusion(XL)Pipeline / StableDiffusion(XL)Img2ImgPipeline step for step
(tests/test_parity.py, tests/test_families.py): the same prompt batching, [unconditional, conditional] guidance
batch, guidance rescale, scheduler, VAE scaling and rounding. How prompts become the UNet's conditioning is the
family's business (runtime/families.py); this loop does not know which family it runs.

Random draws come from one numpy Generator in a fixed order, so a seed always gives the same image:
img2img first draws the VAE posterior noise, then the noise that is added to the image latents; text-to-image
first draws the initial latents (unless `latents` is given); then each stochastic step draws its noise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import images
from .backend import TimedBackend, make_backend
from .errors import UserError
from .families import MicroConditioning, PromptEncoder, check_pair
from .manifest import BUILTIN_DEFAULTS, SCHEDULER_FILE, UNET, VAE_DECODER, VAE_ENCODER, GenerationDefaults, Manifest
from .schedulers import SCHEDULER_NAMES, SchedulerConfig, default_scheduler_name, make_sampler
from .tokenizer import PromptTokenizer
from .vae_tiling import needs_tiling, tile_sizes, tiled_decode, tiled_encode

PIXEL_MULTIPLE = 8


def override_config(config: dict, overrides: dict) -> dict:
    """A diffusers config with `overrides` set as if the checkpoint had said them (not diffusers' defaults)."""
    out = {**config, **overrides}
    out["_use_default_values"] = [k for k in config.get("_use_default_values", ()) if k not in overrides]
    return out


def load_scheduler_config(path: Path, overrides: dict | None = None) -> SchedulerConfig:
    """scheduler.json; `overrides` (the manifest's `config_overrides`) are set on its config."""
    try:
        d = json.loads(Path(path).read_text())
        return SchedulerConfig.from_json_dict({**d, "config": override_config(d["config"], overrides or {})})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read scheduler config {path}: {e}") from None


def manifest_scheduler_config(engine_dir: Path, manifest: Manifest) -> SchedulerConfig:
    s = manifest.scheduler
    return load_scheduler_config(Path(engine_dir) / s.get("file", SCHEDULER_FILE), s.get("config_overrides"))


def resolve_defaults(manifest: Manifest, scheduler_config: SchedulerConfig) -> GenerationDefaults:
    """What a generation uses for a setting it leaves out: the engine dir's recommendation, else sdrt's default,
    and the checkpoint's own scheduler (None if that class has no numpy port: a name must then be given)."""
    try:
        own = GenerationDefaults(scheduler=default_scheduler_name(scheduler_config))
    except ValueError:
        own = GenerationDefaults()
    return manifest.defaults.over(BUILTIN_DEFAULTS).over(own)


def check_size(manifest: Manifest, height: int, width: int) -> None:
    """Refuse a size that is not a multiple of 8 or that the exported UNet's axes do not accept."""
    f = manifest.vae_scale_factor
    axes = manifest.components[UNET].axes
    for label, px, axis in (("height", height, "latent_height"), ("width", width, "latent_width")):
        if px % PIXEL_MULTIPLE:
            raise UserError(f"{label} {px} is not a multiple of {PIXEL_MULTIPLE}")
        ax = axes[axis]
        if px % f or not ax.check(px // f):
            raise UserError(f"{label} {px} is outside the engine's limits: {ax.min * f}..{ax.max * f} "
                            f"in steps of {ax.multiple_of * f}")


@dataclass(frozen=True)
class Request:
    """One generation's settings after defaults and checks."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None  # None: none given (SDXL may then zero the unconditional half)
    steps: int
    guidance_scale: float
    guidance_rescale: float
    scheduler: str
    height: int
    width: int
    num_images_per_prompt: int
    strength: float
    eta: float
    micro: MicroConditioning
    # diffusers' enable_vae_tiling for this generation's decode (and img2img encode): runtime/vae_tiling.py.
    vae_tiling: bool = False

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


class Pipeline:
    """An engine dir loaded once; call it to generate images. Holds no per-generation state."""

    def __init__(self, engine_dir: Path, manifest: Manifest, backend, tokenizers: dict[str, PromptTokenizer],
                 scheduler_config: SchedulerConfig):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        self.defaults = resolve_defaults(manifest, scheduler_config)
        self.encoder = PromptEncoder(manifest.conditioning, tokenizers, backend, manifest.components)

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The first text encoder's tokenizer (the only one outside SDXL)."""
        return self.tokenizers[self.manifest.conditioning.text_encoders[0]]

    @classmethod
    def load(cls, engine_dir, backend: str = "auto", build: bool = False,
             observe: Callable[[str, float], None] | None = None, cpu_precision: str = "auto",
             static_size: tuple[int, int, int] | None = None) -> Pipeline:
        """Load an engine dir on `backend` ("auto", "cpu", "openvino", "cuda", "tensorrt"; see runtime/backend.py).

        `cpu_precision` ("auto", "f32", "bf16") is the openvino backend's: auto takes bf16 where the CPU has it.
        `static_size` (height, width, images per call) fixes the openvino backend's UNet to one size.

        `build=True` lets the tensorrt backend build the engines this GPU lacks, with progress on stderr (minutes);
        without it a missing engine is an error that says to run `sdrt build`. Nothing is ever built silently.
        `observe(component, seconds)` is told the duration of every engine call (a server's stage metrics).
        """
        engine_dir = Path(engine_dir)
        manifest = Manifest.load(engine_dir)
        needed = (*manifest.conditioning.text_encoders, UNET, VAE_DECODER)
        missing = [c for c in needed if c not in manifest.components]
        if missing:
            raise UserError(f"{engine_dir} lacks {', '.join(missing)}; export all components to generate")
        toks = {name: PromptTokenizer(engine_dir / t["file"], t["max_length"])
                for name, t in manifest.tokenizers.items() if name in manifest.conditioning.text_encoders}
        sched = manifest_scheduler_config(engine_dir, manifest)
        static = None
        if static_size is not None:
            from .backend_openvino import StaticShape

            static = StaticShape(*static_size)
            check_size(manifest, static.height, static.width)
        engines = make_backend(backend, engine_dir, manifest, build=build, cpu_precision=cpu_precision, static=static)
        return cls(engine_dir, manifest, engines if observe is None else TimedBackend(engines, observe), toks, sched)

    # -- settings -------------------------------------------------------------------------------------

    def request(self, prompt, negative_prompt=None, *, steps: int | None = None,
                guidance_scale: float | None = None, scheduler: str | None = None, height: int | None = None,
                width: int | None = None, num_images_per_prompt: int = 1, strength: float = 0.8, eta: float = 0.0,
                image=None, guidance_rescale: float | None = None, original_size: tuple[int, int] | None = None,
                crops_coords_top_left: tuple[int, int] = (0, 0),
                target_size: tuple[int, int] | None = None, vae_tiling: bool = False) -> Request:
        """One generation's settings, with the engine dir's defaults filled in and every value checked; no engine
        call. `image` (the init image, if any) only gives the size when height or width is left out."""
        micro = MicroConditioning(check_pair("original_size", original_size),
                                  check_pair("crops_coords_top_left", crops_coords_top_left),
                                  check_pair("target_size", target_size))
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None:
            negatives = None
        elif isinstance(negative_prompt, str):
            negatives = (negative_prompt,) * len(prompts)
        else:
            negatives = tuple(negative_prompt)
            if not all(isinstance(n, str) for n in negatives):
                raise UserError("negative_prompt must be a string or a list of strings")
            if len(negatives) != len(prompts):
                raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        steps = self.defaults.steps if steps is None else steps
        guidance_scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        guidance_rescale = self.defaults.guidance_rescale if guidance_rescale is None else guidance_rescale
        try:
            GenerationDefaults(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        except ValueError as e:
            raise UserError(str(e)) from None
        name = scheduler or self.defaults.scheduler
        if name is None:
            raise UserError(f"the checkpoint's scheduler {self.scheduler_config.class_name} has no sdrt equivalent; "
                            f"choose one of: {', '.join(SCHEDULER_NAMES)}")
        if name not in SCHEDULER_NAMES:
            raise UserError(f"unknown scheduler '{name}' (choose from: {', '.join(SCHEDULER_NAMES)})")
        if int(steps) < 1:
            raise UserError(f"steps must be at least 1, got {steps}")
        if image is not None and not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if image is not None and (height is None or width is None):
            # diffusers' img2img works at the image's own size, rounded down to a multiple of 8.
            ih, iw = images.image_size(image)
            height = height or ih // PIXEL_MULTIPLE * PIXEL_MULTIPLE
            width = width or iw // PIXEL_MULTIPLE * PIXEL_MULTIPLE
        nh, nw = self.manifest.native_resolution
        height, width = int(height or nh), int(width or nw)
        check_size(self.manifest, height, width)
        req = Request(prompts, negatives, int(steps), float(guidance_scale), float(guidance_rescale), name,
                      height, width, int(num_images_per_prompt), float(strength), float(eta), micro,
                      bool(vae_tiling))
        if image is not None:  # a strength so low that no step is left is the request's fault, found now
            try:
                make_sampler(name, self.scheduler_config, req.steps, strength=req.strength, eta=req.eta)
            except ValueError as e:
                raise UserError(f"strength {strength} with {req.steps} steps: {e}") from None
        return req

    # -- stages ---------------------------------------------------------------------------------------

    def conditioning(self, req: Request) -> dict[str, np.ndarray]:
        """The UNet's conditioning feeds for the request (its unconditional rows first under guidance)."""
        return self.encoder(req.prompts, req.negative_prompts, req.num_images_per_prompt, req.guidance_scale > 1.0,
                            req.height, req.width, req.micro)

    def encode_image(self, image, req: Request, rng: np.random.Generator) -> np.ndarray:
        if VAE_ENCODER not in self.manifest.components:
            raise UserError(f"{self.engine_dir} has no vae_encoder; re-export it for image-to-image")
        pixels = images.preprocess(image, req.height, req.width)
        tile_latent, tile_sample = tile_sizes(self.manifest)
        if req.vae_tiling and needs_tiling(req.height, req.width, tile_sample):
            mean, logvar = tiled_encode(pixels, lambda x: self.backend.run(VAE_ENCODER, {"image": x}), tile_sample,
                                        tile_latent, self._spatial_axes(VAE_ENCODER))
        else:
            mean, logvar = self.backend.run(VAE_ENCODER, {"image": pixels})
        # DiagonalGaussianDistribution.sample: mean + exp(0.5 * clamp(logvar, -30, 20)) * noise.
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = self.manifest.vae.to_latents(mean + std * rng.standard_normal(mean.shape, dtype=np.float32))
        n = latents.shape[0]
        if req.batch % n:
            raise UserError(f"{n} init images cannot be spread over {req.batch} images")
        # Image i goes with prompt i (and its repeats). diffusers tiles instead (i0, i1, i0, i1 against prompts
        # p0, p0, p1, p1) when several images meet num_images_per_prompt > 1; for one image both agree.
        return np.repeat(latents, req.batch // n, axis=0).astype(np.float32)

    def _sampler(self, req: Request, img2img: bool):
        try:
            return make_sampler(req.scheduler, self.scheduler_config, req.steps,
                                strength=req.strength if img2img else 1.0, eta=req.eta)
        except ValueError as e:
            raise UserError(str(e)) from None

    def prepare(self, req: Request, seed: int | None = None, image=None,
                latents: np.ndarray | None = None) -> Generation:
        """Everything before the denoising loop: the conditioning and the starting latents, drawn from the
        generation's own random stream (see the module docstring for the order of draws)."""
        rng = np.random.default_rng(seed)
        f, c = self.manifest.vae_scale_factor, self.manifest.latent_channels
        shape = (req.batch, c, req.height // f, req.width // f)
        cond = self.conditioning(req)
        sampler = self._sampler(req, image is not None)
        if image is not None:
            init = self.encode_image(image, req, rng)
            x = sampler.add_noise(init, rng.standard_normal(shape, dtype=np.float32))
        else:
            noise = rng.standard_normal(shape, dtype=np.float32) if latents is None else np.asarray(latents, np.float32)
            if noise.shape != shape:
                raise UserError(f"latents have shape {list(noise.shape)}, expected {list(shape)}")
            x = noise * np.float32(sampler.init_noise_sigma)
        return Generation(req, rng, cond, x, image is not None)

    def run(self, generations: list[Generation], progress: bool = False,
            on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Denoise and decode prepared generations that share one batch_key, their rows side by side in every
        UNet call; returns each one's images, float32 [N, H, W, 3] in [0, 1], as if it had run alone: bit-equal
        where the backend's kernels give a row the same result at any batch size (ONNX Runtime's CPU kernels do,
        tests/test_runtime.py; 0 difference at SD 1.5 512x512), else within float rounding (GPU kernels may pick
        other algorithms for other batch sizes).

        `on_step(done, total)` is called after each denoising step; an exception it raises stops the run.
        """
        first = generations[0]
        if any(g.key != first.key for g in generations):
            raise ValueError("generations in one run must share a batch_key")
        cond = _side_by_side([g.cond for g in generations], first.req.guidance_scale > 1.0)
        for array in cond.values():  # the same arrays every step: a GPU backend keeps them on the device
            array.setflags(write=False)
        x = np.concatenate([g.latents for g in generations]) if len(generations) > 1 else first.latents
        x = self.denoise(x, cond, self._sampler(first.req, first.img2img), first.req, generations, progress, on_step)
        out, start = [], 0
        for g in generations:
            n = g.latents.shape[0]
            out.append(self.decode(x[start:start + n], g.req.vae_tiling))
            start += n
        return out

    def denoise(self, x: np.ndarray, cond: dict[str, np.ndarray], sampler, req: Request,
                generations: list[Generation], progress: bool, on_step=None) -> np.ndarray:
        cfg = req.guidance_scale > 1.0
        timesteps = sampler.timesteps
        bar = _progress_bar(len(timesteps), progress)
        for i, t in enumerate(timesteps):
            x_in = sampler.scale_model_input(x, i)
            if cfg:
                x_in = np.concatenate([x_in, x_in])
            feeds = {"sample": x_in, "timestep": np.full(x_in.shape[0], t, dtype=np.float32), **cond}
            (eps,) = self.backend.run(UNET, feeds)
            if cfg:
                eps_uncond, eps_cond = np.split(eps, 2)
                eps = eps_uncond + req.guidance_scale * (eps_cond - eps_uncond)
                if req.guidance_rescale > 0.0:
                    eps = rescale_guidance(eps, eps_cond, req.guidance_rescale)
            noise = None
            if sampler.needs_noise(i):  # each generation draws its own rows from its own stream
                noise = np.concatenate([g.rng.standard_normal(g.latents.shape, dtype=np.float32)
                                        for g in generations])
            x = sampler.step(eps, i, x, noise)
            if bar:
                bar.update(1)
            if on_step:
                on_step(i + 1, len(timesteps))
        if bar:
            bar.close()
        return x

    def decode(self, latents: np.ndarray, tiled: bool = False) -> np.ndarray:
        """Latents -> float32 [N, H, W, 3] in [0, 1]; `tiled`: in tiles where the latents exceed one, as diffusers'
        enable_vae_tiling (runtime/vae_tiling.py)."""
        latent = self.manifest.vae.from_latents(latents)
        tile_latent, tile_sample = tile_sizes(self.manifest)
        if tiled and needs_tiling(*latent.shape[-2:], tile_latent):
            decoded = tiled_decode(latent, lambda z: self.backend.run(VAE_DECODER, {"latent": z})[0], tile_latent,
                                   tile_sample, self._spatial_axes(VAE_DECODER))
        else:
            (decoded,) = self.backend.run(VAE_DECODER, {"latent": latent})
        return images.postprocess(decoded)

    def _spatial_axes(self, component: str) -> tuple:
        """The (height, width) axes of the component's input: the tile sizes its engine accepts."""
        c = self.manifest.components[component]
        return tuple(c.axes[dim] for dim in c.inputs[0].shape[-2:])

    # -- the call -------------------------------------------------------------------------------------

    def __call__(self, prompt, negative_prompt=None, *, steps: int | None = None, guidance_scale: float | None = None,
                 scheduler: str | None = None, seed: int | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, latents: np.ndarray | None = None,
                 image=None, strength: float = 0.8, eta: float = 0.0, output_type: str = "pil",
                 progress: bool = False, guidance_rescale: float | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, vae_tiling: bool = False):
        """Generate images; returns PIL images, or float32 [N, H, W, 3] in [0, 1] for output_type="np".

        Text-to-image by default; image-to-image when `image` (a PIL image or [H, W, 3] array in [0, 1]) is
        given, keeping `1 - strength` of it. `steps`, `guidance_scale` and `scheduler` left as None take
        `self.defaults`: the engine dir's recommended settings, else 30 steps, guidance 7.5 and the checkpoint's
        own scheduler; `guidance_rescale` left as None takes the engine dir's, else 0.
        `latents` is the initial unit-normal noise with diffusers' meaning (it is multiplied by the scheduler's
        initial noise sigma). `progress` shows a step bar on stderr. With no `negative_prompt` at all, an SDXL
        checkpoint that says force_zeros_for_empty_prompt uses zeros as its unconditional input, as diffusers does.

        SDXL only: `original_size`, `crops_coords_top_left` and `target_size` are the micro-conditioning
        (height, width) pairs, with diffusers' defaults: (height, width), (0, 0), (height, width).
        `vae_tiling` decodes (and encodes the init image) in overlapping tiles of the VAE's sample_size where the
        image is larger, as diffusers' enable_vae_tiling: less memory, and an image that differs slightly.

        The same as `run([prepare(request(...), seed, image, latents)])`; a server batches several prepared
        generations in one `run`.
        """
        if output_type not in ("pil", "np"):
            raise UserError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        req = self.request(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                           height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                           strength=strength, eta=eta, image=image, guidance_rescale=guidance_rescale,
                           original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                           target_size=target_size, vae_tiling=vae_tiling)
        (out,) = self.run([self.prepare(req, seed, image, latents)], progress)
        return images.to_pil(out) if output_type == "pil" else out


def batch_key(req: Request, img2img: bool) -> tuple:
    """Generations with equal keys can share UNet calls: the same latent size and the same scheduler run
    (one timestep and one guidance formula per call). Prompts, seeds, negative prompts and SDXL size
    conditioning may differ: they are per row."""
    return (req.height, req.width, req.steps, req.scheduler, req.guidance_scale, req.guidance_rescale, req.eta,
            img2img, req.strength if img2img else None)


@dataclass
class Generation:
    """One request prepared for the denoising loop: its settings, its own random stream, its conditioning
    (unconditional rows first under guidance) and its starting latents."""

    req: Request
    rng: np.random.Generator
    cond: dict[str, np.ndarray]
    latents: np.ndarray
    img2img: bool

    @property
    def key(self) -> tuple:
        return batch_key(self.req, self.img2img)


def _side_by_side(conds: list[dict[str, np.ndarray]], guided: bool) -> dict[str, np.ndarray]:
    """Several generations' conditioning as one batch: under guidance all unconditional rows, then all
    conditional ones, the layout the loop splits in two."""
    if len(conds) == 1:
        return conds[0]
    out = {}
    for name in conds[0]:
        if guided:
            halves = [np.split(c[name], 2) for c in conds]
            out[name] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[name] = np.concatenate([c[name] for c in conds])
    return out


def rescale_guidance(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """diffusers' rescale_noise_cfg (arXiv 2305.08891 §3.4): scale each image's guided prediction to the standard
    deviation of its conditional one, mixed in by `phi`. torch's std is the unbiased one (ddof=1)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = cond.std(axis=axes, ddof=1, keepdims=True)
    std_guided = guided.std(axis=axes, ddof=1, keepdims=True)
    return (phi * guided * (std_cond / std_guided) + (1.0 - phi) * guided).astype(np.float32)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)
