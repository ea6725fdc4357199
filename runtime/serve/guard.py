"""Requests a browser can be made to send for a page of another site, refused before routing (app.py's Frame).

- Cross-site requests. A page on any site can make the browser POST to this server without a CORS preflight
  (a form, or a fetch with a plain-text body), and the browser attaches the credentials it remembers for the
  playground's Basic login. State-changing requests from other sites are refused. `Sec-Fetch-Site` is the
  browser's own verdict (sent to https and to localhost); elsewhere the `Origin` must be this server as the
  browser saw it: its Host, or a proxy's X-Forwarded-Host or Forwarded host, or an origin given with
  --allow-origin. Clients that are not browsers send neither header and are not affected.
- DNS rebinding. A page on attacker.example whose name is re-pointed to 127.0.0.1 is same-origin with itself,
  so the rule above lets it through to a key-less server on this machine. Such a server therefore answers only
  requests addressed to a loopback name (localhost, 127.0.0.1, [::1]) or a name given with --allow-host.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # config.py imports this module before it checks that the serve extra is installed
    from starlette.datastructures import Headers

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _authority(value: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) of a Host-style value ("name:port", "[::1]:7860"), lowercased, the port made explicit."""
    try:
        split = urlsplit(f"//{value.strip()}")
        host, port = split.hostname, split.port
    except ValueError:  # a port that is not a number
        return None
    if not host:
        return None
    return host, port or DEFAULT_PORTS.get(scheme, 0)


def _forwarded_hosts(headers: Headers) -> list[str]:
    """Hosts a proxy says the client asked for: X-Forwarded-Host items and RFC 7239 Forwarded host= values."""
    hosts = [h.strip() for h in headers.get("x-forwarded-host", "").split(",") if h.strip()]
    for element in headers.get("forwarded", "").split(","):
        for pair in element.split(";"):
            key, _, value = pair.strip().partition("=")
            if key.lower() == "host" and value:
                hosts.append(value.strip('"'))
    return hosts


def normal_origin(origin: str) -> str | None:
    """"scheme://host:port", lowercased and with the port explicit; None for no web origin ("null", a file)."""
    split = urlsplit(origin.strip().lower())
    if split.scheme not in DEFAULT_PORTS or split.path.strip("/") or split.query:
        return None
    authority = _authority(split.netloc, split.scheme)
    return None if authority is None else f"{split.scheme}://{authority[0]}:{authority[1]}"


def cross_site(method: str, headers: Headers, allowed_origins: tuple[str, ...] = ()) -> bool:
    """Whether a browser sent this state-changing request for another site's page. `allowed_origins` are
    normal_origin()s."""
    if method in SAFE_METHODS:
        return False
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site in ("cross-site", "same-site")  # same-site: another port or subdomain, another origin
    origin = headers.get("origin")
    if origin is None:
        return False
    wanted = normal_origin(origin)
    if wanted is None:
        return True
    if wanted in allowed_origins:
        return False
    scheme = wanted.partition("://")[0]
    candidates = [headers.get("host", ""), *_forwarded_hosts(headers)]
    return wanted not in {f"{scheme}://{a[0]}:{a[1]}" for c in candidates if (a := _authority(c.lower(), scheme))}


def loopback_name(host_header: str | None, allowed_hosts: tuple[str, ...] = ()) -> bool:
    """Whether a request's Host names this machine's loopback interface (or a name the operator allowed)."""
    authority = _authority(host_header or "", "http")
    if authority is None:
        return False
    host = authority[0]
    if host in allowed_hosts or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str | None:
    """A --allow-host value as loopback_name compares it: lowercased, IPv6 without brackets; None if not a name."""
    name = value.strip().lower().strip("[]")
    if not name or "/" in name:
        return None
    if ":" in name:  # only an IPv6 address may hold a colon: a port is not part of a host name
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    return name


def is_loopback_address(host: str) -> bool:
    """Whether a listening address is loopback only (127.0.0.1, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
