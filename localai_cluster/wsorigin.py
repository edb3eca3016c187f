"""The WebSocket origin check: a handshake is accepted only from a page of the control plane itself.

Channels' `AllowedHostsOriginValidator` compares the `Origin`'s host name with `ALLOWED_HOSTS` and nothing
else, so any page served from an allowed host name, on any port and over either scheme (another service on
`http://127.0.0.1:9999`, a plain-http page of an https site), could open a staff user's socket with their
session cookie. `SameOriginValidator` compares the scheme, host and port of the `Origin` with the connection's
own (the `Host` header, which must be in `ALLOWED_HOSTS`; `wss`, or `https` from a trusted TLS proxy, means
https), as a browser's same-origin rule does, or accepts an origin listed in `DJANGO_CSRF_TRUSTED_ORIGINS`
(the admin's origin behind a proxy; `https://*.example.com` covers subdomains, as Django's CSRF check does).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _allowed_hosts() -> list[str]:
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:  # Django's own rule (HttpRequest.get_host)
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin1")
    return None


def _origin_tuple(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin such as `https://cp.example:8443`, or None when it is not one."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port if port is not None else _DEFAULT_PORTS[parts.scheme]


def _is_secure(scope) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name, expected = proxy_header  # e.g. ("HTTP_X_FORWARDED_PROTO", "https")
        header = name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin1")
        value = _header(scope, header)
        return value is not None and value.split(",")[0].strip().lower() == expected
    return False


def connection_origin(scope) -> tuple[str, str, int] | None:
    """(scheme, host, port) the browser saw for this connection, or None when its Host is not allowed."""
    host = _header(scope, b"host")
    if not host:
        return None
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, _allowed_hosts()):
        return None
    scheme = "https" if _is_secure(scope) else "http"
    return _origin_tuple(f"{scheme}://{host}")


def _trusted(origin: tuple[str, str, int]) -> bool:
    scheme, host, port = origin
    for entry in settings.CSRF_TRUSTED_ORIGINS:
        wildcard = "://*." in entry
        trusted = _origin_tuple(entry.replace("://*.", "://", 1) if wildcard else entry)
        if trusted is None or trusted[0] != scheme or trusted[2] != port:
            continue
        if host == trusted[1] or (wildcard and host.endswith("." + trusted[1])):
            return True
    return False


def origin_allowed(scope) -> bool:
    raw = _header(scope, b"origin")
    origin = _origin_tuple(raw) if raw else None
    own = connection_origin(scope)
    if origin is None or own is None:
        return False
    return origin == own or _trusted(origin)


class SameOriginValidator:
    """ASGI middleware for WebSocket routes: denies the handshake (HTTP 403) unless `origin_allowed`."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
