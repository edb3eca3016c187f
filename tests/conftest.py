"""Shared fixtures. The database and Redis are real: embedded servers unless DATABASE_URL / REDIS_URL are set
(the settings module starts them and exports their URLs, so xdist workers and subprocesses reuse them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _is_controller(config: pytest.Config) -> bool:
    """The process pytest was started as (not an xdist worker)."""
    return not hasattr(config, "workerinput")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def pytest_configure(config: pytest.Config) -> None:
    """A test run that gets SIGTERM (CI cancels a job) or SIGHUP (its terminal closes) ends as after a Ctrl-C:
    pytest tears down and the process exits through its exit hooks, so the engines it started stop."""
    if _is_controller(config):
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller lets go of the embedded engines the settings module started for this run: the last user
    stops each server, so a `./dev up` that uses the same engines keeps them."""
    if not _is_controller(config):
        return
    from django.conf import settings

    from localai_cluster import embedded

    if settings.configured:
        embedded.release(settings.STATE_DIR)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(request: pytest.FixtureRequest) -> None:
    """Test databases named per test run (and per xdist worker), so two runs on one machine sharing the
    embedded PostgreSQL never drop each other's databases."""
    from pytest_django.fixtures import _set_suffix_to_test_databases

    workerinput = getattr(request.config, "workerinput", {})
    run = (workerinput.get("testrunuid") or str(os.getpid()))[:8]
    worker = workerinput.get("workerid", "main")
    _set_suffix_to_test_databases(suffix=f"{run}_{worker}")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Before the test databases are dropped, end the connections that other threads (the gateway's hot-path
    pool, placement threads) or finished subprocesses left open to them, so the drop cannot fail."""
    yield
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    _drop_without_statement_timeout()


def _drop_without_statement_timeout() -> None:
    """`DROP DATABASE` waits for a checkpoint, which on a busy machine can outlast the statement timeout that
    every connection carries (LOCALAI_DB_STATEMENT_TIMEOUT): the drop was cancelled, leaving the database
    behind. The connections that drop the test databases carry none (nor the client-side deadline)."""
    import re

    from django.conf import settings
    from django.db import connections

    settings.LOCALAI_DB_STATEMENT_TIMEOUT = 0
    for alias in connections:
        options = connections[alias].settings_dict.get("OPTIONS", {})
        if "options" in options:
            options["options"] = re.sub(r"statement_timeout=\d+", "statement_timeout=0", options["options"])
        connections[alias].close()


@contextlib.contextmanager
def another_session_holding(namespace: int, key: int) -> Iterator[None]:
    """An advisory lock held by a separate database session (a plain psycopg connection: a pooled Django
    connection would go back to the pool on close still holding the lock)."""
    import psycopg

    from nodes.inflight import plain_connection_params

    with psycopg.connect(**plain_connection_params(), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", [namespace, key])
        yield


def test_database_url() -> str:
    """The URL of this test run's database, for subprocesses (web, Celery) that must share it."""
    from urllib.parse import quote

    from django.conf import settings

    db = settings.DATABASES["default"]
    host = quote(db["HOST"] or "", safe="")
    port = f":{db['PORT']}" if db.get("PORT") else ""
    password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    return f"postgresql://{quote(db['USER'] or '')}{password}@{host}{port}/{db['NAME']}"


test_database_url.__test__ = False  # a helper, not a test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


AGENT_PORT_BLOCK = 16


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_agent_blocks_handed_out = 0  # in this process: where `agent_port` goes on from


def _worker_slice(low: int, high: int) -> tuple[int, int]:
    """This test process's share of [low, high): pytest-xdist's workers each take their own slice, so two
    workers never hand out the same agent port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1):
        return low, high
    size = (high - low) // int(count)
    index = int(worker[2:]) % int(count)
    return low + index * size, low + (index + 1) * size


def agent_port() -> int:
    """A free port for a worker agent whose next `AGENT_PORT_BLOCK - 1` ports are free too (its backends take
    them, lowest first), outside the kernel's ephemeral range: a port from `free_port()` lies in that range, and
    the source port of any outgoing connection on the machine (an HTTP client, another test worker) could take
    the ports after it while a test relies on them.

    Blocks are handed out in turn from this process's slice of the range (from a random start), never at
    random: an agent binds its port only some time after it was handed out, so a block whose ports were all
    still free could be handed out twice, and two agents of one test then raced for the same port (seen once in
    CI runs: the second agent could not listen). A block comes round again only after every other block of the
    slice, long after the test that used it stopped its agents."""
    global _agent_blocks_handed_out
    ephemeral_low, ephemeral_high = _ephemeral_range()
    low, high = (10000, ephemeral_low) if ephemeral_low - 10000 > 1000 else (ephemeral_high + 1, 65536)
    low, high = _worker_slice(low, high)
    blocks = (high - low) // AGENT_PORT_BLOCK
    if _agent_blocks_handed_out == 0:
        _agent_blocks_handed_out = random.SystemRandom().randrange(blocks)
    for _ in range(blocks):
        base = low + (_agent_blocks_handed_out % blocks) * AGENT_PORT_BLOCK
        _agent_blocks_handed_out += 1
        if all(_bindable(port) for port in range(base, base + AGENT_PORT_BLOCK)):
            return base
    raise RuntimeError(f"no block of {AGENT_PORT_BLOCK} free ports in {low}-{high}")


def agent_ready(client) -> bool:
    """Whether an agent's gRPC server answers and accepts the node token `client` presents. `Health` is open to
    any caller, so it answers before the agent holds its token: the control plane commits a registration before
    the agent has read the answer, and until then the agent refuses every other call as UNAUTHENTICATED."""
    import grpc

    from worker_client.errors import WorkerError

    if not client.health():
        return False
    try:
        client.list_replicas()
    except WorkerError as error:
        if error.code == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise
    return True


def wait_until(predicate, *, timeout: float = 15.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test with `message` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


async def turns_until(condition, *, turns: int = 1000) -> None:
    """Lets the event loop turn until `condition()` holds (bounded by turns of the loop, not by time: for what
    a callback or a background task does a turn or a few later); fails the test after `turns`."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail(f"not reached within {turns} turns of the event loop")


class ControlPlaneServer:
    """The real ASGI application served by uvicorn in a thread of the test process, on 127.0.0.1."""

    def __init__(self) -> None:
        import uvicorn

        from localai_cluster.asgi import application

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            application,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="cp-server", daemon=True)

    def start(self) -> ControlPlaneServer:
        self._thread.start()
        wait_until(lambda: self._server.started, timeout=20, message="the control plane test server")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def engine_state_dir() -> Iterator:
    """A fresh state folder for embedded engines of its own, outside pytest's `tmp_path`: as root, pgserver runs
    PostgreSQL as the `pgserver` user, and every pytest run that starts on the machine sets its
    `/tmp/pytest-of-root` back to mode 0700, locking that user out of a data folder beneath it."""
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="localai-engines-"))
    base.chmod(0o755)
    try:
        yield base / ".state"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cp_server(transactional_db) -> Iterator[ControlPlaneServer]:
    """A live control plane (HTTP + WebSocket) on loopback, backed by the test database."""
    server = ControlPlaneServer().start()
    try:
        yield server
    finally:
        server.stop()
