"""A plain HTTP file server on 127.0.0.1 for the staging tests: serves files from a directory with HTTP Range,
records the `Range` header of every GET, and can answer errors first or stall part-way through a file; and a
recording reverse proxy that shows what an agent asked its control plane for."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> dict[str, Any]:
    """A file of `size` random bytes at `path`; answers its catalog entry fields `sha256` and `size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            out.write(block)
            hasher.update(block)
            left -= len(block)
    return {"sha256": hasher.hexdigest(), "size": size}


class FileServer:
    """Serves `root` over plain HTTP. `requests`: (path, Range header or '') of every GET and HEAD.
    `fail_with`: statuses answered (in order) before serving; `always_fail`: a status answered every time;
    `stall_at`: a byte offset at which a GET stops sending until `release` is set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []
        self.fail_with: list[int] = []
        self.always_fail: int | None = None
        self.stall_at: int | None = None
        self.release = threading.Event()
        self.sent = 0  # bytes of file content written, all requests
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def ranges(self, name: str) -> list[str]:
        with self.lock:
            return [wanted for path, wanted in self.requests if path == f"/{name}"]

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, body: bool) -> None:
                with server.lock:
                    server.requests.append((self.path, self.headers.get("Range") or ""))
                    failure = server.fail_with.pop(0) if server.fail_with else server.always_fail
                if failure:
                    self.send_response(failure)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start = 0
                wanted = self.headers.get("Range") or ""
                if wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[6:-1])
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                with path.open("rb") as source:
                    source.seek(start)
                    offset = start
                    while block := source.read(256 * 1024):
                        stall = server.stall_at
                        if stall is not None and offset <= stall < offset + len(block):
                            cut = stall - offset
                            self.wfile.write(block[:cut])
                            self.wfile.flush()
                            with server.lock:
                                server.sent += cut
                            server.release.wait()
                            self.close_connection = True
                            return  # the connection is cut: the client resumes
                        try:
                            self.wfile.write(block)
                        except OSError:
                            return
                        offset += len(block)
                        with server.lock:
                            server.sent += len(block)

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture(name="file_server")
def file_server_fixture(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.stop()


@dataclass
class Proxied:
    """One request `RecordingProxy` received: its `Range` header ('' if none), its body, and the status the
    upstream answered (None: the upstream could not be reached or broke off before answering)."""

    method: str
    path: str
    range: str
    body: bytes
    status: int | None = None
    at: float = field(default_factory=time.monotonic)  # when it arrived


class RecordingProxy:
    """A plain HTTP reverse proxy on 127.0.0.1 in front of `upstream` (a control plane): records every request
    (`requests`, with its `Range` header and body) and streams the answers back. The agent talks to the
    control plane through it, so a test sees on the wire what the agent asked for, also across a restart of
    the control plane: while the upstream is down, the proxy drops the connection without an answer (as a
    refused connection would); when the upstream dies mid-answer, the proxy cuts the client off there."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[Proxied] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def calls(self, path_suffix: str, method: str = "") -> list[Proxied]:
        with self.lock:
            return [
                r
                for r in self.requests
                if r.path.endswith(path_suffix) and (not method or r.method == method)
            ]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = Proxied(self.command, self.path, self.headers.get("Range") or "", body)
                with proxy.lock:
                    proxy.requests.append(record)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                except (OSError, http.client.HTTPException):
                    upstream.close()
                    self.close_connection = True  # no answer at all: the client sees the connection drop
                    return
                record.status = answer.status
                self.send_response_only(answer.status)
                announced = answer.getheader("Content-Length")
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(key, value)
                if announced is None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                try:
                    while block := answer.read(64 * 1024):
                        self.wfile.write(block)
                    if announced is not None and answer.length:
                        self.close_connection = True  # the upstream broke off: so does the proxy
                except (OSError, http.client.HTTPException):
                    self.close_connection = True
                finally:
                    upstream.close()

            do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
