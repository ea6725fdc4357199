"""`sdrt serve`: the A1111 API through the real webuiapi client, the jobs API, load behaviour, limits, metrics.

Servers run in this process on a free loopback port (uvicorn in a thread) or as the real CLI in a subprocess;
each test stops what it started. A tiny UNet step takes about 3 ms here, so a "long" job is thousands of steps.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")
webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is not installed")

from conftest import free_port, serving, wait_ready
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.serve.config import Limits, ServeConfig

LONG = Limits(max_steps=20_000)  # lets a test hold the worker for seconds


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine, "cpu")


@pytest.fixture(scope="module")
def server(tiny_engine):
    with serving(ServeConfig(tiny_engine, backend="cpu", max_batch=4, limits=LONG)) as (base, app):
        yield base, app


def png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def client(base: str) -> webuiapi.WebUIApi:
    host, port = base.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


# -- the A1111 API through webuiapi, unmodified ------------------------------------------------------------


def test_webuiapi_txt2img_equals_the_pipeline(server, pipe):
    base, _ = server
    r = client(base).txt2img(prompt="a red circle", negative_prompt="blurry", seed=5, width=64, height=64,
                             cfg_scale=6.0, batch_size=2, steps=4)
    assert r.info["seed"] == 5 and r.info["all_seeds"] == [5, 6]
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    for i, image in enumerate(r.images):  # image i remakes alone from seed + i
        alone = pipe("a red circle", "blurry", steps=4, guidance_scale=6.0, scheduler="euler-a", seed=5 + i,
                     height=64, width=64)[0]
        assert np.array_equal(np.asarray(image), np.asarray(alone)), i
    assert r.info["infotexts"][1].endswith("Steps: 4, Sampler: Euler a, CFG scale: 6.0, Seed: 6, Size: 64x64, "
                                           f"Model: {pipe.engine_dir.name}")
    assert r.images[0].info["parameters"] == r.info["infotexts"][0]  # the PNG carries its infotext


def test_webuiapi_img2img_equals_the_pipeline(server, pipe):
    base, _ = server
    init = pipe("a blue square", steps=2, seed=1)[0]
    r = client(base).img2img(images=[init], prompt="a red circle", seed=9, width=64, height=64, steps=6,
                             denoising_strength=0.5, sampler_name="DPM++ 2M", scheduler="Karras")
    alone = pipe("a red circle", "", image=init, strength=0.5, steps=6, guidance_scale=7.0,
                 scheduler="dpmpp-2m-karras", seed=9, height=64, width=64)[0]
    assert np.array_equal(np.asarray(r.image), np.asarray(alone))
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in r.info["infotexts"][0]
    assert "Denoising strength: 0.5" in r.info["infotexts"][0]


def test_webuiapi_lists_and_settings(server, pipe):
    api = client(server[0])
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "PLMS", "LMS", "UniPC", "LCM"} <= set(names)
    assert {s["label"] for s in api.get_schedulers()} >= {"Automatic", "Karras"}
    (model,) = api.get_sd_models()
    assert model["model_name"] == pipe.engine_dir.name
    api.util_set_model(model["title"])  # switching to the model it serves is fine
    assert api.util_get_current_model() == model["title"]
    r = requests.post(f"{server[0]}/sdapi/v1/options", json={"sd_model_checkpoint": "another.safetensors"})
    assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["errors"]
    assert api.get_progress()["state"]["job_count"] == 0


def test_legacy_and_unknown_sampler_names(server, pipe):
    base = server[0]
    r = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "DPM++ 2M Karras",
                                                         "steps": 2, "width": 64, "height": 64, "seed": 3})
    assert r.status_code == 200
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in json.loads(r.json()["info"])["infotexts"][0]
    r = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Heun"})
    assert r.status_code == 422
    assert "sampler_name" in r.json()["errors"] and "Euler a" in r.json()["errors"]  # lists the supported names
    r = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True})
    assert r.status_code == 422 and "enable_hr" in r.json()["errors"]


def test_png_info_and_sd_parsers_read_the_parameters(server):
    sd_parsers = pytest.importorskip("sd_parsers", reason="sd-parsers is not installed")
    base = server[0]
    r = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "a red, circle: big", "negative_prompt": "blurry",
                                                         "seed": 7, "steps": 2, "width": 64, "height": 64,
                                                         "sampler_name": "DPM++ 2M"})
    image_b64 = r.json()["images"][0]
    info = requests.post(f"{base}/sdapi/v1/png-info", json={"image": image_b64}).json()
    assert info["parameters"]["Prompt"] == "a red, circle: big"
    assert info["parameters"]["Seed"] == "7" and info["parameters"]["Schedule type"] == "Karras"
    parsed = sd_parsers.ParserManager().parse(Image.open(io.BytesIO(base64.b64decode(image_b64))))
    assert parsed.generator == sd_parsers.data.Generators.AUTOMATIC1111
    (sampler,) = parsed.samplers
    assert sampler.name == "DPM++ 2M" and sampler.parameters["seed"] == "7"
    assert sampler.parameters["scheduler"] == "Karras"
    assert [p.value for p in parsed.prompts] == ["a red, circle: big"]


# -- the jobs API ------------------------------------------------------------------------------------------


def test_jobs_api_submit_poll_image_and_events(server, pipe):
    base = server[0]
    r = requests.post(f"{base}/v1/generations", json={"prompt": "a red circle", "steps": 5, "seed": 11,
                                                      "scheduler": "ddim", "num_images": 2})
    assert r.status_code == 202 and r.headers["Location"].endswith(r.json()["id"])
    job = r.json()
    done = _wait(base, job["id"])
    assert done["state"] == "succeeded" and done["seeds"] == [11, 12] and len(done["images"]) == 2
    alone = pipe("a red circle", steps=5, seed=12, scheduler="ddim", output_type="np")
    png_bytes = requests.get(f"{base}{done['links']['images'][1]}").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes))), (alone[0] * 255).round().astype(np.uint8))
    schema = requests.get(f"{base}/openapi.json").json()
    assert {"/v1/generations", "/v1/generations/{job_id}", "/sdapi/v1/txt2img", "/metrics"} <= set(schema["paths"])


def test_progress_streams_as_server_sent_events(server):
    base = server[0]
    job = requests.post(f"{base}/v1/generations", json={"prompt": "x", "steps": 800, "seed": 1}).json()
    events = []
    with requests.get(f"{base}{job['links']['events']}", stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and events[-1][1]["state"] == "succeeded"
    running = [e for k, e in events if k == "progress" and e["state"] == "running"]
    steps = [e["step"] for e in running]
    # PNDM (the tiny model's default) makes N + 1 UNet calls: the total is the job's own `steps`.
    assert len(steps) >= 3 and steps == sorted(steps) and all(e["step"] <= e["steps"] for e in running)
    assert max(e["steps"] for e in running) == 801


def test_cancel_mid_job_between_steps(server):
    base = server[0]
    job = requests.post(f"{base}/v1/generations", json={"prompt": "x", "steps": 15000, "seed": 1}).json()
    deadline = time.monotonic() + 30
    while (s := requests.get(f"{base}/v1/generations/{job['id']}").json())["step"] < 2:
        assert time.monotonic() < deadline and s["state"] in ("queued", "running")
        time.sleep(0.02)
    requests.delete(f"{base}/v1/generations/{job['id']}")
    deadline = time.monotonic() + 10
    while (s := requests.get(f"{base}/v1/generations/{job['id']}").json())["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s["state"] == "cancelled" and 2 <= s["step"] < 15000, s
    r = requests.get(f"{base}/v1/generations/{job['id']}/images/0")
    assert r.status_code == 409
    # The worker is free again.
    r = requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "x", "steps": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "succeeded"


def test_a1111_interrupt_answers_409(server):
    base = server[0]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, f"{base}/sdapi/v1/txt2img",
                              json={"prompt": "x", "steps": 15000, "width": 64, "height": 64}, timeout=60)
        deadline = time.monotonic() + 30
        while requests.get(f"{base}/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert requests.post(f"{base}/sdapi/v1/interrupt").status_code == 200
        r = pending.result()
    assert r.status_code == 409 and "interrupted" in r.json()["detail"]


def test_batching_equals_solo(server, pipe):
    """Compatible requests queued together run as one batch, and each image is what it would be alone."""
    base, app = server
    metrics = app.state.sdrt.metrics
    batches_before = metrics.batch_images.collect()[0].samples
    blocker = requests.post(f"{base}/v1/generations", json={"prompt": "x", "steps": 600, "seed": 1}).json()
    settings = {"steps": 4, "scheduler": "euler-a", "guidance_scale": 5.0}
    prompts = [("a red circle", 21), ("a blue square", 22), ("a green dot", 23)]
    jobs = [requests.post(f"{base}/v1/generations", json={"prompt": p, "seed": s, **settings}).json()
            for p, s in prompts]
    assert all(j["state"] == "queued" for j in jobs), "the blocker ended before the batch was queued"
    results = [_wait(base, j["id"]) for j in jobs + [blocker]]
    assert all(r["state"] == "succeeded" for r in results)
    for (prompt, seed), result in zip(prompts, results):
        alone = pipe(prompt, steps=4, scheduler="euler-a", guidance_scale=5.0, seed=seed)[0]
        assert np.array_equal(pixels(result["images"][0]), np.asarray(alone)), prompt
    after = {s.labels.get("le"): s.value for s in metrics.batch_images.collect()[0].samples
             if s.name.endswith("_bucket")}
    before = {s.labels.get("le"): s.value for s in batches_before if s.name.endswith("_bucket")}
    assert after["3.0"] - after["2.0"] - (before.get("3.0", 0) - before.get("2.0", 0)) == 1  # one batch of 3


def _wait(base: str, job_id: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = requests.get(f"{base}/v1/generations/{job_id}").json()
        if s["state"] in ("succeeded", "failed", "cancelled"):
            return s
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_metrics_parse_as_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    base = server[0]
    requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "x", "steps": 2}, timeout=30)
    text = requests.get(f"{base}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("sdrt_queue_depth", "sdrt_jobs_in_flight", "sdrt_stage_seconds", "sdrt_images", "sdrt_rejected",
                 "sdrt_errors", "sdrt_http_requests", "sdrt_batch_images"):
        assert name in families, name
    stages = {s.labels["stage"] for s in families["sdrt_stage_seconds"].samples if "stage" in s.labels}
    assert {"text_encoder", "unet", "vae_decoder", "queue_wait", "job"} <= stages
    assert next(s.value for s in families["sdrt_images"].samples if s.name == "sdrt_images_total") >= 1
    routes = {(s.labels["route"], s.labels["status"]) for s in families["sdrt_http_requests"].samples}
    assert ("/v1/generations", "200") in routes  # labelled by route template, not by path


# -- load behaviour, limits and bad input ------------------------------------------------------------------


def test_burst_beyond_the_queue_gets_503_and_the_rest_are_served(tiny_engine):
    config = ServeConfig(tiny_engine, backend="cpu", queue_size=2, max_batch=1, limits=LONG)
    with serving(config) as (base, app):
        blocker = requests.post(f"{base}/v1/generations", json={"prompt": "x", "steps": 1500}).json()
        while requests.get(f"{base}/v1/generations/{blocker['id']}").json()["state"] == "queued":
            time.sleep(0.01)
        body = {"prompt": "x", "steps": 3, "width": 64, "height": 64}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: requests.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=60),
                                    range(8)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 200] + [503] * 6, codes  # 2 wait in the queue, the rest are turned away
        for r in answers:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["detail"]
            else:
                assert pixels(r.json()["images"][0]).shape == (64, 64, 3)
        rejected = app.state.sdrt.metrics.rejected.labels("queue_full")._value.get()
        assert rejected == 6
        assert _wait(base, blocker["id"])["state"] == "succeeded"


def test_bad_requests_get_the_right_4xx(tiny_engine):
    config = ServeConfig(tiny_engine, backend="cpu", max_body=64 * 1024)
    with serving(config) as (base, _):
        url = f"{base}/sdapi/v1/txt2img"
        r = requests.post(url, data=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
        r = requests.post(url, json={"prompt": "x", "width": 100})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]
        r = requests.post(url, json={"prompt": "x", "width": 4096, "height": 64})
        assert r.status_code == 422 and "outside the engine's limits" in r.json()["errors"]
        r = requests.post(url, json={"prompt": "x", "steps": 0})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
        r = requests.post(url, json={"prompt": "x", "steps": "many"})
        assert r.status_code == 422 and "steps" in r.json()["errors"]
        r = requests.post(url, json={"prompt": "x", "batch_size": 100})
        assert r.status_code == 422 and "batch_size" in r.json()["errors"]
        r = requests.post(f"{base}/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["not base64!"]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_images/0"]
        r = requests.post(f"{base}/sdapi/v1/img2img", json={"init_images": [base64.b64encode(b"junk").decode()]})
        assert r.status_code == 422 and "not a readable image" in r.json()["errors"]
        r = requests.post(f"{base}/sdapi/v1/img2img", json={"prompt": "x"})
        assert r.status_code == 422 and "init_images" in r.json()["errors"]
        r = requests.post(f"{base}/v1/generations", json={"prompt": "x", "strength": 2, "init_image": png(
            Image.new("RGB", (64, 64)))})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "strength"]
        r = requests.post(f"{base}/v1/generations", json={"prompt": "x", "colour": "red"})
        assert r.status_code == 422 and "colour" in r.json()["errors"]  # the native API refuses unknown fields
        r = requests.post(url, data=b"x" * (65 * 1024), headers={"Content-Type": "application/json"})
        assert r.status_code == 413

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(100):
                yield b"x" * 1024

        r = requests.post(url, data=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert requests.get(f"{base}/v1/generations/nope").status_code == 404
        # After all of that, the server still works.
        r = requests.post(url, json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200


def test_a_client_that_goes_away_cancels_its_job(server):
    base, app = server
    cancelled = app.state.sdrt.metrics.jobs.labels("cancelled")._value.get()
    with pytest.raises(requests.Timeout):
        requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "x", "steps": 15000}, timeout=1.0)
    deadline = time.monotonic() + 15
    while app.state.sdrt.metrics.jobs.labels("cancelled")._value.get() == cancelled:
        assert time.monotonic() < deadline, "the abandoned job was not cancelled"
        time.sleep(0.05)
    assert requests.get(f"{base}/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_unusable_text_and_strength_are_422_before_queueing(server):
    base = server[0]
    r = requests.post(f"{base}/sdapi/v1/txt2img", data='{"prompt": "a\\ud800", "steps": 2}',
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    r = requests.post(f"{base}/sdapi/v1/img2img", json={"init_images": [png(Image.new("RGB", (64, 64)))],
                                                        "denoising_strength": 0.01, "steps": 20})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "denoising_strength"]
    assert "no denoising step left" in r.json()["errors"]
    r = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "guidance_scale": "NaN", "cfg_scale": "NaN"})
    assert r.status_code == 422 and "cfg_scale" in r.json()["errors"]


def test_the_worker_survives_a_cancelled_future_and_a_stop_during_decode(tiny_engine):
    """A waiter's cancellation can cancel a job's future; a cancel can land while the last step's images decode.
    Neither may kill the worker or leave a job unfinished."""
    from sdrt.runtime.serve.jobs import JobQueue, JobState
    from sdrt.runtime.serve.metrics import Metrics

    pipe = Pipeline.load(tiny_engine, "cpu")
    decoding, release = threading.Event(), threading.Event()
    decode = pipe.decode

    def slow_decode(latents, *args):
        decoding.set()
        assert release.wait(30)
        return decode(latents, *args)

    pipe.decode = slow_decode
    queue = JobQueue(pipe, Metrics(), max_queue=4, max_batch=1, timeout=60)
    queue.start()
    try:
        specs = [_spec(pipe, "x", seed) for seed in (1, 2)]
        job = queue.submit(specs)
        assert decoding.wait(30)  # image 0 is decoding: its steps are done
        queue.cancel(job.id)
        release.set()
        assert job.future.result(30).state == JobState.CANCELLED
        decoding.clear()
        release.clear()
        other = queue.submit([_spec(pipe, "y", 3)])
        assert other.future.cancel()  # waiting: a concurrent Future can still be cancelled
        assert decoding.wait(30)
        release.set()
        deadline = time.monotonic() + 30
        while not other.state.finished:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert queue.alive and other.state == JobState.SUCCEEDED
        last = queue.submit([_spec(pipe, "z", 4)])
        assert last.future.result(30).state == JobState.SUCCEEDED
    finally:
        release.set()
        queue.stop(30)
    assert not queue.alive


def _spec(pipe, prompt: str, seed: int):
    from sdrt.runtime.serve.jobs import ImageSpec

    return ImageSpec(pipe.request(prompt, steps=3), seed, None, prompt)


def test_timeout_stops_the_job_with_504(tiny_engine):
    config = ServeConfig(tiny_engine, backend="cpu", timeout=1.0, limits=LONG)
    with serving(config) as (base, _):
        start = time.monotonic()
        r = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 15000}, timeout=60)
        assert r.status_code == 504 and "timed out" in r.json()["detail"]
        assert time.monotonic() - start < 10
        r = requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "x", "steps": 2}, timeout=30)
        assert r.status_code == 200


def test_an_internal_error_fails_the_job_not_the_server(tiny_engine, monkeypatch):
    with serving(ServeConfig(tiny_engine, backend="cpu")) as (base, app):
        pipeline = app.state.sdrt.pipeline
        run = pipeline.run

        def broken(generations, **kw):
            if generations[0].req.prompts[0] == "boom":
                raise RuntimeError("the engine fell over")
            return run(generations, **kw)

        monkeypatch.setattr(pipeline, "run", broken)
        r = requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "boom", "steps": 2})
        assert r.status_code == 500 and "the engine fell over" in r.json()["detail"]
        r = requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "fine", "steps": 2})
        assert r.status_code == 200
        text = requests.get(f"{base}/metrics").text
        assert 'sdrt_errors_total{kind="internal"} 1.0' in text


def test_api_key(tiny_engine):
    with serving(ServeConfig(tiny_engine, backend="cpu", api_key="s3cret")) as (base, _):
        assert requests.get(f"{base}/health").status_code == 200  # probes stay open
        r = requests.get(f"{base}/sdapi/v1/samplers")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert requests.get(f"{base}/openapi.json", headers={"X-API-Key": "s3cret"}).status_code == 200
        api = client(base)
        api.set_auth("anyone", "s3cret")  # A1111 clients' Basic auth, the key as password
        assert api.get_sd_models()[0]["model_name"] == tiny_engine.name
        r = requests.get(f"{base}/no-such-route")
        assert r.status_code == 401  # unknown routes are behind the key too


def test_not_ready_until_loaded_and_a_failed_load_is_reported(tmp_path):
    from fastapi.testclient import TestClient
    from sdrt.runtime.serve.app import create_app

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    errors = []
    with TestClient(create_app(ServeConfig(broken, backend="cpu"), on_load_error=errors.append)) as c:
        deadline = time.monotonic() + 10
        while not errors:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and "failed to load" in r.json()["reason"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x"})
        assert r.status_code == 503 and "not an sdrt manifest" in r.json()["detail"]


# -- the CLI -----------------------------------------------------------------------------------------------


def test_cli_serves_and_drains_on_sigterm(tiny_engine):
    """The real `sdrt serve`: JSON logs with request ids; SIGTERM lets the running request finish, exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.runtime.cli", "serve", str(tiny_engine), "--backend", "cpu",
                             "--port", str(port), "--max-steps", "20000"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(requests.post, f"{base}/sdapi/v1/txt2img",
                                  json={"prompt": "x", "steps": 600, "width": 64, "height": 64},
                                  headers={"X-Request-ID": "req-42"}, timeout=60)
            while requests.get(f"{base}/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
                time.sleep(0.02)
            waiting = pool.submit(requests.post, f"{base}/sdapi/v1/txt2img", json={"prompt": "y", "steps": 2},
                                  timeout=60)
            while requests.get(f"{base}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            r, w = running.result(), waiting.result()
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42"  # the running job finishes
        assert w.status_code == 503 and "shutting down" in w.json()["detail"]  # the waiting one is cancelled
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(e.get("request_id") == "req-42" and "/sdapi/v1/txt2img 200" in e["msg"] for e in logs)


def test_cli_refuses_bad_flags_in_one_line(tiny_engine):
    from conftest import assert_one_line_error, run_sdrt

    assert_one_line_error(run_sdrt("serve", str(tiny_engine.parent / "missing")), "engine dir not found")
    assert_one_line_error(run_sdrt("serve", str(tiny_engine), "--queue-size", "0"), "--queue-size")
    assert_one_line_error(run_sdrt("serve", str(tiny_engine), "--timeout", "inf"), "--timeout")
    assert_one_line_error(run_sdrt("serve", str(tiny_engine), "--replicas", "2"), "--replicas", "--ray")
    assert_one_line_error(run_sdrt("serve", str(tiny_engine), "--api-key", " "), "--api-key")
    with socket.socket() as s:  # a port that is taken
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = run_sdrt("serve", str(tiny_engine), "--backend", "cpu", "--port", str(s.getsockname()[1]),
                          timeout=120)
    assert result.returncode == 2 and "cannot listen" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    r = subprocess.run([sys.executable, "-m", "sdrt.runtime.cli", "serve", "--help"], capture_output=True, text=True)
    assert "--queue-size" in r.stdout and "--max-batch" in r.stdout and "--api-key" in r.stdout



def test_batching_defaults_by_where_the_backend_runs(tiny_engine):
    from sdrt.runtime.serve.config import CPU_MAX_BATCH, GPU_MAX_BATCH, on_cpu, serve_config

    assert serve_config(tiny_engine, backend="cpu").max_batch == CPU_MAX_BATCH == 1
    assert serve_config(tiny_engine, backend="cpu", max_batch=3).max_batch == 3
    assert not on_cpu("tensorrt") and not on_cpu("cuda") and GPU_MAX_BATCH == 4


def test_dockerfiles_run_a_valid_sdrt_serve_command():
    """No Docker daemon here: check what can be checked, that the images' commands parse and their COPY
    sources exist."""
    from pathlib import Path

    from sdrt.runtime.cli import build_parser

    root = Path(__file__).resolve().parent.parent
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (root / "docker" / name).read_text()
        directives = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
        for word, rest in directives:
            if word == "COPY" and "--from" not in rest:
                for source in rest.split()[:-1]:
                    assert (root / source).exists(), (name, source)
        command = [*json.loads(dict(directives)["ENTRYPOINT"]), *json.loads(dict(directives)["CMD"])]
        # The GPU image's entrypoint script ends in `exec sdrt "$@"`.
        parsed = build_parser().parse_args([a for a in command if a not in ("sdrt", "sdrt-gpu-entrypoint")])
        assert parsed.command == "serve" and parsed.host == "0.0.0.0" and parsed.port == 7860, name


def test_the_server_imports_no_heavy_packages(tiny_engine):
    code = (
        "import sys, time\n"
        "from fastapi.testclient import TestClient\n"
        "from sdrt.runtime.serve.app import create_app\n"
        "from sdrt.runtime.serve.config import ServeConfig\n"
        f"with TestClient(create_app(ServeConfig({str(tiny_engine)!r}, backend='cpu'))) as c:\n"
        "    while c.get('/ready').status_code != 200: time.sleep(0.05)\n"
        "    assert c.post('/v1/generations?wait=true', json={'prompt': 'x', 'steps': 2}).status_code == 200\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_uploaded_images_are_turned_upright_by_their_exif_orientation():
    from sdrt.runtime.serve.inputs import decode_image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": how phones store portrait photos
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    upright = decode_image("init_image", base64.b64encode(buf.getvalue()).decode(), Limits())
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left edge is now the top
