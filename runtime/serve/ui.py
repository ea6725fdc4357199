"""The browser's front doors, served from the package so they work with no network: the playground at / (static/:
one HTML page, its CSS and its JavaScript, over the jobs API) and the API reference at /docs, rendered on the
server from the app's own OpenAPI schema. FastAPI's Swagger UI and ReDoc load their scripts from a CDN and show
a blank page offline; the schema itself stays at /openapi.json for tools that render it.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

STATIC = Path(__file__).with_name("static")
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}  # a server upgrade must not leave a browser on the old page's script
# The pages load nothing from elsewhere (the policy enforces it) and may not be framed by another site's page,
# which could otherwise click through them with the browser's remembered API key.
PAGE_HEADERS = {**NO_CACHE, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
                "base-uri 'none'; form-action 'self'"}
DOCS_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"}

router = APIRouter(include_in_schema=False)  # the playground (off with --no-ui)
docs = APIRouter(include_in_schema=False)


@router.get("/")
async def playground():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/ui/{name}")
async def asset(name: str):
    if name not in ASSETS:  # a fixed list: no path from the URL reaches the file system
        raise HTTPException(404, f"no asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name],
                        headers={**NO_CACHE, "X-Content-Type-Options": "nosniff"})


@docs.get("/docs")
async def reference(request: Request):
    playground = request.app.state.sdrt.config.ui
    return HTMLResponse(render_reference(request.app.openapi(), playground), headers=DOCS_HEADERS)


@docs.get("/redoc")
async def redoc():
    return RedirectResponse("/docs")


STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em;color-scheme:light dark}
h2{margin-top:1.6em;border-bottom:1px solid #8884}section.op{border:1px solid #8884;border-radius:6px;margin:.8em 0;
padding:.3em .8em}summary{cursor:pointer}code{font-size:.95em}.m{display:inline-block;min-width:4.5em;font-weight:700}
.get{color:#2a7}.post{color:#37c}.delete{color:#c33}table{border-collapse:collapse;width:100%;margin:.4em 0}
td,th{border-top:1px solid #8883;padding:.25em .5em;text-align:left;vertical-align:top}th{font-weight:600}
.muted{color:#888}"""


METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def render_reference(schema: dict, playground: bool = True) -> str:
    """The OpenAPI schema as one plain HTML page: operations by tag, their parameters, body fields, responses."""
    info = schema.get("info", {})
    by_tag: dict[str, list[str]] = {}
    for path, item in schema.get("paths", {}).items():
        shared = item.get("parameters", [])  # path-level parameters apply to each of its operations
        for method in (m for m in METHODS if m in item):
            op = item[method]
            op = {**op, "parameters": [*shared, *op.get("parameters", [])]}
            tag = (op.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append(_operation(schema, method, path, op))
    sections = "".join(f"<h2>{escape(tag)}</h2>{''.join(ops)}" for tag, ops in by_tag.items())
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width, initial-scale=1'><title>{escape(info.get('title', 'API'))} API</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(info.get('title', 'API'))} "
            f"<span class=muted>{escape(str(info.get('version', '')))}</span></h1>"
            f"<p>{escape(info.get('description', ''))}</p><p>The schema: <a href='/openapi.json'>/openapi.json</a>."
            f"{' The playground: <a href=/>/</a>.' if playground else ''}</p>{sections}</body></html>")


def _operation(schema: dict, method: str, path: str, op: dict) -> str:
    rows = []
    for p in (_resolve(schema, p, "parameters") for p in op.get("parameters", [])):
        kind = p.get("schema", {})
        rows.append((p.get("name", "?"), p.get("in", ""), _type(schema, kind), p.get("required", False),
                     kind.get("default"), p.get("description") or kind.get("description")))
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        model = _resolve(schema, body)
        required = set(model.get("required", []))
        for name, prop in model.get("properties", {}).items():
            rows.append((name, "body", _type(schema, prop), name in required, prop.get("default"),
                         prop.get("description")))
        if not model.get("properties"):
            rows.append(("(body)", "body", _type(schema, body), True, None, model.get("description")))
    table = ""
    if rows:
        cells = "".join(f"<tr><td><code>{escape(n)}</code>{' *' if req else ''}</td><td>{escape(where)}</td>"
                        f"<td>{escape(kind)}</td><td>{'' if default is None else escape(repr(default))}</td>"
                        f"<td>{escape(text or '')}</td></tr>" for n, where, kind, req, default, text in rows)
        table = f"<table><tr><th>name</th><th>in</th><th>type</th><th>default</th><th></th></tr>{cells}</table>"
    responses = ", ".join(f"{escape(code)} {escape(r.get('description', ''))}"
                          for code, r in op.get("responses", {}).items())
    doc = escape(op.get("description", "") or "").replace("\n", "<br>")
    return (f"<section class=op><details><summary><span class='m {method}'>{method.upper()}</span> "
            f"<code>{escape(path)}</code> {escape(op.get('summary', ''))}</summary><p>{doc}</p>{table}"
            f"<p class=muted>Responses: {responses}</p></details></section>")


def _resolve(schema: dict, node: dict, section: str = "schemas") -> dict:
    ref = node.get("$ref", "")
    return schema.get("components", {}).get(section, {}).get(ref.rsplit("/", 1)[-1], {}) if ref else node


def _type(schema: dict, node: dict) -> str:
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    for key, joint in (("anyOf", " | "), ("oneOf", " | "), ("allOf", " & ")):
        if key in node:
            return joint.join(_type(schema, n) for n in node[key])
    if "enum" in node:
        return " | ".join(repr(v) for v in node["enum"])
    if "const" in node:
        return repr(node["const"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema, node.get('items', {}))}"
    return " | ".join(kind) if isinstance(kind, list) else str(kind)
