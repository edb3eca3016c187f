"""The control plane restarts mid-download (issue 15, faults): a `cp://` file is served by the control plane
itself, so its process dying cuts the agent's transfer. The agent's `--download-rate-limit` makes the download
last long enough to kill the control plane (kill -9) while it runs; the control plane comes back on the same
port and database, and the agent resumes from the bytes it already has. The agent talks to the control plane
through a recording proxy, so the test sees the `Range` it asked for on the wire."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.catalog import model_config_upsert
from tests.conftest import agent_ready, free_port, test_database_url, wait_until
from tests.e2e.gateway_support import RealAgent, approve_when_registered, place
from tests.e2e.staging_support import MiB, RecordingProxy, make_file
from tests.reliability.conftest import wait_http_ok, web_argv

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIZE = 40 * MiB
RATE = "5MiB"  # 8 s for the whole file: the kill lands while it runs


def _reports(proxy: RecordingProxy, since: int, key: str) -> list[dict]:
    """The progress reports for `key` the agent posted (and the control plane answered 200) from request
    number `since` of the proxy on."""
    with proxy.lock:
        calls = proxy.requests[since:]
    found = []
    for call in calls:
        if call.method == "POST" and call.path.endswith("/downloads") and call.status == 200:
            found += [r for r in json.loads(call.body)["replicas"] if r["key"] == key]
    return found


def test_control_plane_killed_mid_download_comes_back_and_the_agent_resumes(processes, tmp_path) -> None:
    artifacts = tmp_path / "artifacts"
    facts = make_file(artifacts / "weights" / "big.bin", SIZE)
    model_config_upsert(
        name="cprestart",
        backend="echo",
        files=[{"uri": "cp://weights/big.bin", "path": "big.bin", **facts}],
    )
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "PYTHONUNBUFFERED": "1",
        "LOCALAI_ARTIFACTS_PATH": str(artifacts),
    }
    web = processes("web", web_argv(port), env)
    wait_http_ok(f"http://127.0.0.1:{port}/readyz", message="the control plane")
    proxy = RecordingProxy(port)
    models = tmp_path / "models"
    name = f"cpr-{os.getpid()}"
    agent = RealAgent(
        SimpleNamespace(url=proxy.url),
        name,
        tmp_path / "agent.log",
        ["--models-path", str(models), "--vram", "24GiB", "--download-rate-limit", RATE],
    )
    placed: dict = {}

    def load() -> None:
        try:
            placed["result"] = place("cprestart")
        except Exception as error:  # reported by the assertion below
            placed["error"] = error

    loading = threading.Thread(target=load)
    try:
        approve_when_registered(name)
        wait_until(lambda: agent_ready(agent.client()), timeout=30, message="the agent's gRPC server")
        loading.start()

        def downloading():
            row = ModelReplica.objects.filter(model_name="cprestart").first()
            ok = row and row.state == ReplicaState.DOWNLOADING and 0 < row.download_bytes < SIZE // 2
            return row if ok else None

        row = wait_until(downloading, timeout=60, message="the replica downloading, under half-way")
        assert row.download_total == SIZE
        reported_before_kill = row.download_bytes
        killed_at = time.monotonic()
        os.kill(web.pid, signal.SIGKILL)
        web.process.wait()
        partial = models / ".big.bin.partial"
        assert partial.exists() and 0 < partial.stat().st_size < SIZE

        web_again = processes("web-again", web_argv(port), env)
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", message="the restarted control plane")
        ready_at = time.monotonic()
        since = len(proxy.requests)
        assert web_again.alive()

        loading.join(120)
        assert not loading.is_alive(), "the load never finished"
        assert "error" not in placed, placed.get("error")
        loaded_at = time.monotonic()
        replica = ModelReplica.objects.get(model_name="cprestart")
        assert replica.state == ReplicaState.LOADED

        gets = proxy.calls("/artifacts/weights/big.bin", "GET")
        assert gets[0].range == "" and gets[0].status == 200
        resumed = gets[-1]
        assert resumed.status == 206 and resumed.range.startswith("bytes=") and resumed.range.endswith("-")
        offset = int(resumed.range[len("bytes=") : -1])
        assert reported_before_kill <= offset < SIZE
        # Every attempt after the cut asked for the rest only, from the same offset (nothing was lost).
        assert {call.range for call in gets[1:]} == {resumed.range}

        staged = models / "big.bin"
        assert staged.stat().st_size == SIZE
        manifest = json.loads((models / ".localai-artifacts.json").read_text())["files"]
        assert manifest["big.bin"]["sha256"] == facts["sha256"]
        assert not list(models.glob("**/.*.partial"))

        after = _reports(proxy, since, "cprestart#0")
        assert any(r["state"] == "downloading" and offset <= r["bytes"] < SIZE for r in after), after
        assert replica.progress == 1.0 and replica.download_bytes == SIZE
        log = "\n".join(line.text for line in agent.client().get_logs("cprestart#0"))
        assert "retrying in" in log and "verified" in log
        print(
            f"\ncontrol plane down {ready_at - killed_at:.1f} s (kill -9 to ready); cut at byte {offset} of "
            f"{SIZE}; {len(gets) - 1} resumed GET(s), the answered one {resumed.at - ready_at:.1f} s after the "
            f"restart; replica loaded {loaded_at - ready_at:.1f} s after the restart "
            f"({loaded_at - killed_at:.1f} s after the kill)"
        )
    finally:
        agent.stop()
        proxy.stop()
        print(f"--- agent log ---\n{agent.log()[-3000:]}")
