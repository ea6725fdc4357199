"""OpenAI's Images API over the job queue, so OpenAI clients and SDKs generate from a local engine unmodified.
Reference: https://platform.openai.com/docs/api-reference/images/create (the openai client's ImageGenerateParams).

    POST /v1/images/generations   {prompt, model, n, size, response_format, ...} -> {created, data: [{b64_json}]}
    GET  /v1/models               the one model this server runs (its name is the engine dir's)
    GET  /v1/models/{model}
    GET  /v1/images/files/{id}/{k}.png   a "url" response's image: no API key needed, the job id is the secret

Same as OpenAI: the fields, their defaults (n 1, response_format "b64_json"), unknown fields a 400, errors in
OpenAI's shape ({"error": {message, type, param, code}}; see errors.py), `size` as "WIDTHxHEIGHT" or "auto".

sdrt's own settings pass as extra body fields (`extra_body=` in the openai client): negative_prompt, steps,
guidance_scale, sampler (an sdrt or A1111 name), seed (image i is seeded seed + i). Left out, they take the
engine dir's defaults, as `sdrt generate` does; `size` left out or "auto" is the engine's native size.

Differences, on purpose:
- `model` must name this server's model, or be left out; OpenAI's own names (dall-e-3, gpt-image-1) are a 400.
- `quality`, `style`, `complexity`, `moderation`, `user` and `safety_identifier` are accepted and change nothing:
  they steer or police OpenAI's models, and apps pass them along. So are `output_compression` (PNG is lossless)
  and settings at their off values (`partial_images` 0, `frame_count` 1, `stream` false). Other output formats,
  transparent backgrounds, streaming, animation and SVG are a 400, as is an empty prompt.
- The openai client retries a 409 and any 5xx twice by default. A job that was interrupted (409), timed out
  (504) or failed (500) must not run again behind the caller's back, so those answers carry
  `x-should-retry: false` (errors.py); a full queue or a loading engine (503) stays retryable.
- "url" images live as long as the server keeps the job (its newest 256 jobs or 512 MiB of PNGs), not an hour.
"""

from __future__ import annotations

import base64
import re

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..schedulers import SCHEDULER_NAMES
from .app import job_error, state_of
from .inputs import FieldError, Settings, image_specs, model_name, scheduler_name
from .jobs import JobState

router = APIRouter(prefix="/v1/images", tags=["OpenAI"])
models = APIRouter(prefix="/v1/models", tags=["OpenAI"])

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
NAMES = {"width": "size", "height": "size", "scheduler": "sampler"}


class ImagesRequest(BaseModel):
    """OpenAI's image generation request, plus sdrt's settings as extra fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = Field(None, description="this server's model (GET /v1/models); left out: that one")
    n: int | None = Field(1, description="images, each seeded seed + i")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" within the engine\'s limits (GET /v1/engine), or '
                             '"auto": the native size')
    response_format: str | None = Field("b64_json", description='"b64_json", or "url" (served by this server)')
    output_format: str | None = Field(None, description='"png" only')
    background: str | None = Field(None, description='"auto" or "opaque" only')
    stream: bool | None = Field(None, description="false only")
    partial_images: int | None = Field(None, description="0 only")
    frame_count: int | None = Field(None, description="1 only (no animation)")
    frame_duration_ms: int | None = Field(None, description="accepted and ignored (no animation)")
    svg: dict | None = Field(None, description="null only (no SVG output)")
    output_compression: int | None = Field(None, ge=0, le=100, description="accepted and ignored (PNG is lossless)")
    quality: str | None = Field(None, description="accepted and ignored")
    style: str | None = Field(None, description="accepted and ignored")
    complexity: str | None = Field(None, description="accepted and ignored")
    moderation: str | None = Field(None, description="accepted and ignored")
    user: str | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = Field(None, description="accepted and ignored")
    # sdrt's settings (extra_body)
    negative_prompt: str | None = None
    steps: int | None = Field(None, description="denoising steps; default: the engine dir's")
    guidance_scale: float | None = None
    sampler: str | None = Field(None, description=f"an sdrt name ({', '.join(SCHEDULER_NAMES)}) or an A1111 "
                                "sampler name")
    seed: int | None = Field(None, description="None or -1: random")


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value is None or value == "auto":
        return None, None
    m = SIZE.match(value)
    if not m:
        raise FieldError("size", f"'{value}' is not WIDTHxHEIGHT (e.g. 512x512) or 'auto'")
    return int(m.group(1)), int(m.group(2))


def _check_options(body: ImagesRequest, served: str) -> None:
    if body.model is not None and body.model != served:
        raise FieldError("model", f"this server runs one model, '{served}'; it cannot run '{body.model}'")
    if body.response_format not in (None, "b64_json", "url"):
        raise FieldError("response_format", f"must be 'b64_json' or 'url', got '{body.response_format}'")
    if body.output_format not in (None, "png"):
        raise FieldError("output_format", "sdrt makes PNG images only")
    if body.background not in (None, "auto", "opaque"):
        raise FieldError("background", "sdrt makes opaque images only")
    if body.stream or body.partial_images:
        raise FieldError("stream" if body.stream else "partial_images", "streamed partial images are not supported; "
                         "poll sdrt's jobs API (/v1/generations) for progress")
    if body.frame_count not in (None, 1):
        raise FieldError("frame_count", "sdrt makes still images only")
    if body.svg is not None:
        raise FieldError("svg", "sdrt makes PNG images only")
    if not body.prompt.strip():
        raise FieldError("prompt", "must not be empty")


@router.post("/generations", summary="Create images from a prompt (OpenAI's Images API)",
             responses={400: {"description": "A bad field, in OpenAI's error shape: `param` names it"}})
async def generations(request: Request, body: ImagesRequest):
    state = state_of(request)
    pipe = state.pipe()
    served = model_name(pipe)
    _check_options(body, served)
    width, height = _size(body.size)
    settings = Settings(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                        guidance_scale=body.guidance_scale, scheduler=scheduler_name("sampler", body.sampler),
                        seed=body.seed, width=width, height=height, n=1 if body.n is None else body.n, names=NAMES)
    specs, seeds = await run_in_threadpool(image_specs, pipe, settings, state.config.limits)
    url = body.response_format == "url"
    job = state.submit(specs, request, public=url)
    await state.wait(job, state.config.timeout, request)
    if (error := job_error(job)) is not None:
        raise error
    req = specs[0].request
    if url:
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/v1/images/files/{job.id}/{k}.png"} for k in range(job.images_total)]
    else:
        state.queue.forget(job)  # the answer carries every image
        data = await run_in_threadpool(lambda: [{"b64_json": base64.b64encode(p).decode()} for p in job.pngs])
    for item, seed, spec in zip(data, seeds, specs):
        item.update(revised_prompt=None, seed=seed, infotext=spec.infotext)
    return {"created": int(job.created), "data": data, "size": f"{req.width}x{req.height}",
            "output_format": "png", "quality": None, "background": "opaque"}


@router.get("/files/{job_id}/{index}.png", summary="An image of a 'url' response (no key: the id is the secret)",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def file(request: Request, job_id: str, index: int):
    job = state_of(request).queue.get(job_id)
    if job is None or not job.public or job.state != JobState.SUCCEEDED or not 0 <= index < job.images_total:
        raise HTTPException(404, "no such image (unknown, or its job was forgotten: the server keeps its newest jobs)")
    return Response(job.pngs[index], media_type="image/png")


def _model(request: Request) -> dict:
    pipe = state_of(request).pipe()
    manifest = pipe.engine_dir / "manifest.json"
    return {"id": model_name(pipe), "object": "model", "created": int(manifest.stat().st_mtime),
            "owned_by": "sdrt"}


@models.get("", summary="The model this server runs (OpenAI's model list)")
async def list_models(request: Request):
    return {"object": "list", "data": [_model(request)]}


@models.get("/{model}", summary="One model")
async def get_model(request: Request, model: str):
    found = _model(request)
    if model != found["id"]:
        raise HTTPException(404, f"the model '{model}' does not exist; this server runs '{found['id']}'")
    return found

