"""`./dev up` end to end: its own embedded engines, web, Celery worker and beat, two echo agents; a chat request for
`echo-1` is answered; Ctrl-C, SIGTERM or a closed terminal stops every process it started, in order: the agents
drain and deregister while the web process still answers them, then Celery, then web, then the engines
(CONTRACT §1, issue 12 item 7)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest

from localai_cluster import quickstart
from tests.conftest import agent_port, free_port, wait_until
from tests.e2e.conftest import child_pids, is_alive

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        children = set().union(*(child_pids(p) for p in frontier)) - found
        found |= children
        frontier = children
    return found


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _in_a_terminal() -> None:
    """In the child: lead a new session whose controlling terminal is the pty on stdin, as a shell does."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A pseudo-terminal running the quick start as its foreground job; the screen is kept in `text`."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, preexec_fn=_in_a_terminal
        )
        os.close(slave)
        self.chunks: list[bytes] = []
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Never blocked in read(): the master is really released only once no call holds it.
        while not self._closing.is_set():
            if not select.select([self.master], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the line discipline sends SIGINT to the foreground job

    def close(self) -> None:
        """The terminal window closes: the kernel sends SIGHUP to the session's controlling process."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._reader.join()
        os.close(self.master)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "terminal-closed"])
def test_quickstart_serves_echo_1_and_a_stop_signal_stops_everything_in_order(engine_state_dir, how):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_DEBUG"}}
    env["LOCALAI_STATE_DIR"] = str(engine_state_dir)  # its own engines, started and stopped by it
    agent_ports = f"{agent_port()},{agent_port()}"  # two blocks of free ports, not in the ephemeral range
    argv = [
        sys.executable,
        "-m",
        "localai_cluster.quickstart",
        "--port",
        str(port),
        "--agent-ports",
        agent_ports,
    ]
    terminal = Terminal(argv, env)
    up = terminal.process
    logs = engine_state_dir / "logs"
    try:
        wait_until(
            lambda: "LocalAI Cluster is up" in terminal.text or up.poll() is not None,
            timeout=240,
            interval=0.5,
            message="the quick start to come up",
        )
        assert up.poll() is None, terminal.text
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "hello cluster"}]}

        def answered():
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
            except httpx.HTTPError:
                return None
            return answer if answer.status_code == 200 else None

        answer = wait_until(answered, timeout=90, interval=0.5, message="a chat completion from echo-1")
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hello cluster"
        for name in ("agent-1", "agent-2"):
            wait_until(
                lambda name=name: "registered as node" in (logs / f"{name}.log").read_text(),
                timeout=60,
                message=f"{name} to register",
            )
        started = _descendants(up.pid)
        assert len(started) >= 6  # web, worker, beat, two agents, the echo-1 backend (and Celery's pool)

        signalled = time.monotonic()
        if how == "ctrl-c":
            terminal.ctrl_c()
        elif how == "sigterm":
            up.send_signal(signal.SIGTERM)
        else:
            terminal.close()
        code = up.wait(timeout=120)
        print(
            f"quick start stop ({how}): exited {code} {time.monotonic() - signalled:.1f} s after the signal"
        )
        assert code == 0, terminal.text
        left = [pid for pid in started if is_alive(pid)]
        assert not left, f"processes left behind: {left}"
        # The embedded PostgreSQL and Redis it started (not its descendants: daemons) stopped too, before it
        # exited.
        assert not _processes_mentioning(str(engine_state_dir)), "the embedded engines still run"
        # The agents drained and deregistered: the web process still answered them (a deregistration is logged
        # only on a 2xx answer).
        for name in ("agent-1", "agent-2"):
            agent_log = (logs / f"{name}.log").read_text()
            assert "drained: no request in flight" in agent_log, agent_log[-2000:]
            assert "deregistered node" in agent_log, agent_log[-2000:]
        said = (logs / "up.log").read_text()
        print(said[said.index("stopping (") :])
        stages = ["stopped agent-1, agent-2 in", "stopped celery-worker, celery-beat in", "stopped web in"]
        stages += ["stopped the embedded engines in", "s after the signal"]
        positions = [said.index(stage) for stage in stages]
        assert positions == sorted(positions), said
        expected = {"ctrl-c": "SIGINT", "sigterm": "SIGTERM", "terminal-closed": "SIGHUP"}[how]
        assert f"stopping ({expected})" in said
        if how != "terminal-closed":  # a closed terminal shows nothing more
            screen = terminal.text
            assert "admin user created: admin / " in screen and "==> stopped " in screen
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        terminal.close()
        for pid in _processes_mentioning(str(engine_state_dir)):  # after a failure: the engines must not stay
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _fake_child(tmp_path: Path, name: str, *, ignores_sigterm: bool = False) -> quickstart.Child:
    """A process that notes its SIGTERM in `stops` and exits (or ignores SIGTERM), once it noted `ready`."""
    on_term = "signal.SIG_IGN" if ignores_sigterm else "stop"
    code = (
        "import signal, sys, time\n"
        f"def stop(*_):\n    open({str(tmp_path / 'stops')!r}, 'a').write({name!r} + '\\n'); sys.exit(0)\n"
        f"signal.signal(signal.SIGTERM, {on_term})\n"
        f"open({str(tmp_path / 'ready')!r}, 'a').write({name!r} + '\\n')\n"
        "while True: time.sleep(1)\n"
    )
    return quickstart.Child(name, [sys.executable, "-c", code])


def test_children_stop_in_order_and_one_that_ignores_sigterm_is_killed(tmp_path, monkeypatch):
    """The order, without the whole cluster: agents, then Celery, then web; a stage starts once the one before
    it is gone; a child that ignores SIGTERM is killed when its share of the budget runs out."""
    monkeypatch.setattr(
        quickstart,
        "STOP_STAGES",
        ((("agent-1", "agent-2"), 30.0), (("celery-worker", "celery-beat"), 0.5), (("web",), 30.0)),
    )
    names = ["web", "celery-worker", "celery-beat", "agent-1", "agent-2"]
    children = [_fake_child(tmp_path, name, ignores_sigterm=name == "celery-beat") for name in names]
    (tmp_path / "logs").mkdir()
    for child in children:
        quickstart._start(child, tmp_path / "logs")
    wait_until(
        lambda: (tmp_path / "ready").exists() and len((tmp_path / "ready").read_text().split()) == 5,
        timeout=60,
        message="the children to be ready",
    )
    quickstart._stop_all(children)
    stops = (tmp_path / "stops").read_text().split()
    assert sorted(stops[:2]) == ["agent-1", "agent-2"]
    assert stops[2:] == ["celery-worker", "web"]
    by_name = {child.name: child.process for child in children}
    assert by_name["celery-beat"].returncode == -signal.SIGKILL
    assert all(process.returncode == 0 for name, process in by_name.items() if name != "celery-beat")
