"""kill -9 of a web process mid-traffic leaks no in-flight unit: the health monitor gives back exactly what
the dead process held (QUALITY.md faults; nodes.inflight)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import pytest

from nodes.models import InFlightClaim
from scheduling.health import health_tick
from tests.conftest import free_port, test_database_url, wait_until
from tests.e2e.gateway_support import REPO_ROOT, in_flight, place, start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _stream_forever(url: str, model: str, stop: threading.Event) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": " ".join(["w"] * 400)}]}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as answer:
            for _ in answer.iter_bytes():
                if stop.is_set():
                    return
    except httpx.HTTPError:
        pass  # the web process was killed under us


def test_a_killed_web_process_leaks_no_in_flight(cp_server, start_agents, tmp_path):
    start_agents(1)
    ModelConfigFactory(name="leak-m", options={"options": ["delay_ms:100"]})
    place("leak-m")

    port = free_port()
    log = (tmp_path / "web.log").open("wb")
    web = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "localai_cluster.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": test_database_url()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    clients = [threading.Thread(target=_stream_forever, args=(url, "leak-m", stop)) for _ in range(3)]
    try:
        wait_until(lambda: _answers(url), timeout=60, message="the second web process")
        for client in clients:
            client.start()
        wait_until(lambda: in_flight("leak-m") == [3], timeout=30, message="three streams in flight")
        web.kill()  # kill -9, mid-stream
        web.wait()
        assert in_flight("leak-m") == [3]  # nobody released them

        # PostgreSQL ends the dead process's sessions (and frees its owner lock) on its own schedule, a moment
        # after the kill: health ticks run until the lock is free and the units come back.
        reclaimed: list[int] = []

        def reclaim() -> bool:
            reclaimed.append(sum(health_tick().reclaimed.values()))
            return sum(reclaimed) >= 3

        wait_until(reclaim, timeout=30, interval=0.2, message="the dead web process's units to be reclaimed")
        assert sum(reclaimed) == 3
        assert in_flight("leak-m") == [0]
        assert not InFlightClaim.objects.filter(count__gt=0).exists()
        # The surviving web process serves on, and its own units are untouched by the reclaim.
        answer = httpx.post(
            f"{cp_server.url}/v1/chat/completions",
            timeout=60,
            json={"model": "leak-m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.status_code == 200
        wait_until(lambda: in_flight("leak-m") == [0], message="in-flight back to 0")
    finally:
        stop.set()
        if web.poll() is None:
            web.kill()
            web.wait()
        for client in clients:
            client.join(timeout=30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
