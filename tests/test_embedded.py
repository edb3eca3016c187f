"""The embedded engines: real servers on unix sockets, reachable from a state folder at any depth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from localai_cluster import embedded
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_a_deep_state_folder_still_gets_working_sockets(engine_state_dir):
    """A checkout deep in the file system (CI clones anywhere) must not exceed the unix socket path limit."""
    deep = engine_state_dir.parent.joinpath(*(["a-rather-long-folder-name"] * 5), ".state")
    assert len(str(deep / "redis.sock")) > 107
    code = (
        "import sys; from pathlib import Path; from localai_cluster import embedded; "
        "import psycopg, redis; d = Path(sys.argv[1]); "
        "pg = embedded.ensure_postgres(d); r = embedded.ensure_redis(d); "
        "import dj_database_url; db = dj_database_url.parse(pg); "
        "psycopg.connect(dbname=db['NAME'], user=db['USER'], host=db['HOST']).execute('select 1'); "
        "print(redis.Redis.from_url(r).ping())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(deep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")


def test_redis_socket_is_short_when_the_state_folder_is_deep(tmp_path):
    deep = tmp_path / ("x" * 120)
    assert len(str(embedded.redis_socket_path(deep))) <= 107
    assert embedded.redis_socket_path(tmp_path) == tmp_path / "redis.sock"


def _run(code: str, state_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}}
    return subprocess.run(
        [sys.executable, "-c", code, str(state_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**env, **kwargs.pop("env", {})},
        **kwargs,
    )


_JOIN = (
    "import os, signal, sys; from pathlib import Path; from localai_cluster import embedded; "
    "d = Path(sys.argv[1]); embedded.ensure_postgres(d); embedded.ensure_redis(d); "
)


def engine_pids(state_dir: Path) -> list[int]:
    """Processes whose command line names the state folder or its Redis socket: its postgres and redis-server."""
    marks = (str(state_dir), str(embedded.redis_socket_path(state_dir)))
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(mark in text for mark in marks) and "-c" not in text.split("\0")[:2]:
            found.append(int(cmdline.parent.name))
    return found


def test_a_user_that_died_without_exit_hooks_does_not_keep_the_engines_running(engine_state_dir):
    """The fresh-clone leak: a process killed before its exit hooks (here SIGKILL) stayed listed as a user of
    the embedded PostgreSQL, so the last real user's exit never stopped it. Now dead users are forgotten."""
    state = engine_state_dir
    killed = _run(_JOIN + "os.kill(os.getpid(), signal.SIGKILL)", state)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert engine_pids(state), "the engines should still run: nobody stopped them"
    last = _run(_JOIN + "print('joined')", state)
    assert last.returncode == 0 and "joined" in last.stdout, last.stderr[-2000:]
    wait_until(lambda: not engine_pids(state), timeout=30, message="the engines to stop with their last user")


def test_engines_stay_up_while_another_user_runs_and_stop_after_it(engine_state_dir):
    """`./dev test` finishing never stops the engines a running `./dev up` (another user) still uses."""
    state = engine_state_dir
    holder = subprocess.Popen(
        [sys.executable, "-c", _JOIN + "print('up', flush=True); sys.stdin.read()", str(state)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        released = _run(_JOIN + "embedded.release(d); print('released')", state)
        assert released.returncode == 0 and "released" in released.stdout, released.stderr[-2000:]
        pids = engine_pids(state)
        assert len(pids) >= 2, "postgres and redis-server still serve the other user"
        assert _run(_JOIN + "print('still here')", state).stdout.strip() == "still here"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits normally
        holder.wait(timeout=60)
    wait_until(lambda: not engine_pids(state), timeout=30, message="the engines to stop with their last user")


@pytest.mark.e2e
@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_test_run_stops_the_engines_it_started(engine_state_dir, workers):
    """What `./dev test` does in a fresh clone: pytest (with xdist workers or without) starts the embedded
    engines through the settings module; when it ends nothing of them is left running."""
    state = engine_state_dir
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            workers,
            "-p",
            "no:cacheprovider",
            "tests/test_settings.py",
            "-k",
            "real",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "LOCALAI_STATE_DIR": str(state)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert (state / "pg").is_dir()  # this run started its own engines
    wait_until(lambda: not engine_pids(state), timeout=30, message="the engines of the test run to stop")
