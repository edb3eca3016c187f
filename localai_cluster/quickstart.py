"""`./dev up`: bring up a whole local cluster on the embedded engines and supervise its processes.

This process owns the embedded PostgreSQL and Redis (unless DATABASE_URL / REDIS_URL are set) and passes their
URLs to every child, so they all share the same servers. It starts the web process, a Celery worker, Celery
beat and two worker agents running the `echo` backend. Each child's output goes to `.state/logs/<name>.log`.
Ctrl-C stops every child (each in its own process group, so their own children go too), then the engines.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
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


def _engines(state_dir: Path) -> dict[str, str]:
    from localai_cluster import embedded

    env = {}
    if not os.environ.get("DATABASE_URL"):
        _say(f"starting embedded PostgreSQL (data in {state_dir / 'pg'})")
        env["DATABASE_URL"] = embedded.ensure_postgres(state_dir)
    if not os.environ.get("REDIS_URL"):
        _say(f"starting embedded Redis (socket {embedded.redis_socket_path(state_dir)})")
        env["REDIS_URL"] = embedded.ensure_redis(state_dir)
    return env


def _secret_key(state_dir: Path) -> str:
    """A secret kept in the state folder, so node tokens and sessions survive a restart."""
    path = state_dir / "secret-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def _manage(*args: str) -> None:
    subprocess.run([PYTHON, "manage.py", *args], cwd=BASE_DIR, check=True)


def _children(host: str, port: int, state_dir: Path, agent_ports: tuple[int, int]) -> list[Child]:
    url = f"http://{host}:{port}"
    web = [
        "uvicorn",
        "localai_cluster.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    celery = ["celery", "-A", "localai_cluster"]
    agent = ["worker_client.agent", "--register-to", url, "--heartbeat-interval", "5s", "--vram", "24GiB"]
    first, second = agent_ports
    return [
        Child("web", [PYTHON, "-m", *web]),
        Child("celery-worker", [PYTHON, "-m", *celery, "worker", "--loglevel", "info", "--concurrency", "2"]),
        Child(
            "celery-beat",
            [
                PYTHON,
                "-m",
                *celery,
                "beat",
                "--loglevel",
                "info",
                "--schedule",
                str(state_dir / "celerybeat-schedule"),
            ],
        ),
        Child(
            "agent-1",
            [
                *(PYTHON, "-m", *agent, "--node-name", "local-1", "--addr", f"127.0.0.1:{first}"),
                *("--state-dir", str(state_dir / "agents" / "local-1")),
            ],
        ),
        Child(
            "agent-2",
            [
                PYTHON,
                "-m",
                *agent,
                "--node-name",
                "local-2",
                "--addr",
                f"127.0.0.1:{second}",
                "--max-replicas-per-model",
                "2",
                "--state-dir",
                str(state_dir / "agents" / "local-2"),
            ],
        ),
    ]


def _wait_ready(url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _start(child: Child, log_dir: Path) -> None:
    log = open(log_dir / f"{child.name}.log", "ab")  # noqa: SIM115 - the child writes to it for its lifetime
    child.process = subprocess.Popen(
        child.argv,
        cwd=BASE_DIR,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    _say(f"started {child.name:<14} pid {child.process.pid:<7} log {log_dir / (child.name + '.log')}")


def _stop_all(children: list[Child]) -> None:
    for child in reversed(children):
        if child.process and child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 40  # agents drain (bounded at 30 s) before they exit
    for child in reversed(children):
        if not child.process:
            continue
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _say(f"{child.name} did not stop in time; killing it")
        # Whatever is left in the group (a backend of an agent, a Celery child) goes too.
        try:
            os.killpg(child.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _supervise(children: list[Child], log_dir: Path) -> int:
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
                _say(
                    f"{child.name} exited with code {child.process.returncode}; see {log_dir / child.name}.log"
                )
                exit_code = 1
                stopping = True
        time.sleep(0.2)
    _say("stopping every process…")
    _stop_all(children)
    _say("stopped")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    from localai_cluster import embedded

    parser = argparse.ArgumentParser(prog="./dev up", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--agent-ports",
        default="50051,50151",
        help="WorkerControl ports of the two agents (backends take the next ports)",
    )
    args = parser.parse_args(argv)
    try:
        first, second = (int(port) for port in args.agent_ports.split(","))
    except ValueError:
        parser.error("--agent-ports takes two ports, e.g. 50051,50151")

    state_dir = embedded.default_state_dir(BASE_DIR)
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(_engines(state_dir))
    os.environ["LOCALAI_STATE_DIR"] = str(state_dir)
    os.environ.setdefault("DJANGO_DEBUG", "true")
    os.environ.setdefault("DJANGO_SECRET_KEY", _secret_key(state_dir))
    os.environ.setdefault("LOCALAI_AUTO_APPROVE_NODES", "true")
    _say("applying migrations")
    _manage("migrate", "--no-input", "-v", "0")
    _manage("bootstrap_demo")

    url = f"http://{args.host}:{args.port}"
    children = _children(args.host, args.port, state_dir, (first, second))
    try:
        _start(children[0], log_dir)
        if not _wait_ready(url):
            _say(f"the web process did not become ready; see {log_dir / 'web.log'}")
            _stop_all(children)
            return 1
        for child in children[1:]:
            _start(child, log_dir)
    except BaseException:
        _stop_all(children)
        raise
    print(
        f"""
  LocalAI Cluster is up.
    OpenAI endpoint   {url}/v1
    nodes             {url}/ui/nodes/
    scheduling        {url}/ui/scheduling/
    admin             {url}/admin/
    API docs          {url}/api/docs/
    metrics           {url}/metrics

  Try it:
    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "echo-1", "messages": [{{"role": "user", "content": "hello cluster"}}]}}'

  Press Ctrl-C to stop everything.
""",
        flush=True,
    )
    return _supervise(children, log_dir)


if __name__ == "__main__":
    sys.exit(main())
