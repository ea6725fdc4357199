"""Run the app under uvicorn: JSON log lines with the request id, one-line startup errors, graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server reports not ready, cancels the jobs still waiting (their requests answer 503),
stops listening, lets the running batch and the requests in progress finish (up to --timeout), and exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import time
from dataclasses import replace

from ..errors import UserError
from .app import create_app
from .config import ServeConfig
from .guard import is_loopback_address


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (when there is one), exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if getattr(record, "request_id", None):
            out["request_id"] = record.request_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("sdrt.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def check_port(host: str, port: int) -> None:
    """One line now, rather than uvicorn's log and exit code 3, when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def listening_config(config: ServeConfig, host: str) -> ServeConfig:
    """A key-less server on a loopback address answers only requests addressed to a loopback name: a web page
    whose name an attacker re-points to 127.0.0.1 (DNS rebinding) is refused (guard.py)."""
    if config.api_key is None and is_loopback_address(host):
        return replace(config, local_only=True)
    return config


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (1 if the engine failed to load)."""
    import uvicorn

    configure_logging(log_level)
    failed: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Report not ready at once, then uvicorn's graceful shutdown. Unlike uvicorn, the signal is not
            raised again afterwards: a drained server exits 0."""
            app.state.sdrt.drain()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C
            self.should_exit = True

    def on_load_error(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    check_port(host, port)
    app = create_app(listening_config(config, host), on_load_error=on_load_error)
    server = Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                   timeout_graceful_shutdown=int(config.timeout), log_level=log_level))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (a race with check_port); it has logged why
        raise UserError(f"cannot listen on {host}:{port} (see the log above)") from None
    if failed:
        raise UserError(f"the engine failed to load: {failed[0]}")
    if not server.started:
        raise UserError(f"cannot listen on {host}:{port} (see the log above)")
    return 0
