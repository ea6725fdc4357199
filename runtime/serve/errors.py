"""Error bodies in the shape each front door's clients read: AUTOMATIC1111's for /sdapi and sdrt's own routes,
OpenAI's for /v1/images and /v1/models (the `openai` client raises its typed errors from that shape).

    A1111:  {"error": "ValidationError", "detail": ..., "body": "", "errors": "<message>"}
    OpenAI: {"error": {"message": ..., "type": "invalid_request_error", "param": "size", "code": ...}}

OpenAI answers every bad request with 400; so does sdrt on the OpenAI routes (a field's 422 elsewhere).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

OPENAI_PREFIXES = ("/v1/images", "/v1/models")

KINDS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
         408: "Timeout", 409: "Conflict", 413: "PayloadTooLarge", 422: "ValidationError", 503: "ServiceUnavailable",
         504: "GatewayTimeout"}
# The openai client retries 409 and every 5xx (twice, by default) unless the answer says not to: a job that was
# interrupted, timed out or failed must not silently run again. 503 (queue full, still loading) stays retryable.
NO_RETRY = (409, 500, 504)
_OPENAI_CODES = {401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                 409: "cancelled", 413: "payload_too_large", 503: "unavailable", 504: "timeout"}


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def a1111_error(status: int, kind: str, detail, headers: dict | None = None, **extra) -> JSONResponse:
    """A1111's error shape, which its clients print."""
    message = detail if isinstance(detail, str) else str(detail)
    return JSONResponse({"error": kind, "detail": detail, "body": "", "errors": message, **extra},
                        status_code=status, headers=headers)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape. A request's fault is a 400 `invalid_request_error` (OpenAI's status for bad values,
    which sdrt elsewhere answers 422); the server's is `server_error`."""
    if status == 422:
        status = 400
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status in NO_RETRY:
        headers = {**(headers or {}), "x-should-retry": "false"}
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code or _OPENAI_CODES.get(status)}},
                        status_code=status, headers=headers)


def error_for(path: str, status: int, message: str, *, kind: str | None = None, param: str | None = None,
              headers: dict | None = None, **extra) -> JSONResponse:
    """The error a client of `path` expects."""
    if is_openai(path):
        return openai_error(status, message, param, headers=headers)
    return a1111_error(status, kind or KINDS.get(status, "Error"), message, headers=headers, **extra)
