"""AUTOMATIC1111's HTTP API (`/sdapi/v1/*`, as of A1111 1.10) over the job queue, so its clients (webuiapi,
Krita, open-webui, ...) work unmodified. Sources: ../shared/research/serving_anchors.md §1-2.

Same as A1111: the request fields and their defaults (steps 50, cfg_scale 7, sampler "Euler", seed -1,
denoising_strength 0.75), unknown fields ignored, `info` a JSON string with seed, all_seeds and infotexts,
images as raw base64 PNGs carrying the infotext, sampler/schedule names both ways (runtime/infotext.py).

Differences, all on purpose:
- width/height left out mean the engine's native size (A1111 says 512; SD 1.x's native size).
- An unsupported sampler, schedule, or a feature sdrt lacks (hires fix, face restoration, tiling, masks,
  scripts, variation seeds) is a 422 naming the field, never silently ignored.
- Image i of a batch is seeded seed + i (A1111's all_seeds) and remakes alone from that seed; sdrt's numpy
  noise is not A1111's torch noise, so the same seed gives a different picture than A1111 would.
- /interrupt stops the running jobs between steps; their requests answer 409, not partly denoised images.
- /options stores what clients set (shown by GET) but only `sd_model_checkpoint` is checked: a server
  serves one engine dir, and naming another one is a 422. `override_settings` may only name that model too.
- Ignored, as webuiapi always sends them: `eta`, `s_churn`, `s_tmax`, `s_tmin`, `s_noise` (A1111 sampler tuning
  that defaults to off), `seed_resize_from_*`, `resize_mode` (the init image is resized to width x height),
  `save_images`, `do_not_save_*`, `hr_*` with `enable_hr` false.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from ..errors import UserError
from ..infotext import SAMPLERS, SCHEDULE_NAMES, parse, to_sdrt
from .app import job_error, state_of
from .inputs import FieldError, Settings, decode_image, image_specs, model_name

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img fields that sdrt reads or refuses; every field nullable."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    seed: int | None = -1
    subseed_strength: float | None = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool | None = False
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool | None = True
    save_images: bool | None = False
    styles: list[str] | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    denoising_strength: float | None = 0.75
    resize_mode: int | None = 0
    mask: str | None = None


class PngInfoRequest(BaseModel):
    image: str = ""


A1111_NAMES = {"n": "batch_size", "guidance_scale": "cfg_scale", "strength": "denoising_strength",
               "scheduler": "sampler_name", "init_images": "init_images"}


def _refuse_unsupported(body: Txt2ImgRequest, pipe) -> None:
    """Fields that would change the picture in A1111 and that sdrt cannot honour."""
    for name in ("restore_faces", "tiling", "enable_hr"):
        if getattr(body, name):
            raise FieldError(name, "is not supported by sdrt")
    if body.script_name:
        raise FieldError("script_name", "scripts are not supported by sdrt")
    if body.alwayson_scripts:
        raise FieldError("alwayson_scripts", f"extensions are not supported by sdrt: {', '.join(body.alwayson_scripts)}")
    if body.subseed_strength:
        raise FieldError("subseed_strength", "variation seeds are not supported by sdrt")
    if body.styles:
        raise FieldError("styles", "saved styles are not supported by sdrt")
    if isinstance(body, Img2ImgRequest) and body.mask:
        raise FieldError("mask", "inpainting is not supported by sdrt")
    for key, value in (body.override_settings or {}).items():
        if key != "sd_model_checkpoint":
            raise FieldError(f"override_settings/{key}", "per-request settings are not supported by sdrt")
        if value not in model_names(pipe):
            raise FieldError("override_settings/sd_model_checkpoint", f"this server serves one engine dir, "
                             f"{model_names(pipe)[0]}; it cannot switch to {value!r}")


def _scheduler(body: Txt2ImgRequest) -> str:
    field = "sampler_name" if body.sampler_name else "sampler_index"
    try:
        return to_sdrt(body.sampler_name or body.sampler_index or "Euler", body.scheduler)
    except UserError as e:
        raise FieldError("scheduler" if "schedule type" in str(e) and "sampler" not in str(e) else field,
                         str(e)) from None


def _settings(request: Request, body: Txt2ImgRequest, init_images: tuple = (), strength: float = 0.8) -> Settings:
    state = state_of(request)
    _refuse_unsupported(body, state.pipe())
    batch, n_iter = body.batch_size or 1, body.n_iter or 1
    for name, value in (("batch_size", batch), ("n_iter", n_iter)):
        if value < 1:
            raise FieldError(name, f"must be at least 1, got {value}")
    if batch * n_iter > state.config.limits.max_images:
        raise FieldError("n_iter" if n_iter > 1 else "batch_size", f"batch_size x n_iter = {batch * n_iter} "
                         f"images; this server makes 1 to {state.config.limits.max_images} per request")
    return Settings(prompt=body.prompt or "", negative_prompt=body.negative_prompt or "",
                    steps=50 if body.steps is None else body.steps,
                    guidance_scale=7.0 if body.cfg_scale is None else body.cfg_scale,
                    scheduler=_scheduler(body), seed=-1 if body.seed is None else body.seed,
                    width=body.width or None, height=body.height or None, n=batch * n_iter,
                    init_images=init_images, strength=strength, names=A1111_NAMES)


async def _generate(request: Request, body: Txt2ImgRequest, settings: Settings) -> dict:
    state = state_of(request)
    pipe = state.pipe()
    specs, seeds = await run_in_threadpool(image_specs, pipe, settings, state.config.limits)
    job = state.submit(specs, request)
    await state.wait(job, state.config.timeout, request)
    if (error := job_error(job)) is not None:
        raise error
    state.queue.forget(job)  # this answer carries every image: nothing is left to poll
    sampler, schedule = _names(specs[0].request.scheduler)
    req = specs[0].request
    infotexts = [s.infotext for s in specs]
    n = len(specs)
    info = {
        "prompt": settings.prompt, "all_prompts": [settings.prompt] * n,
        "negative_prompt": settings.negative_prompt, "all_negative_prompts": [settings.negative_prompt] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": req.width, "height": req.height, "sampler_name": sampler, "scheduler": schedule,
        "cfg_scale": req.guidance_scale, "steps": req.steps, "batch_size": body.batch_size or 1,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name(pipe),
        "sd_model_hash": _short_hash(pipe), "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": req.strength if specs[0].image is not None else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"sdrt {request.app.version}", "job_id": job.id,
    }
    images = await run_in_threadpool(_b64, job.pngs) if body.send_images is not False else []
    return {"images": images, "parameters": body.model_dump(exclude={"init_images"}), "info": json.dumps(info)}


def _b64(pngs: list[bytes]) -> list[str]:
    return [base64.b64encode(p).decode() for p in pngs]


def _names(scheduler: str) -> tuple[str, str]:
    from ..infotext import from_sdrt

    sampler, schedule = from_sdrt(scheduler)
    return sampler.name, schedule


def _short_hash(pipe) -> str:
    fp = str(pipe.manifest.source.get("fingerprint", ""))
    return fp.partition(":")[2][:10] or "unknown"


@router.post("/txt2img", summary="Text to image (A1111)")
async def txt2img(request: Request, body: Txt2ImgRequest):
    return await _generate(request, body, _settings(request, body))


@router.post("/img2img", summary="Image to image (A1111)")
async def img2img(request: Request, body: Img2ImgRequest):
    if not body.init_images:
        raise FieldError("init_images", "at least one init image is required", status=422)
    limits = state_of(request).config.limits
    images = []
    for i, data in enumerate(body.init_images):
        images.append(await run_in_threadpool(decode_image, f"init_images/{i}", data, limits))
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    return await _generate(request, body, _settings(request, body, tuple(images), strength))


@router.get("/samplers", summary="Samplers sdrt runs, with A1111's names")
async def samplers():
    return [{"name": s.name, "aliases": list(s.aliases),
             "options": {"scheduler": SCHEDULE_NAMES[s.schedules[0][0]]} if len(s.schedules) > 1 else {}}
            for s in SAMPLERS]


@router.get("/schedulers", summary="Schedule types")
async def schedulers():
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for label, name in SCHEDULE_NAMES.items()]


def _model(pipe) -> dict:
    name = model_name(pipe)
    fp = str(pipe.manifest.source.get("fingerprint", ""))
    return {"title": f"{name} [{_short_hash(pipe)}]", "model_name": name, "hash": _short_hash(pipe),
            "sha256": fp.partition(":")[2] or None, "filename": str(pipe.engine_dir.resolve()), "config": None}


def model_names(pipe) -> tuple[str, ...]:
    """What names the served model: A1111's title (first), its name, its short hash."""
    model = _model(pipe)
    return model["title"], model["model_name"], model["hash"]


@router.get("/sd-models", summary="The one engine dir this server runs")
async def sd_models(request: Request):
    return [_model(state_of(request).pipe())]


@router.get("/options", summary="Settings (sd_model_checkpoint is the engine dir)")
async def get_options(request: Request):
    state = state_of(request)
    model = _model(state.pipe())
    return {**state.options, "sd_model_checkpoint": model["title"], "sd_checkpoint_hash": model["sha256"],
            "samples_format": "png"}


@router.post("/options", summary="Set settings; sd_model_checkpoint must name this server's engine dir")
async def set_options(request: Request, body: dict[str, Any]):
    state = state_of(request)
    model = _model(state.pipe())
    wanted = body.get("sd_model_checkpoint")
    if wanted is not None and wanted not in model_names(state.pipe()):
        raise FieldError("sd_model_checkpoint", f"this server serves one engine dir, {model['title']}; "
                         f"it cannot switch to {wanted!r}")
    state.options.update({k: v for k, v in body.items() if k != "sd_model_checkpoint"})


@router.get("/progress", summary="Progress of the running job (A1111's global view)")
async def progress(request: Request, skip_current_image: bool = False):
    state = state_of(request)
    status = state.queue.status()
    current = status["current"]
    job_count = status["waiting"] + status["running"]
    if current is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": _state(job_count, 0, 0, ""),
                "current_image": None, "textinfo": None, "current_task": None}
    job, step, steps, frac, started = current
    elapsed = time.time() - (started or time.time())
    eta = elapsed / frac - elapsed if frac > 0 else 0.0
    return {"progress": frac, "eta_relative": eta, "state": _state(job_count, step, steps, job.id, job.created),
            "current_image": None, "textinfo": None, "current_task": job.id}


def _state(job_count: int, step: int, steps: int, job: str, created: float | None = None) -> dict:
    return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": job,
            "job_count": job_count, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(created))
            if created else "0", "job_no": 0, "sampling_step": step, "sampling_steps": steps}


@router.post("/interrupt", summary="Stop the running jobs between steps (their requests answer 409)")
async def interrupt(request: Request):
    state_of(request).queue.interrupt()
    return {}


@router.post("/skip", summary="As /interrupt (sdrt has no per-image skip)")
async def skip(request: Request):
    state_of(request).queue.interrupt()


@router.post("/png-info", summary="Read the generation parameters from a PNG")
async def png_info(request: Request, body: PngInfoRequest):
    if not body.image:
        raise FieldError("image", "an image is required")
    image = await run_in_threadpool(_png_text, body.image, state_of(request).config.limits)
    text = image.pop("parameters", None)
    if text is None:
        return {"info": "", "items": image, "parameters": {}}
    return {"info": text, "items": image, "parameters": parse(text)}


def _png_text(data: str, limits) -> dict:
    from io import BytesIO

    from PIL import Image

    decode_image("image", data, limits)  # the checks: base64, size, readable
    raw = base64.b64decode(data.partition(",")[2] if data.startswith("data:") else "".join(data.split()))
    with Image.open(BytesIO(raw)) as im:
        return {k: v for k, v in im.info.items() if isinstance(v, str)}


@router.get("/scripts", summary="Scripts (none: sdrt runs no A1111 extensions)")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/sd-vae", summary="Separate VAEs (none: the engine dir has its own)")
async def sd_vae():
    return []
