"""PostgreSQL or Redis briefly unavailable (QUALITY.md, "Faults"): the loops log the fault and go on, the
gateway answers 503 in OpenAI's error shape within a bounded time instead of hanging or failing with a 500,
and everything resumes when the engine is back. Each test runs its own PostgreSQL and Redis (see `engines`),
so stopping them never disturbs the shared embedded servers other tests use."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from tests.conftest import agent_port, free_port, wait_until
from tests.reliability.conftest import celery_worker_argv, wait_http_ok, web_argv

pytestmark = [pytest.mark.e2e]

POOL_TIMEOUT = 2  # LOCALAI_DB_POOL_TIMEOUT: how long a request may wait for a connection to a dead database


def chat(url: str, timeout: float = 30) -> httpx.Response:
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "ping"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def answers_200(url: str) -> bool:
    try:
        return chat(url).status_code == 200
    except httpx.HTTPError:
        return False


def stack_env(engines, **extra: str) -> dict[str, str]:
    return engines.env(
        LOCALAI_AUTO_APPROVE_NODES="true",
        LOCALAI_RECONCILE_INTERVAL="0.5",
        LOCALAI_HEALTH_CHECK_INTERVAL="0.5",
        LOCALAI_DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        LOG_LEVEL="INFO",
        **extra,
    )


def start_web_and_agent(engines, processes, env: dict[str, str]) -> str:
    """A web process and one agent (echo backend) registered with it; answers the web URL once `echo-1`
    answers a chat request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes("web", web_argv(port), env)
    wait_http_ok(f"{url}/healthz", message="the web process")
    processes(
        "agent",
        [
            *(sys.executable, "-m", "worker_client.agent", "--register-to", url),
            *("--addr", f"127.0.0.1:{agent_port()}", "--node-name", "reliability-agent"),
            *("--heartbeat-interval", "1s", "--vram", "24GiB", "--drain-timeout", "2s"),
        ],
        env,
    )
    wait_until(
        lambda: answers_200(url), timeout=90, interval=0.5, message="echo-1 to answer through the gateway"
    )
    return url


def log_after(process, offset: int) -> str:
    return process.log()[offset:]


def test_postgres_down_gateway_answers_503_loops_survive_and_all_resume(engines, processes):
    env = stack_env(engines)
    url = start_web_and_agent(engines, processes, env)
    reconcile = processes("reconcile", [sys.executable, "manage.py", "reconcile"], env)
    health = processes("healthcheck", [sys.executable, "manage.py", "healthcheck"], env)
    for loop in (reconcile, health):
        wait_until(lambda loop=loop: "took" in loop.log(), timeout=60, message=f"a first {loop.name} tick")

    engines.stop_postgres()
    down_at = {loop.name: len(loop.log()) for loop in (reconcile, health)}
    for _ in range(3):  # the hot path's kept connection fails at once; later requests wait for the pool
        started = time.monotonic()
        answer = chat(url)
        elapsed = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "5"
        error = answer.json()["error"]
        assert error["code"] == "control_plane_unavailable"
        assert error["type"] == "server_error"
        assert elapsed < POOL_TIMEOUT + 8, f"a 503 took {elapsed:.1f}s"
    models = httpx.get(f"{url}/v1/models", timeout=30)
    assert models.status_code == 503
    assert models.json()["error"]["code"] == "control_plane_unavailable"
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503
    assert "database" in ready.json()["down"]
    for loop in (reconcile, health):
        wait_until(
            lambda loop=loop: "tick failed" in log_after(loop, down_at[loop.name]),
            timeout=30,
            message=f"{loop.name} to report the failed tick",
        )
        assert loop.alive(), f"{loop.name} exited while the database was down"

    engines.start_postgres()
    up_at = {loop.name: len(loop.log()) for loop in (reconcile, health)}
    for loop in (reconcile, health):
        wait_until(
            lambda loop=loop: "took" in log_after(loop, up_at[loop.name]),
            timeout=60,
            message=f"{loop.name} to run a successful tick again",
        )
    wait_until(lambda: answers_200(url), timeout=60, interval=0.3, message="the gateway to answer 200 again")
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_redis_down_readyz_says_so_gateway_keeps_serving_and_celery_resumes(engines, processes, tmp_path):
    env = stack_env(engines)
    url = start_web_and_agent(engines, processes, env)
    worker = processes("celery-worker", celery_worker_argv("celery", "reliability@%h"), env)
    processes(
        "celery-beat",
        [
            *(sys.executable, "-m", "celery", "-A", "localai_cluster", "beat", "--loglevel", "info"),
            *("--schedule", str(tmp_path / "celerybeat-schedule")),
        ],
        env,
    )
    tick_done = "scheduling.tasks.reconcile_tick"

    def ticks_after(offset: int) -> int:
        return sum(
            1 for line in log_after(worker, offset).splitlines() if tick_done in line and "succeeded" in line
        )

    wait_until(lambda: ticks_after(0) >= 1, timeout=90, message="a first reconciler tick through Celery")

    engines.stop_redis()
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["down"] == ["redis"]
    for _ in range(3):  # the gateway does not need Redis
        assert chat(url).status_code == 200
    time.sleep(2)  # the worker and beat notice the lost connection
    assert worker.alive()

    engines.start_redis()
    up_at = len(worker.log())
    wait_until(lambda: ticks_after(up_at) >= 2, timeout=90, message="Celery to run reconciler ticks again")
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    assert chat(url).status_code == 200
