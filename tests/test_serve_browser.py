"""The playground at / in a real browser: Debian's chromium, headless, driven by Playwright for Python, against
`sdrt serve` on loopback with the tiny model. Screenshots go to $SDRT_TEST_ARTIFACTS (default: test-artifacts/).

Without chromium or Playwright these tests skip with the reason, except under .ci/run, which installs both and
sets SDRT_REQUIRE_BROWSER=1 so that a missing browser fails rather than skips.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from conftest import serving
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.serve.config import Limits, ServeConfig

CHROMIUM = os.environ.get("SDRT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background traffic is refused on an offline machine; these flags keep it quiet (and prove that
# the page needs no network: every request is checked against the server's address below).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SDRT_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
KEY = "browser-key"
STEP_TIMEOUT = 30_000  # ms: a tiny-model generation takes well under a second here


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not Path(CHROMIUM).is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set SDRT_CHROMIUM)"
    return None


MISSING = _missing()
REQUIRED = os.environ.get("SDRT_REQUIRE_BROWSER") == "1"
if MISSING and not REQUIRED:
    pytest.skip(MISSING, allow_module_level=True)


@pytest.fixture(scope="module")
def playwright():
    if MISSING:  # required: each test fails with the reason, and the rest of the suite still runs
        pytest.fail(f"SDRT_REQUIRE_BROWSER=1 but {MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine, "cpu")


@pytest.fixture(scope="module")
def server(tiny_engine):
    with serving(ServeConfig(tiny_engine, backend="cpu", limits=Limits(max_steps=20_000))) as (base, app):
        yield base, app


def wait_until(page, expression: str, timeout: float = STEP_TIMEOUT) -> None:
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function evaluates its predicate
    with eval, which the page's Content-Security-Policy forbids, as it should; the tests keep that policy on.)"""
    end = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > end:
            raise TimeoutError(f"not true after {timeout / 1000:.0f} s: {expression}")
        time.sleep(0.03)


class Page:
    """A browser tab on the playground that records every request it makes, and its script and policy errors."""

    def __init__(self, browser, base: str, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.base = base
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)

    def open(self):
        response = self.page.goto(f"{self.base}/")
        assert response.status == 200
        wait_until(self.page, "!document.getElementById('generate').disabled")
        return self

    def status(self) -> str:
        return self.page.inner_text("#status")

    def generate(self, prompt: str, **fields) -> dict:
        """Fill the form, press Generate, wait for the result; returns the submitted job."""
        p = self.page
        p.fill("#prompt", prompt)
        for name, value in fields.items():
            if p.eval_on_selector(f"#{name}", "e => e.tagName") == "SELECT":
                p.select_option(f"#{name}", str(value))
            else:
                p.fill(f"#{name}", str(value))
        with p.expect_response(lambda r: r.url == f"{self.base}/v1/generations" and r.request.method == "POST") as r:
            p.click("#generate")
        return r.value.json()

    def wait_for_image(self) -> dict:
        wait_until(self.page, "(() => { const i = document.querySelector('#images img');"
                   " return i && i.complete && i.naturalWidth > 0; })()")
        return self.page.eval_on_selector("#images img", "i => ({w: i.naturalWidth, h: i.naturalHeight, src: i.src})")

    def close(self):
        assert not self.errors, f"JavaScript errors: {self.errors}"
        own = (self.base, f"blob:{self.base}/", "data:")  # the server, and what the page made itself
        assert all(u.startswith(own) for u in self.requests), \
            f"the page reached past the server: {[u for u in self.requests if not u.startswith(own)]}"
        self.context.close()


def fetch_png(url: str, **kw) -> np.ndarray:
    r = requests.get(url, timeout=10, **kw)
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_generate_in_the_browser_equals_the_pipeline(browser, server, pipe):
    base, _ = server
    tab = Page(browser, base, viewport={"width": 1280, "height": 860}).open()
    info = requests.get(f"{base}/v1/engine", timeout=10).json()
    widths = tab.page.eval_on_selector_all("#width option", "os => os.map(o => Number(o.value))")
    assert widths == list(range(info["width"]["min"], info["width"]["max"] + 1, info["width"]["step"]))
    assert tab.page.input_value("#width") == str(info["native"]["width"])  # the native size by default

    job = tab.generate("a red circle", negative_prompt="blurry", width=96, height=64, steps=4,
                       scheduler="euler-a", guidance_scale=6, seed=11)
    image = tab.wait_for_image()
    assert (image["w"], image["h"]) == (96, 64)
    assert image["src"] == f"{base}/v1/generations/{job['id']}/images/0"
    alone = pipe("a red circle", "blurry", steps=4, guidance_scale=6.0, scheduler="euler-a", seed=11,
                 height=64, width=96)[0]
    assert np.array_equal(fetch_png(image["src"]), np.asarray(alone))
    infotext = tab.page.inner_text("#images .infotext")
    assert "Seed: 11" in infotext and "Size: 96x64" in infotext and "Sampler: Euler a" in infotext
    link = tab.page.locator("#images a")
    assert link.get_attribute("download") == "sdrt-11.png" and link.evaluate("a => a.href") == image["src"]
    assert tab.status().startswith("Done")
    # Progress came from the event stream: the page asked for the job's state once, at the end, and never polled.
    assert sum("images=false" in u for u in tab.requests) == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    tab.page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1280
    tab.close()


def test_cancel_a_long_job(browser, server):
    base, _ = server
    tab = Page(browser, base).open()
    job = tab.generate("a slow one", steps=5000, seed=1)
    wait_until(tab.page, "/^Step [1-9]/.test(document.getElementById('step').textContent)")
    assert tab.page.is_enabled("#cancel") and not tab.page.is_enabled("#generate")
    tab.page.click("#cancel")
    wait_until(tab.page, "/^Cancelled at step/.test(document.getElementById('status').textContent)")
    state = requests.get(f"{base}/v1/generations/{job['id']}?images=false", timeout=10).json()
    assert state["state"] == "cancelled" and 1 <= state["step"] < state["steps"]
    assert tab.page.locator("#images img").count() == 0
    assert tab.page.is_enabled("#generate") and not tab.page.is_enabled("#cancel")
    tab.page.screenshot(path=str(ARTIFACTS / "playground-cancelled.png"))
    tab.close()


def test_cancel_before_the_server_has_answered(browser, server):
    base, _ = server
    tab = Page(browser, base).open()
    held = []  # the submit request, held back until Cancel has been pressed
    tab.page.route(f"{base}/v1/generations", lambda route: held.append(route))
    tab.page.fill("#prompt", "never mind")
    tab.page.fill("#steps", "5000")
    tab.page.click("#generate")
    wait_until(tab.page, "document.getElementById('status').textContent === 'Submitting…'")
    tab.page.click("#cancel")
    with tab.page.expect_response(lambda r: r.url == f"{base}/v1/generations") as submitted:
        held[0].continue_()
    job = submitted.value.json()
    wait_until(tab.page, "/^Cancelled/.test(document.getElementById('status').textContent)")
    state = requests.get(f"{base}/v1/generations/{job['id']}?images=false", timeout=10).json()
    assert state["state"] == "cancelled" and state["step"] < 100
    tab.close()


def test_blank_fields_take_the_servers_defaults(browser, server, pipe):
    base, _ = server
    tab = Page(browser, base).open()
    for field in ("#seed", "#guidance_scale", "#steps"):
        tab.page.fill(field, "")
    with tab.page.expect_request(lambda r: r.url == f"{base}/v1/generations" and r.method == "POST") as sent:
        tab.page.fill("#prompt", "a red circle")
        tab.page.click("#generate")
    body = sent.value.post_data_json
    assert body["seed"] is None and body["guidance_scale"] is None and body["steps"] is None
    tab.wait_for_image()
    infotext = tab.page.inner_text("#images .infotext")
    assert f"CFG scale: {pipe.defaults.guidance_scale}" in infotext and f"Steps: {pipe.defaults.steps}," in infotext
    tab.close()


def test_image_to_image_from_an_uploaded_file(browser, server, pipe, tmp_path):
    base, _ = server
    init = pipe("a blue square", steps=2, seed=1, width=64, height=64)[0]
    upload = tmp_path / "init.png"
    init.save(upload)
    tab = Page(browser, base).open()
    tab.page.set_input_files("#init_image", str(upload))
    tab.page.wait_for_selector("#init_preview:not([hidden])")
    tab.page.fill("#strength", "0.5")
    tab.generate("a red circle", width=64, height=64, steps=6, scheduler="dpmpp-2m-karras", guidance_scale=7, seed=9)
    image = tab.wait_for_image()
    assert (image["w"], image["h"]) == (64, 64)
    alone = pipe("a red circle", image=init, strength=0.5, steps=6, guidance_scale=7.0, scheduler="dpmpp-2m-karras",
                 seed=9, height=64, width=64)[0]
    assert np.array_equal(fetch_png(image["src"]), np.asarray(alone))
    assert "Denoising strength: 0.5" in tab.page.inner_text("#images .infotext")
    tab.close()


def test_on_a_phone_sized_screen(browser, server):
    base, _ = server
    tab = Page(browser, base, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
               device_scale_factor=2).open()
    overflow = tab.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone's screen"
    for selector in ("#prompt", "#width", "#steps", "#generate", "#cancel"):
        box = tab.page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    tab.page.fill("#prompt", "a red circle")
    tab.page.tap("#generate")
    image = tab.wait_for_image()
    assert image["w"] == int(tab.page.input_value("#width"))
    box = tab.page.locator("#images img").bounding_box()
    assert box["width"] >= 200 and box["x"] + box["width"] <= 390  # shown large enough to see, within the screen
    tab.page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    tab.close()


def refused(browser, url: str, **context) -> bool:
    """Whether the server refused the page: a 401 shown, or (headless, where no one can answer the browser's
    login prompt) the navigation failing on the credentials."""
    from playwright.sync_api import Error as BrowserError

    ctx = browser.new_context(**context)
    try:
        return ctx.new_page().goto(url).status == 401
    except BrowserError as e:
        return "ERR_INVALID_AUTH_CREDENTIALS" in str(e)
    finally:
        ctx.close()


def test_behind_the_api_key_the_browser_asks_once(browser, tiny_engine):
    with serving(ServeConfig(tiny_engine, backend="cpu", api_key=KEY)) as (base, _):
        assert refused(browser, f"{base}/")
        # A browser answers the Basic challenge (any user name, the key as password) and then sends it with
        # every request the page makes: the fetches, the event stream and the images.
        tab = Page(browser, base, http_credentials={"username": "me", "password": KEY}).open()
        tab.generate("a red circle", steps=3)
        image = tab.wait_for_image()
        assert image["w"] > 0
        assert refused(browser, f"{base}/", http_credentials={"username": "me", "password": "wrong"})
        tab.close()


def test_a_server_error_shows_in_the_page(browser, server):
    base, _ = server
    tab = Page(browser, base).open()
    tab.page.fill("#prompt", "x")
    tab.page.evaluate("document.getElementById('steps').removeAttribute('max')")
    tab.page.fill("#steps", "999999")  # past the server's --max-steps: the form lets it through, the API does not
    tab.page.click("#generate")
    tab.page.wait_for_selector("#error:not([hidden])")
    assert re.search(r"steps.*20000", tab.page.inner_text("#error"))
    assert tab.page.is_enabled("#generate")
    tab.close()


def test_by_a_host_name_over_plain_http(playwright, server):
    """Where the browser sends no Sec-Fetch-Site (plain http to a host that is not localhost), the playground's
    requests pass the cross-site guard by their Origin. Chromium resolves sdrt.test to loopback here."""
    base, _ = server
    named = base.replace("127.0.0.1", "sdrt.test")
    b = playwright.chromium.launch(executable_path=CHROMIUM,
                                   args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP sdrt.test 127.0.0.1"])
    try:
        tab = Page(b, named).open()
        with tab.page.expect_request(lambda r: r.method == "POST") as sent:
            tab.generate("a red circle", steps=3)
        headers = sent.value.all_headers()
        assert headers.get("origin") == named and "sec-fetch-site" not in headers
        assert tab.wait_for_image()["w"] > 0
        tab.close()
    finally:
        b.close()


def test_docs_render_in_the_browser_with_no_network(browser, server):
    base, _ = server
    tab = Page(browser, base)
    assert tab.page.goto(f"{base}/docs").status == 200
    schema = requests.get(f"{base}/openapi.json", timeout=10).json()
    operations = sum(len(item) for item in schema["paths"].values())
    assert tab.page.locator("section.op").count() == operations
    tab.page.get_by_text("/v1/images/generations", exact=True).click()
    assert tab.page.get_by_text("response_format", exact=True).is_visible()
    tab.close()
