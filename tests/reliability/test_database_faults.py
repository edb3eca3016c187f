"""Database faults on a real stack (issue 12 items 4 and 5): every connection of a running web process
terminated by `pg_terminate_backend`, and a dedicated PostgreSQL frozen by SIGSTOP then resumed by SIGCONT.
Each test runs its own PostgreSQL (see `engines`), so freezing it never disturbs the shared servers. Times are
printed (docs/reliability.md quotes them), never asserted."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import sys
import time

import httpx
import psutil
import psycopg
import pytest

from tests.conftest import free_port, wait_until
from tests.reliability.conftest import wait_http_ok, web_argv
from tests.reliability.test_engines_down import POOL_TIMEOUT, answers_200, chat, stack_env

pytestmark = [pytest.mark.e2e]

HANG = 60  # a client timeout far above any bound the gateway promises: hitting it means a hang


def database_up_gauge(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=HANG).text
    line = next(line for line in text.splitlines() if line.startswith("localai_cluster_database_up "))
    return float(line.split()[1])


def web_backend_pids(engines, web_pid: int) -> list[int]:
    """The PostgreSQL sessions of the web process (matched by its TCP client ports)."""
    ports = [c.laddr.port for c in psutil.Process(web_pid).net_connections(kind="tcp") if c.raddr]
    with psycopg.connect(engines.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s) AND pid <> pg_backend_pid()",
            [ports],
        ).fetchall()
    return [pid for (pid,) in rows]


def terminate(engines, pids: list[int]) -> None:
    with psycopg.connect(engines.database_url, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])


def start_stack(engines, processes, env: dict[str, str]):
    """A web process and one agent (echo backend); answers (web process, URL) once `echo-1` answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web = processes("web", web_argv(port), env)
    wait_http_ok(f"{url}/healthz", message="the web process")
    processes(
        "agent",
        [
            *(sys.executable, "-m", "worker_client.agent", "--register-to", url),
            *("--addr", f"127.0.0.1:{free_port()}", "--node-name", "reliability-agent"),
            *("--heartbeat-interval", "1s", "--vram", "24GiB", "--drain-timeout", "2s"),
        ],
        env,
    )
    wait_until(lambda: answers_200(url), timeout=90, interval=0.5, message="echo-1 to answer")
    return web, url


def concurrent_chats(url: str, count: int) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: chat(url, timeout=HANG), range(count)))


def test_terminated_connections_are_replaced_on_first_use(engines, processes):
    web, url = start_stack(engines, processes, stack_env(engines))
    # Fill the gateway's pool with several connections, and give the probes their own.
    assert all(r.status_code == 200 for r in concurrent_chats(url, 8))
    assert httpx.get(f"{url}/v1/models", timeout=HANG).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=HANG).status_code == 200
    assert database_up_gauge(url) == 1

    killed = web_backend_pids(engines, web.pid)
    assert len(killed) >= 2, killed  # the in-flight owner's lock session and the gateway's pool at least
    terminate(engines, killed)
    wait_until(
        lambda: not set(killed) & set(web_backend_pids(engines, web.pid)), message="the sessions to end"
    )

    # The first probe after the blip tells the truth, and no request fails.
    started = time.monotonic()
    ready = httpx.get(f"{url}/readyz", timeout=HANG)
    first_probe = time.monotonic() - started
    assert ready.status_code == 200, ready.text
    assert database_up_gauge(url) == 1
    answers = [chat(url, timeout=HANG) for _ in range(12)] + concurrent_chats(url, 8)
    assert [a.status_code for a in answers] == [200] * len(answers), [
        a.text for a in answers if a.status_code != 200
    ]
    assert httpx.get(f"{url}/v1/models", timeout=HANG).status_code == 200
    print(
        f"after terminating {len(killed)} sessions: first /readyz 200 in {first_probe:.3f}s; "
        f"it, /metrics and 20 requests in {time.monotonic() - started:.2f}s"
    )
    assert not set(killed) & set(web_backend_pids(engines, web.pid))  # served by new sessions


# --- a frozen database -----------------------------------------------------------------------------------------


def postgres_processes(engines) -> list[psutil.Process]:
    postmaster = psutil.Process(int((engines.pgdata / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


@contextlib.contextmanager
def frozen(engines):
    """Every process of the dedicated PostgreSQL stopped (SIGSTOP) until the block ends (SIGCONT)."""
    stopped = postgres_processes(engines)
    for process in stopped:
        os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_frozen_database_gives_503_not_a_hang_and_everything_resumes(engines, processes):
    env = stack_env(engines, LOCALAI_DB_STATEMENT_TIMEOUT="2s", LOCALAI_DB_CONNECT_TIMEOUT="2s")
    _web, url = start_stack(engines, processes, env)
    loops = [
        processes(name, [sys.executable, "manage.py", name], env) for name in ("reconcile", "healthcheck")
    ]
    for loop in loops:
        wait_until(lambda loop=loop: "took" in loop.log(), timeout=60, message=f"a first {loop.name} tick")
    assert all(r.status_code == 200 for r in concurrent_chats(url, 4))

    with frozen(engines):
        frozen_at = {loop.name: len(loop.log()) for loop in loops}
        # More requests at once than the gateway's pool has connections, then one at a time.
        answers = [timed(lambda: chat(url, timeout=HANG)) for _ in range(2)]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers += list(pool.map(lambda _: timed(lambda: chat(url, timeout=HANG)), range(12)))
        for answer, _elapsed in answers:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "control_plane_unavailable"
        (ready, ready_elapsed) = timed(lambda: httpx.get(f"{url}/readyz", timeout=HANG))
        assert ready.status_code == 503, ready.text
        assert "database" in ready.json()["down"]
        models = httpx.get(f"{url}/v1/models", timeout=HANG)
        assert models.status_code == 503
        # A loop's tick on the frozen database fails (its statement or its connection attempt times out)
        # instead of hanging, and the loop goes on.
        for loop in loops:
            wait_until(
                lambda loop=loop: "tick failed" in loop.log()[frozen_at[loop.name] :],
                timeout=60,
                message=f"{loop.name} to report a failed tick on the frozen database",
            )
            assert loop.alive()
        print(
            "frozen: 503 after "
            + ", ".join(f"{elapsed:.2f}" for _, elapsed in answers)
            + f" s (LOCALAI_DB_POOL_TIMEOUT={POOL_TIMEOUT}s); /readyz 503 after {ready_elapsed:.2f}s"
        )
        resumed_at = {loop.name: len(loop.log()) for loop in loops}

    started = time.monotonic()
    wait_until(lambda: answers_200(url), timeout=60, interval=0.2, message="the gateway to answer 200 again")
    print(f"resumed: first 200 after {time.monotonic() - started:.2f}s")
    answers = concurrent_chats(url, 8)
    assert [a.status_code for a in answers] == [200] * 8
    assert httpx.get(f"{url}/readyz", timeout=HANG).status_code == 200
    for loop in loops:
        wait_until(
            lambda loop=loop: "took" in loop.log()[resumed_at[loop.name] :],
            timeout=60,
            message=f"{loop.name} to run a successful tick again",
        )
    # Nothing claimed while the database was frozen stays claimed: the abandoned claims were given back.
    with psycopg.connect(engines.database_url, autocommit=True) as conn:
        wait_until(
            lambda: (
                conn.execute("SELECT COALESCE(SUM(in_flight), 0) FROM nodes_modelreplica").fetchone()[0] == 0
            ),
            timeout=30,
            message="in-flight to return to 0",
        )
