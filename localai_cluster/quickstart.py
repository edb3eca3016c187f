"""`./dev up`: bring up a local cluster on the embedded engines and supervise its processes.

This process owns the embedded PostgreSQL and Redis (unless DATABASE_URL / REDIS_URL are set) and passes their
URLs to every child, so all of them share the same servers. Ctrl-C stops every child, then the engines.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = field(default=None, repr=False)


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _engines() -> dict[str, str]:
    from localai_cluster import embedded

    state_dir = embedded.default_state_dir(BASE_DIR)
    env = {"LOCALAI_STATE_DIR": str(state_dir)}
    if not os.environ.get("DATABASE_URL"):
        _say(f"starting embedded PostgreSQL (data in {state_dir / 'pg'})")
        env["DATABASE_URL"] = embedded.ensure_postgres(state_dir)
    if not os.environ.get("REDIS_URL"):
        _say(f"starting embedded Redis (socket {state_dir / 'redis.sock'})")
        env["REDIS_URL"] = embedded.ensure_redis(state_dir)
    return env


def _manage(*args: str) -> None:
    subprocess.run([PYTHON, "manage.py", *args], cwd=BASE_DIR, check=True)


def _children(host: str, port: int) -> list[Child]:
    return [
        Child(
            "web",
            [
                PYTHON,
                "-m",
                "uvicorn",
                "localai_cluster.asgi:application",
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
        ),
    ]


def _supervise(children: list[Child]) -> int:
    for child in children:
        child.process = subprocess.Popen(child.argv, cwd=BASE_DIR, start_new_session=True)
        _say(f"started {child.name} (pid {child.process.pid})")
    stopping = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    exit_code = 0
    while not stopping:
        for child in children:
            if child.process and child.process.poll() is not None:
                _say(f"{child.name} exited with code {child.process.returncode}; stopping everything")
                exit_code = 1
                stopping = True
        time.sleep(0.2)
    _say("stopping…")
    for child in children:
        if child.process and child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGTERM)
    for child in children:
        if child.process:
            try:
                child.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
    _say("stopped")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev up", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    os.environ.update(_engines())
    os.environ.setdefault("DJANGO_DEBUG", "true")
    os.environ.setdefault("LOCALAI_AUTO_APPROVE_NODES", "true")
    _say("applying migrations")
    _manage("migrate", "--no-input", "-v", "0")
    children = _children(args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    _say(f"control plane: {base}   (worker registration: {base}/api/node/register)")
    _say("press Ctrl-C to stop everything")
    return _supervise(children)


if __name__ == "__main__":
    sys.exit(main())
