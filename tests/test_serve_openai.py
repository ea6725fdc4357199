"""`sdrt serve`'s OpenAI Images API through the official `openai` client, unmodified; /v1/engine; the offline
/docs page; `--no-ui`. The playground itself is driven in a real browser in test_serve_browser.py.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from conftest import serving
from sdrt.runtime.manifest import UNET
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from sdrt.runtime.serve.config import Limits, ServeConfig

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine, "cpu")


@pytest.fixture(scope="module")
def server(tiny_engine):
    with serving(ServeConfig(tiny_engine, backend="cpu", max_batch=4)) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def keyed(tiny_engine):
    config = ServeConfig(tiny_engine, backend="cpu", api_key=KEY, allowed_origins=("http://allowed.example:8080",))
    with serving(config) as (base, app):
        yield base


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def counter(base: str, name: str, **labels) -> float:
    """The sum of a metric's samples that carry `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_openai_client_images_equal_the_pipeline(server, pipe):
    base, _ = server
    images_before = counter(base, "sdrt_images_total")
    r = client(base).images.generate(
        prompt="a red circle", n=2, size="96x64", model=pipe.engine_dir.name,
        extra_body={"seed": 7, "steps": 4, "sampler": "Euler a", "negative_prompt": "blurry", "guidance_scale": 5.0})
    assert len(r.data) == 2 and r.size == "96x64"
    for i, item in enumerate(r.data):  # image i is seeded seed + i and remakes alone
        image = decoded(item.b64_json)
        assert image.format == "PNG" and image.size == (96, 64)
        alone = pipe("a red circle", "blurry", steps=4, guidance_scale=5.0, scheduler="euler-a", seed=7 + i,
                     height=64, width=96)[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(alone)), i
        assert item.model_extra["seed"] == 7 + i
        assert image.info["parameters"] == item.model_extra["infotext"]
    assert counter(base, "sdrt_images_total") == images_before + 2  # the queue and metrics the others use
    assert counter(base, "sdrt_http_requests_total", route="/v1/images/generations", status="200") >= 1


def test_defaults_native_size_and_ignored_openai_options(server, pipe):
    base, _ = server
    r = client(base).images.generate(prompt="a blue square", size="auto", quality="hd", style="vivid", user="u1",
                                     extra_body={"seed": 3, "steps": 2})
    h, w = pipe.manifest.native_resolution
    assert [decoded(d.b64_json).size for d in r.data] == [(w, h)]
    default = client(base).images.generate(prompt="a blue square", extra_body={"seed": 3, "steps": 2})
    assert default.data[0].b64_json == r.data[0].b64_json  # quality/style/user change nothing


def test_fields_apps_pass_along_are_accepted(server):
    base, _ = server
    c = client(base)
    plain = c.images.generate(prompt="a green star", extra_body={"seed": 2, "steps": 2})
    # Through extra_body: older clients lack some of these keywords; newer ones send the same JSON.
    passed = c.images.generate(prompt="a green star", quality="auto", response_format=None, n=None,
                               extra_body={"seed": 2, "steps": 2, "complexity": "low", "frame_count": 1,
                                           "safety_identifier": "hash-of-a-user", "moderation": "auto",
                                           "output_compression": 80, "partial_images": 0, "background": "auto",
                                           "output_format": "png"})
    assert passed.data[0].b64_json == plain.data[0].b64_json


def test_a_failed_job_is_not_run_again_by_the_clients_retries(tiny_engine):
    """The client retries 409 and 5xx twice by default; a timed-out job must not be silently resubmitted."""
    with serving(ServeConfig(tiny_engine, backend="cpu", timeout=1.0, limits=Limits(max_steps=20_000))) as (base, _):
        retrying = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=2, timeout=60)
        with pytest.raises(openai.APIStatusError) as raised:
            retrying.images.generate(prompt="slow", extra_body={"steps": 20_000})
        assert raised.value.status_code == 504 and raised.value.response.headers["x-should-retry"] == "false"
        assert raised.value.body["type"] == "server_error"
        assert counter(base, "sdrt_http_requests_total", route="/v1/images/generations") == 1
        assert counter(base, "sdrt_jobs_total") == 1


def test_openai_error_shape_on_every_route_and_status(tiny_engine):
    with serving(ServeConfig(tiny_engine, backend="cpu", max_body=4096)) as (base, _):
        for method, path, kwargs, status in (
                ("GET", "/v1/images/nothing", {}, 404),
                ("GET", "/v1/images/generations", {}, 405),
                ("POST", "/v1/images/generations", {"json": {"prompt": "x" * 8000}}, 413),
                ("POST", "/v1/images/generations", {"json": {"prompt": "x", "n": "two"}}, 400)):
            r = requests.request(method, f"{base}{path}", timeout=10, **kwargs)
            error = r.json()["error"]
            assert r.status_code == status and isinstance(error, dict) and error["message"], (path, r.text)
            assert error["type"] == "invalid_request_error"


def test_url_response_serves_the_image_from_the_app(server):
    base, _ = server
    c = client(base)
    by_url = c.images.generate(prompt="a red circle", response_format="url", extra_body={"seed": 4, "steps": 3})
    inline = c.images.generate(prompt="a red circle", extra_body={"seed": 4, "steps": 3})
    url = by_url.data[0].url
    assert url.startswith(f"{base}/v1/images/files/") and url.endswith("/0.png")
    got = requests.get(url, timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.content))), np.asarray(decoded(inline.data[0].b64_json)))
    assert requests.get(url.replace("/0.png", "/1.png"), timeout=10).status_code == 404
    # A job from another front door is not reachable through the key-less files route.
    job = requests.post(f"{base}/v1/generations?wait=true", json={"prompt": "x", "steps": 2}, timeout=60).json()
    assert requests.get(f"{base}/v1/images/files/{job['id']}/0.png", timeout=10).status_code == 404


def test_models_list_and_retrieve(server, pipe):
    base, _ = server
    c = client(base)
    listed = c.models.list().data
    assert [m.id for m in listed] == [pipe.engine_dir.name] and listed[0].owned_by == "sdrt"
    assert c.models.retrieve(pipe.engine_dir.name).id == pipe.engine_dir.name
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("dall-e-3")


@pytest.mark.parametrize("kwargs, param", [
    ({"size": "100x64"}, "size"),  # not a multiple of 8
    ({"size": "4096x4096"}, "size"),  # beyond the engine's limits
    ({"size": "big"}, "size"),
    ({"model": "dall-e-3"}, "model"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"response_format": "xml"}, "response_format"),
    ({"output_format": "webp"}, "output_format"),
    ({"extra_body": {"sampler": "nope"}}, "sampler"),
    ({"extra_body": {"steps": 0}}, "steps"),
    ({"extra_body": {"seed": "abc"}}, "seed"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"prompt": "  "}, "prompt"),
    ({"extra_body": {"partial_images": 2}}, "partial_images"),
    ({"extra_body": {"frame_count": 3}}, "frame_count"),
    ({"extra_body": {"svg": {"model": "x"}}}, "svg"),
    ({"background": "transparent"}, "background"),
])
def test_bad_requests_raise_the_clients_error_naming_the_field(server, kwargs, param):
    base, _ = server
    with pytest.raises(openai.BadRequestError) as raised:
        client(base).images.generate(**{"prompt": "x", **kwargs})
    error = raised.value.body  # OpenAI's shape: {"error": {message, type, param, code}} (the client unwraps it)
    assert raised.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"]


def test_openai_errors_keep_openai_shape_outside_the_handlers(server):
    base, _ = server
    bad_json = requests.post(f"{base}/v1/images/generations", data=b"{not json", timeout=10,
                             headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    streamed = requests.post(f"{base}/v1/images/generations", json={"prompt": "x", "stream": True}, timeout=10)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    # The A1111 routes keep A1111's shape.
    a1111 = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "width": 100}, timeout=10)
    assert a1111.status_code == 422 and isinstance(a1111.json()["error"], str)


def test_api_key(keyed):
    base = keyed
    r = client(base, KEY).images.generate(prompt="x", response_format="url", extra_body={"steps": 2})
    with pytest.raises(openai.AuthenticationError) as raised:
        client(base, "wrong").images.generate(prompt="x", extra_body={"steps": 2})
    assert raised.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").models.list()
    # A "url" image is a capability URL, as OpenAI's are: no key needed. The jobs API still wants the key.
    url = r.data[0].url
    assert requests.get(url, timeout=10).status_code == 200
    job_id = re.search(r"/files/([0-9a-f]+)/", url).group(1)
    assert requests.get(f"{base}/v1/generations/{job_id}/images/0", timeout=10).status_code == 401
    # Pages ask a browser for Basic credentials; API routes say Bearer.
    assert requests.get(f"{base}/", timeout=10).headers["www-authenticate"].startswith("Basic")
    assert requests.get(f"{base}/docs", timeout=10).headers["www-authenticate"].startswith("Basic")
    assert requests.get(f"{base}/v1/engine", timeout=10).headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{base}/", auth=("anyone", KEY), timeout=10).status_code == 200
    assert requests.get(f"{base}/redoc", timeout=10).headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("headers, allowed", [
    ({"Origin": "http://evil.example"}, False),
    ({"Origin": "null"}, False),
    ({"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}, False),
    ({"Sec-Fetch-Site": "same-site"}, False),  # another port of the same host is another origin
    ({"Sec-Fetch-Site": "same-origin"}, True),
    ({"Sec-Fetch-Site": "none"}, True),  # typed into the address bar
    ({}, True),  # not a browser
    ({"Origin": "ORIGIN"}, True),  # the playground itself, without Sec-Fetch-* (plain http to another host)
    ({"Origin": "https://public.example", "X-Forwarded-Host": "public.example"}, True),  # behind a proxy
    ({"Origin": "https://Public.Example", "X-Forwarded-Host": "edge.example, public.example:443"}, True),
    ({"Origin": "https://public.example", "Forwarded": 'for=1.2.3.4;host="public.example";proto=https'}, True),
    ({"Origin": "https://public.example", "X-Forwarded-Host": "public.example:8443"}, False),
    ({"Origin": "http://allowed.example:8080"}, True),  # --allow-origin
])
def test_cross_site_requests_from_a_browser_are_refused(keyed, headers, allowed):
    """A browser sends the playground's remembered key (and reaches a key-less server on localhost) from any
    site's page; a form or a body-less POST needs no CORS preflight. State-changing requests from other sites
    are refused; reading stays open to what the key allows."""
    base = keyed
    headers = {k: v.replace("ORIGIN", base) for k, v in headers.items()}
    auth = ("me", KEY)
    for method, path in (("POST", "/sdapi/v1/interrupt"), ("POST", "/v1/images/generations"),
                         ("DELETE", "/v1/generations/nope")):
        r = requests.request(method, f"{base}{path}", headers=headers, auth=auth, timeout=60,
                             json={"prompt": "x", "steps": 2} if "images" in path else None)
        assert (r.status_code != 403) == allowed, (method, path, r.status_code, r.text)
    assert requests.get(f"{base}/v1/engine", headers=headers, auth=auth, timeout=10).status_code == 200


def test_a_keyless_server_on_loopback_answers_only_loopback_names(tiny_engine):
    """DNS rebinding: a page whose name is re-pointed to 127.0.0.1 is same-origin with itself; its requests
    carry its own name as Host, and a key-less server on loopback refuses them."""
    from sdrt.runtime.serve.server import listening_config

    config = ServeConfig(tiny_engine, backend="cpu")
    assert listening_config(config, "127.0.0.1").local_only and listening_config(config, "::1").local_only
    assert listening_config(config, "localhost").local_only
    assert not listening_config(config, "0.0.0.0").local_only
    assert not listening_config(ServeConfig(tiny_engine, api_key=KEY), "127.0.0.1").local_only
    with serving(listening_config(ServeConfig(tiny_engine, backend="cpu", allowed_hosts=("sdrt.test",)),
                                  "127.0.0.1")) as (base, _):
        port = base.rsplit(":", 1)[1]
        for host, status in ((f"attacker.example:{port}", 400), (f"127.0.0.1:{port}", 200),
                             (f"localhost:{port}", 200), (f"[::1]:{port}", 200), (f"sdrt.test:{port}", 200)):
            r = requests.get(f"{base}/v1/engine", headers={"Host": host}, timeout=10)
            assert r.status_code == status, (host, r.text)
        assert "localhost" in requests.get(f"{base}/", headers={"Host": "evil"}, timeout=10).json()["errors"]


def test_origin_and_host_flags_are_checked(tiny_engine):
    from sdrt.runtime.errors import UserError
    from sdrt.runtime.serve.config import serve_config

    ok = serve_config(tiny_engine, backend="cpu", allowed_origins=["HTTPS://Public.Example"],
                      allowed_hosts=["Sdrt.Test", "[::2]"])
    assert ok.allowed_origins == ("https://public.example:443",) and ok.allowed_hosts == ("sdrt.test", "::2")
    assert serve_config(tiny_engine, backend="cpu", allowed_origins="http://a.example").allowed_origins == \
        ("http://a.example:80",)  # Ray's `serve run ... allowed_origins=...` passes one string
    for kwargs, flag in (({"allowed_origins": ["public.example"]}, "--allow-origin"),
                         ({"allowed_origins": ["https://x.example/path"]}, "--allow-origin"),
                         ({"allowed_hosts": ["sdrt.test:8080"]}, "--allow-host")):
        with pytest.raises(UserError, match=flag):
            serve_config(tiny_engine, backend="cpu", **kwargs)


def test_pages_may_not_be_framed_and_load_only_their_own_files(server):
    base, _ = server
    for path in ("/", "/docs"):
        headers = requests.get(f"{base}{path}", timeout=10).headers
        assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "http" not in headers["content-security-policy"]


def test_engine_info_describes_what_a_client_may_ask(server, pipe):
    base, _ = server
    info = requests.get(f"{base}/v1/engine", timeout=10).json()
    m = pipe.manifest
    f, axes = m.vae_scale_factor, m.components[UNET].axes
    assert info["model"] == pipe.engine_dir.name and info["family"] == m.family
    assert info["width"] == {"min": axes["latent_width"].min * f, "max": axes["latent_width"].max * f,
                             "step": axes["latent_width"].multiple_of * f}
    assert (info["native"]["height"], info["native"]["width"]) == tuple(m.native_resolution)
    assert [s["name"] for s in info["samplers"]] == list(SCHEDULER_NAMES)
    assert {"name": "euler-a", "a1111": "Euler a"} in info["samplers"]
    assert {"name": "dpmpp-2m-karras", "a1111": "DPM++ 2M Karras"} in info["samplers"]
    assert info["defaults"]["steps"] == pipe.defaults.steps and info["img2img"] is True
    assert info["limits"]["max_images"] == Limits().max_images
    for axis in ("width", "height"):  # every size the form offers is one the engine takes
        for px in range(info[axis]["min"], info[axis]["max"] + 1, info[axis]["step"]):
            pipe.request("x", **{axis: px})


def test_docs_render_offline_and_list_every_operation(server):
    base, _ = server
    page = requests.get(f"{base}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must load nothing from afar"
    schema = requests.get(f"{base}/openapi.json", timeout=10).json()
    for path, item in schema["paths"].items():
        assert f"<code>{path}</code>" in html, path
        for op in item.values():
            assert op["summary"].replace("'", "&#x27;") in html
    assert "response_format" in html and "negative_prompt" in html  # body fields are listed
    redirect = requests.get(f"{base}/redoc", timeout=10, allow_redirects=False)
    assert redirect.status_code in (302, 307) and redirect.headers["location"] == "/docs"


def test_docs_renderer_takes_every_openapi_construct():
    from sdrt.runtime.serve.ui import render_reference

    schema = {"info": {"title": "t"}, "paths": {"/a/{id}": {
        "parameters": [{"$ref": "#/components/parameters/Id"}],
        "summary": "path-level keys are not operations",
        "post": {"summary": "make", "parameters": [{"name": "mode", "in": "query",
                                                     "schema": {"enum": ["fast", "slow"]}}],
                 "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/B"}}}},
                 "responses": {"200": {"description": "ok"}}}}},
        "components": {"parameters": {"Id": {"name": "id", "in": "path", "required": True,
                                             "schema": {"type": "string"}}},
                       "schemas": {"B": {"properties": {"x": {"allOf": [{"$ref": "#/components/schemas/C"}]},
                                                        "y": {"oneOf": [{"type": "integer"}, {"type": "null"}]},
                                                        "z": {"type": ["string", "null"]}}}, "C": {}}}}
    html = render_reference(schema, playground=False)
    assert html.count("section class=op") == 1
    for text in ("<code>id</code>", "<code>mode</code>", "&#x27;fast&#x27; | &#x27;slow&#x27;", "<td>C</td>",
                 "integer | null", "string | null"):
        assert text in html, text


def test_playground_is_served_and_no_ui_turns_it_off(server, tiny_engine):
    base, _ = server
    page = requests.get(f"{base}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
        got = requests.get(f"{base}{asset}", timeout=10)
        assert got.status_code == 200 and len(got.content) > 500, asset
    assert requests.get(f"{base}/ui/../app.py", timeout=10).status_code == 404
    assert requests.get(f"{base}/ui/index.html", timeout=10).status_code == 404
    with serving(ServeConfig(tiny_engine, backend="cpu", ui=False)) as (off, _):
        assert requests.get(f"{off}/", timeout=10).status_code == 404
        assert requests.get(f"{off}/ui/playground.js", timeout=10).status_code == 404
        docs = requests.get(f"{off}/docs", timeout=10)
        assert docs.status_code == 200 and "The playground" not in docs.text  # the reference stays, unlinked
        assert client(off).models.list().data
    assert "The playground" in requests.get(f"{base}/docs", timeout=10).text
