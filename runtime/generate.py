"""`sdrt generate`: run a Pipeline from CLI settings and write PNGs with A1111 parameters (runtime/infotext.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import images
from .errors import UserError
from .infotext import Infotext
from .manifest import GenerationDefaults, Manifest
from .pipeline import Pipeline, check_size


@dataclass(frozen=True)
class GenerateRequest:
    engine_dir: Path
    prompt: str
    negative_prompt: str
    steps: int | None  # None: the engine dir's recommended setting, else sdrt's default
    guidance_scale: float | None
    scheduler: str | None
    seed: int
    height: int | None
    width: int | None
    num_images: int
    init_image: Path | None
    strength: float
    backend: str
    out: Path
    guidance_rescale: float | None = None
    vae_tiling: bool = False  # diffusers' enable_vae_tiling (runtime/vae_tiling.py)
    cpu_precision: str = "auto"  # the openvino backend's (runtime/backend_openvino.py)


def output_paths(out: Path, n: int) -> list[Path]:
    out = out if out.suffix.lower() == ".png" else out.with_suffix(".png")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, n + 1)]


def generate(req: GenerateRequest) -> list[Path]:
    """Check every setting that needs no engine first, then load, generate and write the PNGs."""
    if not 0.0 < req.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {req.strength}")
    if req.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {req.num_images}")
    asked = GenerationDefaults.from_flags(
        {"guidance_scale": "--guidance-scale", "steps": "--steps", "guidance_rescale": "--guidance-rescale"},
        req.guidance_scale, req.steps, req.scheduler, req.guidance_rescale)
    init = images.load_image(req.init_image) if req.init_image is not None else None
    manifest = Manifest.load(req.engine_dir)
    if init is not None and (req.height is None or req.width is None):
        h = req.height or init.height // 8 * 8
        w = req.width or init.width // 8 * 8
    else:
        h = req.height or manifest.native_resolution[0]
        w = req.width or manifest.native_resolution[1]
    check_size(manifest, h, w)
    if not req.out.parent.is_dir():
        raise UserError(f"output folder {req.out.parent} does not exist")

    pipe = Pipeline.load(req.engine_dir, backend=req.backend, cpu_precision=req.cpu_precision)
    settings = asked.over(pipe.defaults)
    request = pipe.request(req.prompt, req.negative_prompt or None, steps=settings.steps,
                           guidance_scale=settings.guidance_scale, scheduler=settings.scheduler, height=h, width=w,
                           image=init, strength=req.strength, guidance_rescale=settings.guidance_rescale,
                           vae_tiling=req.vae_tiling)
    # Image i is seeded seed + i (A1111's all_seeds, as `sdrt serve` does): each PNG's parameters remake it alone.
    seeds = [req.seed + i for i in range(req.num_images)]
    results = pipe.run([pipe.prepare(request, seed, init) for seed in seeds], progress=True)
    paths = output_paths(req.out, req.num_images)
    for out, seed, path in zip(results, seeds, paths):
        text = Infotext(req.prompt, req.negative_prompt, settings.steps, settings.scheduler, settings.guidance_scale,
                        seed, w, h, Path(req.engine_dir).resolve().name, req.strength if init is not None else None,
                        settings.guidance_rescale).text()
        images.save_png(images.to_pil(out)[0], path, text)
    return paths
