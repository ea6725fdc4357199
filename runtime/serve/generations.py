"""sdrt's own jobs API: submit, poll, stream progress, fetch images, cancel, with sdrt's names and defaults.

    POST   /v1/generations            -> 202 {id, state, queue_position, ...}; ?wait=true answers when done
    GET    /v1/generations/{id}       -> state, step k/N, images done; seeds, infotexts and images once done
    GET    /v1/generations/{id}/events    server-sent events: `progress` on every step, then `done`
    GET    /v1/generations/{id}/images/{k}   image k as image/png
    DELETE /v1/generations/{id}       -> cancel: at once if waiting, between denoising steps if running

Left-out settings take the engine dir's recommendations (what `sdrt generate` does), not A1111's.
"""

from __future__ import annotations

import asyncio
import base64
import json

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..schedulers import SCHEDULER_NAMES
from .app import job_error, state_of
from .inputs import Settings, decode_image, image_specs, scheduler_name
from .jobs import Job, JobState

router = APIRouter(prefix="/v1/generations", tags=["jobs"])

EVENT_POLL = 0.1  # seconds between progress checks of a streamed job


class GenerationIn(BaseModel):
    """One request: N images of one prompt, image i seeded seed + i."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = Field(None, description="denoising steps; default: the engine dir's")
    guidance_scale: float | None = None
    scheduler: str | None = Field(None, description=f"an sdrt name ({', '.join(SCHEDULER_NAMES)}) or an A1111 "
                                  "sampler name")
    seed: int | None = Field(None, description="None or -1: random (reported back)")
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    init_image: str | None = Field(None, description="base64 image (or data URI) for image-to-image")
    strength: float = 0.8
    guidance_rescale: float | None = None
    timeout: float | None = Field(None, gt=0, description="seconds, at most the server's --timeout")


def _view(request: Request, job: Job, images: bool) -> dict:
    state = state_of(request)
    out = state.queue.snapshot(job)
    base = f"/v1/generations/{job.id}"
    out["seeds"] = [s.seed for s in job.specs]
    out["links"] = {"self": base, "events": f"{base}/events",
                    "images": [f"{base}/images/{k}" for k in range(job.images_total)]}
    if job.state == JobState.SUCCEEDED:
        out["infotexts"] = [s.infotext for s in job.specs]
        if images:
            out["images"] = [base64.b64encode(p).decode() for p in job.pngs]
    return out


@router.post("", status_code=202, summary="Submit a generation (returns a job id; ?wait=true waits for the images)")
async def submit(request: Request, body: GenerationIn, wait: bool = Query(False, description="answer when done")):
    state = state_of(request)
    pipe = state.pipe()
    images = ()
    if body.init_image is not None:
        images = (await run_in_threadpool(decode_image, "init_image", body.init_image, state.config.limits),)
    settings = Settings(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                        guidance_scale=body.guidance_scale, scheduler=scheduler_name("scheduler", body.scheduler),
                        seed=body.seed, width=body.width, height=body.height, n=body.num_images, init_images=images,
                        strength=body.strength, guidance_rescale=body.guidance_rescale, names={"n": "num_images"})
    specs, _ = await run_in_threadpool(image_specs, pipe, settings, state.config.limits)
    timeout = min(body.timeout or state.config.timeout, state.config.timeout)
    job = state.submit(specs, request, timeout)
    headers = {"Location": f"/v1/generations/{job.id}"}
    if not wait:
        return JSONResponse(_view(request, job, False), status_code=202, headers=headers)
    await state.wait(job, timeout, request)
    if (error := job_error(job)) is not None:
        raise error
    return JSONResponse(await run_in_threadpool(_view, request, job, True), status_code=200, headers=headers)


def _job(request: Request, job_id: str) -> Job:
    job = state_of(request).queue.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or finished long enough ago to be forgotten)")
    return job


@router.get("/{job_id}", summary="A job's state and progress; its images once done")
async def status(request: Request, job_id: str, images: bool = Query(True, description="include base64 PNGs")):
    return await run_in_threadpool(_view, request, _job(request, job_id), images)  # base64 off the loop


@router.delete("/{job_id}", summary="Cancel a job (between denoising steps if it is running)")
async def cancel(request: Request, job_id: str):
    job = _job(request, job_id)
    state_of(request).queue.cancel(job.id)
    return _view(request, job, False)


@router.get("/{job_id}/images/{index}", summary="One image of a finished job, as PNG",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def image(request: Request, job_id: str, index: int):
    job = _job(request, job_id)
    if not 0 <= index < job.images_total:
        raise HTTPException(404, f"job {job_id} has images 0..{job.images_total - 1}")
    if job.state != JobState.SUCCEEDED:
        raise HTTPException(409, f"job {job_id} is {job.state.value}; its images are not ready")
    return Response(job.pngs[index], media_type="image/png")


@router.get("/{job_id}/events", summary="Server-sent events: progress on each step, then done")
async def events(request: Request, job_id: str):
    job = _job(request, job_id)
    state = state_of(request)

    async def stream():
        last = None
        while True:
            snap = state.queue.snapshot(job)
            key = (snap["state"], snap["step"], snap["images_done"])
            if key != last:
                last = key
                finished = JobState(snap["state"]).finished
                yield f"event: {'done' if finished else 'progress'}\ndata: {json.dumps(snap)}\n\n"
                if finished:
                    return
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
