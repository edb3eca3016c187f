"""`./dev up`: bring up a whole local cluster on the embedded engines and supervise its processes.

This process owns the embedded PostgreSQL and Redis (unless DATABASE_URL / REDIS_URL are set) and passes their
URLs to every child, so they all share the same servers. It starts the web process, a Celery worker, Celery
beat and two worker agents running the `echo` backend. Each child's output goes to `.state/logs/<name>.log`.

Every child runs in its own session, so a Ctrl-C in the terminal (or the terminal closing) reaches only this
process. On SIGINT, SIGTERM or SIGHUP it stops the children in order, within `STOP_BUDGET` seconds: the agents
first (they drain and deregister while the web process still answers them), then Celery worker and beat, then
the web process, then the embedded engines it started. A child that overstays its share of the budget gets
SIGKILL, and so does whatever is left in its process group.
"""

from __future__ import annotations

import argparse
import contextlib
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


_own_log: list[Path] = []  # .state/logs/up.log: what this process says, also when no terminal shows it


def _say(message: str) -> None:
    for path in _own_log:
        with contextlib.suppress(OSError), path.open("a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    try:
        print(f"==> {message}", flush=True)
    except OSError:  # the terminal is gone (SIGHUP): nobody reads this any more, the stop goes on
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - and the flush at exit must not fail either


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
    # Its own session too: a Ctrl-C reaches only this process, which stops the command (subprocess.run kills it).
    subprocess.run([PYTHON, "manage.py", *args], cwd=BASE_DIR, check=True, start_new_session=True)


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


# Stopping: stages in order, each with its share of the budget (seconds). The agents' share covers a drain
# call, the in-flight poll, stopping their backends and the deregister call; an agent that has requests in
# flight waits for them until its share runs out, then it is killed (the control plane marks it offline).
STOP_BUDGET = 10.0
STOP_STAGES: tuple[tuple[tuple[str, ...], float], ...] = (
    (("agent-1", "agent-2"), 4.0),
    (("celery-worker", "celery-beat"), 2.5),  # a warm shutdown: the task under way finishes
    (("web",), 1.5),
)  # the remaining 2 s: the embedded engines (a PostgreSQL fast shutdown writes a checkpoint)


class _Interrupted(Exception):
    """A stop signal arrived while the cluster was still starting."""


def _stop_stage(children: list[Child], share: float) -> None:
    """SIGTERM to each child (its own main process: it stops its children itself), SIGKILL to the child and its
    process group after `share` seconds; returns once they are gone."""
    started = time.monotonic()
    running = [child for child in children if child.process and child.process.poll() is None]
    for child in running:
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + share
    for child in children:
        if not child.process:
            continue
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            _say(f"{child.name} did not stop within {share:g} s; killing it")
        # Whatever is left in its group (a backend of an agent, a Celery pool process) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()
    if running:
        names = ", ".join(child.name for child in running)
        _say(f"stopped {names} in {time.monotonic() - started:.1f} s")


def _stop_all(children: list[Child]) -> None:
    by_name = {child.name: child for child in children}
    for names, share in STOP_STAGES:
        _stop_stage([by_name[name] for name in names if name in by_name], share)


def _stop_engines(state_dir: Path) -> None:
    from localai_cluster import embedded

    embedded.release(state_dir)


def _supervise(children: list[Child], log_dir: Path) -> int:
    stopping: list[str] = []

    def _stop(signum, frame):
        _note_signal(signum)
        stopping.append(signal.Signals(signum).name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    exit_code = 0
    while not stopping:
        for child in children:
            if child.process and child.process.poll() is not None:
                _say(
                    f"{child.name} exited with code {child.process.returncode}; see {log_dir / child.name}.log"
                )
                exit_code = 1
                stopping.append("exit")
        time.sleep(0.2)
    _say(f"stopping ({stopping[0]}): agents, then Celery, then web, then the engines…")
    return exit_code  # main() stops them


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_signalled_at: list[float] = []  # when the first stop signal arrived (the stop time is measured from it)


def _note_signal(signum: int) -> None:
    if not _signalled_at:
        _signalled_at.append(time.monotonic())


def _interrupt(signum, frame):
    _note_signal(signum)
    raise _Interrupted(signal.Signals(signum).name)


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
    _own_log.append(log_dir / "up.log")
    # Until the supervisor loop runs, a stop signal interrupts the start-up; then everything started is stopped.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    children = _children(args.host, args.port, state_dir, (first, second))
    try:
        return _run(args, state_dir, log_dir, children)
    except _Interrupted as interrupted:
        _say(f"stopping ({interrupted}) while starting…")
        return 0
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # the stop runs to its end
        _stop_all(children)
        engines = time.monotonic()
        _stop_engines(state_dir)
        _say(f"stopped the embedded engines in {time.monotonic() - engines:.1f} s")
        since = f" {time.monotonic() - _signalled_at[0]:.1f} s after the signal" if _signalled_at else ""
        _say(f"stopped{since}")


def _run(args: argparse.Namespace, state_dir: Path, log_dir: Path, children: list[Child]) -> int:
    os.environ.update(_engines(state_dir))
    os.environ["LOCALAI_STATE_DIR"] = str(state_dir)
    os.environ.setdefault("DJANGO_DEBUG", "true")
    os.environ.setdefault("DJANGO_SECRET_KEY", _secret_key(state_dir))
    os.environ.setdefault("LOCALAI_AUTO_APPROVE_NODES", "true")
    _say("applying migrations")
    _manage("migrate", "--no-input", "-v", "0")
    _manage("bootstrap_demo")

    url = f"http://{args.host}:{args.port}"
    _start(children[0], log_dir)
    if not _wait_ready(url):
        _say(f"the web process did not become ready; see {log_dir / 'web.log'}")
        return 1
    for child in children[1:]:
        _start(child, log_dir)
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
