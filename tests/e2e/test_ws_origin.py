"""The WebSocket origin check compares scheme, host and port (issue 11, item 10a): a page on another port or
scheme of an allowed host name cannot open a staff user's log socket. Raw handshakes against the real server."""

from __future__ import annotations

import base64
import os
import socket

import pytest

from tests.factories import NodeFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def handshake_status(port: int, path: str, host: str, origin: str | None, extra: str = "") -> int:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if extra:
        lines.append(extra)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    return int(received.split(b" ", 2)[1])


@pytest.fixture
def logs_path(transactional_db) -> str:
    node = NodeFactory(address="127.0.0.1:1")
    return f"/ws/nodes/{node.pk}/backend-logs/m%230"


def test_only_the_same_scheme_host_and_port_may_open_a_socket(cp_server, logs_path):
    port = cp_server.port
    host = f"127.0.0.1:{port}"
    # The page's own origin: the handshake is accepted (the consumer then checks the session).
    assert handshake_status(port, logs_path, host, f"http://127.0.0.1:{port}") == 101
    assert handshake_status(port, logs_path, f"localhost:{port}", f"http://LOCALHOST:{port}") == 101
    for origin in (
        f"http://127.0.0.1:{port + 1}",  # another service on the same machine
        "http://127.0.0.1",  # port 80
        f"https://127.0.0.1:{port}",  # another scheme
        f"http://localhost:{port}",  # another allowed host name
        f"http://evil.example:{port}",
        "null",
        None,
    ):
        assert handshake_status(port, logs_path, host, origin) == 403, origin
    # A Host outside ALLOWED_HOSTS is refused even when the Origin matches it.
    assert handshake_status(port, logs_path, f"evil.example:{port}", f"http://evil.example:{port}") == 403


def test_trusted_origins_and_a_tls_proxy(cp_server, logs_path, settings):
    port = cp_server.port
    host = f"127.0.0.1:{port}"
    settings.CSRF_TRUSTED_ORIGINS = ["https://cp.example", "https://*.ops.example:8443"]
    assert handshake_status(port, logs_path, host, "https://cp.example") == 101
    assert handshake_status(port, logs_path, host, "https://cp.example:443") == 101
    assert handshake_status(port, logs_path, host, "https://a.ops.example:8443") == 101
    assert handshake_status(port, logs_path, host, "http://cp.example") == 403
    assert handshake_status(port, logs_path, host, "https://a.ops.example") == 403
    # Behind a TLS proxy (DJANGO_BEHIND_TLS_PROXY) the browser's origin is https on the proxy's port.
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = "X-Forwarded-Proto: https"
    assert handshake_status(port, logs_path, "localhost", "https://localhost", proxied) == 101
    assert handshake_status(port, logs_path, "localhost", "http://localhost", proxied) == 403
