"""A real web process (uvicorn in a subprocess, on the test database) and raw-socket clients that cut their
requests, for the request-fault tests (issue 12: client disconnects, dead replicas, slow stream readers)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, test_database_url, wait_until
from tests.e2e.gateway_support import REPO_ROOT


class WebProcess:
    """`uvicorn localai_cluster.asgi:application` in a subprocess sharing the test run's database."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [sys.executable, "-m", "uvicorn", "localai_cluster.asgi:application"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, "DATABASE_URL": test_database_url(), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout=60, message="the web process")

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"the web process exited:\n{self.log()}"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(name="web")
def web_fixture(cp_server, tmp_path: Path):
    """A web process (the agents register with `cp_server`; both share the test database), with a 1 s
    `LOCALAI_STREAM_WRITE_TIMEOUT`."""
    process = WebProcess(tmp_path / "web.log", env={"LOCALAI_STREAM_WRITE_TIMEOUT": "1s"})
    yield process
    process.stop()
    print(f"--- web log ---\n{process.log()[-6000:]}")


def chat_body(model: str, content: str = "hello there", *, stream: bool = False, **extra: Any) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}], **extra}


def send_request(
    port: int,
    path: str,
    body: dict,
    *,
    key: str | None = None,
    rcvbuf: int | None = None,
) -> socket.socket:
    """A POST written on a raw socket; the caller reads (or does not) and closes or resets it."""
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


def reset(sock: socket.socket) -> None:
    """Closes with SO_LINGER 0: the peer gets a TCP reset, whatever is in flight."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until(sock: socket.socket, marker: bytes, timeout: float = 60) -> bytes:
    """Reads until `marker` has arrived (or the peer closed); answers everything read."""
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def backend_lines(agent, model: str, prefix: str) -> list[str]:
    """The lines of `model`'s backends on `agent` that start with `prefix` (e.g. "Embedding")."""
    return [line.text for line in agent.client().get_logs(model) if line.text.startswith(prefix)]


def waiting_statements(fragment: str) -> int:
    """How many statements containing `fragment` wait for a lock in the test database right now."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{fragment}%"],
        )
        return int(cursor.fetchone()[0])
