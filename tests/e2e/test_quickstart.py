"""`./dev up` end to end: its own embedded engines, web, Celery worker and beat, two echo agents; a chat request for
`echo-1` is answered; Ctrl-C stops every process it started (CONTRACT §1, issue 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until
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


def test_quickstart_serves_echo_1_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_DEBUG"}}
    env["LOCALAI_STATE_DIR"] = str(tmp_path / "state")  # its own engines, started and stopped by it
    output = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localai_cluster.quickstart",
            "--port",
            str(port),
            "--agent-ports",
            f"{free_port()},{free_port() + 20}",
        ],
        cwd=ROOT,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: "LocalAI Cluster is up" in (tmp_path / "up.log").read_text(),
            timeout=180,
            interval=0.5,
            message="the quick start to come up",
        )
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "hello cluster"}]}

        def answered():
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
            except httpx.HTTPError:
                return None
            return answer if answer.status_code == 200 else None

        answer = wait_until(answered, timeout=60, interval=0.5, message="a chat completion from echo-1")
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hello cluster"
        started = _descendants(up.pid)
        assert len(started) >= 5  # web, worker, beat, two agents (and their children)

        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert up.wait(timeout=90) == 0
        time.sleep(0.5)
        assert not [pid for pid in started if is_alive(pid)], "processes left behind after Ctrl-C"
        # The embedded PostgreSQL and Redis it started (not its descendants: daemons) stopped too.
        wait_until(
            lambda: not _processes_mentioning(str(tmp_path)), timeout=20, message="the engines to stop"
        )
        log = (tmp_path / "up.log").read_text()
        assert "admin user created: admin / " in log and "==> stopped" in log
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        output.close()
