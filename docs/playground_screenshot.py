"""Make the README's screenshot of the playground: serve ENGINE_DIR on loopback, fill the form in headless
chromium (Playwright), generate, and save the page as a PNG.

    python docs/playground_screenshot.py demo-engine docs/playground.png --prompt "a yellow star" --images 4 --seed 3
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright
from sdrt.runtime.serve.app import create_app
from sdrt.runtime.serve.config import ServeConfig

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def until(page, expression: str, timeout: float = 120.0) -> None:
    """Poll a JavaScript expression (Playwright's wait_for_function uses eval, which the page's CSP forbids)."""
    end = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > end:
            raise TimeoutError(expression)
        time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("engine_dir", type=Path, help="engine dir to serve")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--prompt", default="a yellow star", help="prompt typed into the form")
    p.add_argument("--images", type=int, default=4, help="images to generate")
    p.add_argument("--seed", type=int, default=3, help="seed typed into the form")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the browser to drive")
    p.add_argument("--size", default="1280x860", help="browser window, WIDTHxHEIGHT")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServeConfig(args.engine_dir, backend="cpu"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    while not (server.started and app.state.sdrt.ready):
        time.sleep(0.1)
    width, height = map(int, args.size.split("x"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(f"{base}/")
        until(page, "!document.getElementById('generate').disabled")
        page.fill("#prompt", args.prompt)
        page.fill("#seed", str(args.seed))
        page.fill("#num_images", str(args.images))
        page.click("#generate")
        until(page, f"document.querySelectorAll('#images img').length == {args.images} && "
              "[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    server.should_exit = True
    thread.join(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
