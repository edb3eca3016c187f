"""The agent's staging on its own (a fake control plane records its progress reports): one download per file per
node whatever the number of loads wanting it, progress posted again and again while a download runs, the files it
holds in its heartbeat, the prefetch call, and bad input refused."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from tests.conftest import wait_until
from tests.e2e.staging_support import MiB, file_server_fixture, make_file  # noqa: F401
from worker_client.errors import WorkerError

pytestmark = pytest.mark.e2e


def test_concurrent_loads_share_one_download_and_progress_is_reported_while_it_runs(
    control_plane, start_agent, file_server, tmp_path: Path
):
    facts = make_file(file_server.root / "shared.bin", 20 * MiB)
    file_server.stall_at = 8 * MiB
    models = tmp_path / "models"
    agent = start_agent(control_plane, "--models-path", str(models), "--max-replicas-per-model", "2")
    files = [{"uri": f"{file_server.url}/shared.bin", "path": "shared.bin", **facts}]
    results: dict[int, object] = {}

    def load(index: int) -> None:
        try:
            results[index] = agent.client().load_replica(
                "m", index, "echo", files=files, download_timeout=120
            )
        except WorkerError as error:
            results[index] = error

    loads = [threading.Thread(target=load, args=(index,)) for index in (0, 1)]
    for thread in loads:
        thread.start()

    def reports() -> list[dict]:
        return [r for call in control_plane.calls_to("/downloads") for r in call.body["replicas"]]

    def stalled_reports() -> list[dict]:
        return [r for r in reports() if r["key"] == "m#0" and r["bytes"] == 8 * MiB]

    wait_until(
        lambda: len(stalled_reports()) >= 2,
        timeout=60,
        message="progress reported again and again while the download is stalled",
    )
    assert stalled_reports()[-1]["total"] == facts["size"]
    assert stalled_reports()[-1]["state"] == "downloading"
    assert {r["key"] for r in reports()} == {"m#0", "m#1"}
    file_server.release.set()
    file_server.stall_at = None
    for thread in loads:
        thread.join(120)
    assert all(not isinstance(result, WorkerError) for result in results.values()), results
    # One transfer of the file (cut at the stall), then one resumed request: never one per replica.
    assert file_server.ranges("shared.bin") == ["", f"bytes={8 * MiB}-"]
    assert {r["key"] for r in reports() if r["state"] == "loading"} == {"m#0", "m#1"}
    heartbeats = control_plane.calls_to("/heartbeat")
    wait_until(
        lambda: facts["sha256"] in (control_plane.calls_to("/heartbeat")[-1].body.get("artifacts") or []),
        timeout=30,
        message="the file in a heartbeat",
    )
    assert heartbeats


def test_stage_files_prefetches_in_the_background_and_refuses_escaping_paths(
    control_plane, start_agent, file_server, tmp_path: Path
):
    facts = make_file(file_server.root / "pre.bin", 6 * MiB)
    models = tmp_path / "models"
    agent = start_agent(control_plane, "--models-path", str(models))
    files = [{"uri": f"{file_server.url}/pre.bin", "path": "sub/pre.bin", **facts}]
    downloading, held = agent.client().stage_files("p", files)
    assert (downloading, held) == (["sub/pre.bin"], [])
    wait_until(lambda: (models / "sub" / "pre.bin").exists(), timeout=60, message="the prefetched file")
    wait_until(lambda: agent.client().stage_files("p", files) == ([], ["sub/pre.bin"]), timeout=10)
    with pytest.raises(WorkerError) as error:
        agent.client().stage_files("p", [{**files[0], "path": "../escape.bin"}])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(WorkerError) as error:
        agent.client().load_replica("p", 0, "echo", files=[{**files[0], "path": "/etc/x"}])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not (tmp_path / "escape.bin").exists()
