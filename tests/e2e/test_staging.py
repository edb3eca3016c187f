"""Model files staged to workers (issue 15), end to end: real agents, the control plane's own `cp://` route and a
plain HTTP file server on 127.0.0.1, files of tens of MB generated here."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from audit.models import AuditEntry
from nodes.apikeys import api_key_create
from nodes.models import ModelReplica, Node
from scheduling.catalog import model_config_upsert
from scheduling.models import LoadFailure, PlacementDecision, SchedulingRule
from tests.conftest import agent_ready, wait_until
from tests.e2e.gateway_support import RealAgent, approve_when_registered, start_agents_fixture  # noqa: F401
from tests.e2e.staging_support import MiB, file_server_fixture, make_file  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def admin_key() -> str:
    return api_key_create(name="staging-admin", is_admin=True)[1]


@pytest.fixture
def artifacts_dir(tmp_path: Path, settings) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    settings.LOCALAI_ARTIFACTS_PATH = str(path)
    return path


def chat(url: str, key: str, model: str, timeout: float = 180) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def api(url: str, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kwargs)


def manifest(agent: RealAgent) -> dict:
    path = agent.models_path / ".localai-artifacts.json"
    return json.loads(path.read_text())["files"] if path.exists() else {}


def replica_log(agent: RealAgent, key: str) -> str:
    return "\n".join(line.text for line in agent.client().get_logs(key))


def test_cp_files_scan_first_load_downloads_and_verifies_then_a_second_replica_does_not(
    cp_server, start_agents, artifacts_dir, admin_key
):
    """cp://: the scan fills sha256 and size, the first load downloads through the control plane's route and
    verifies, the row shows the finished progress, the heartbeat reports the file; a second replica on the
    same node loads without downloading again."""
    facts = make_file(artifacts_dir / "weights" / "m.bin", 24 * MiB)
    model_config_upsert(
        name="cpm", backend="echo", files=[{"uri": "cp://weights/m.bin", "path": "cpm/m.bin"}]
    )
    scanned = api(cp_server.url, admin_key, "POST", "/api/models/cpm/files/scan")
    assert scanned.status_code == 200, scanned.text
    assert scanned.json()["files"] == [
        {"uri": "cp://weights/m.bin", "sha256": facts["sha256"], "size": facts["size"], "path": "cpm/m.bin"}
    ]
    (agent,) = start_agents(1, slots=2, own_models_path=True)

    answer = chat(cp_server.url, admin_key, "cpm")
    assert answer.status_code == 200, answer.text
    staged = agent.models_path / "cpm" / "m.bin"
    assert staged.stat().st_size == facts["size"]
    assert manifest(agent)["cpm/m.bin"]["sha256"] == facts["sha256"]
    assert not list(staged.parent.glob(".*.partial"))
    assert "verified" in replica_log(agent, "cpm#0")
    rows = api(cp_server.url, admin_key, "GET", f"/api/nodes/{agent.node().id}/models").json()
    (row,) = [r for r in rows if r["process_key"] == "cpm#0"]
    assert row["state"] == "loaded" and row["progress"] == 1.0
    wait_until(
        lambda: facts["sha256"] in Node.objects.get(name=agent.name).artifacts,
        timeout=30,
        message="the heartbeat to report the file",
    )

    from tests.e2e.gateway_support import place

    (second,) = place("cpm")
    assert second.replica_index == 1
    log = replica_log(agent, "cpm#1")
    assert "downloading" not in log and "staged" in log
    assert agent.log().count("downloading cpm/m.bin") == 1


def test_cp_route_needs_the_node_token_and_serves_ranges(cp_server, start_agents, artifacts_dir):
    make_file(artifacts_dir / "r.bin", 3 * MiB)
    content = (artifacts_dir / "r.bin").read_bytes()
    (agent,) = start_agents(1)
    node = agent.node()
    from nodes.tokens import node_token_for

    url = f"{cp_server.url}/api/node/{node.id}/artifacts/r.bin"
    token = {"Authorization": f"Bearer {node_token_for(node)}"}
    assert httpx.get(url).status_code == 401
    whole = httpx.get(url, headers=token)
    assert whole.status_code == 200 and whole.content == content
    part = httpx.get(url, headers={**token, "Range": "bytes=1000-"})
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 1000-{len(content) - 1}/{len(content)}"
    assert part.content == content[1000:]
    assert httpx.get(url, headers={**token, "Range": f"bytes={len(content)}-"}).status_code == 416
    assert httpx.get(url.replace("r.bin", "nope.bin"), headers=token).status_code == 404
    escape = f"{cp_server.url}/api/node/{node.id}/artifacts/..%2F..%2Fetc%2Fpasswd"
    assert httpx.get(escape, headers=token).status_code == 404


def test_kill_9_mid_download_resumes_from_the_bytes_already_there(
    cp_server, start_agents, file_server, admin_key, settings, tmp_path
):
    """The download stalls half-way; the row shows `downloading` with its progress; the agent is killed -9;
    restarted, the next request asks the server for the rest only (Range from the partial file's size)."""
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 0
    facts = make_file(file_server.root / "big.bin", 40 * MiB)
    file_server.stall_at = 20 * MiB
    model_config_upsert(
        name="resume",
        backend="echo",
        files=[{"uri": f"{file_server.url}/big.bin", "path": "big.bin", **facts}],
    )
    (agent,) = start_agents(1, own_models_path=True)
    first: dict = {}
    request = threading.Thread(target=lambda: first.update(answer=chat(cp_server.url, admin_key, "resume")))
    request.start()

    def downloading():
        row = ModelReplica.objects.filter(model_name="resume").first()
        return row if row and row.state == "downloading" and row.download_bytes > 0 else None

    row = wait_until(downloading, timeout=60, message="the row to show download progress")
    assert 0 < row.progress < 1 and row.download_total == facts["size"]
    partial = agent.models_path / ".big.bin.partial"
    wait_until(lambda: partial.exists() and partial.stat().st_size >= 20 * MiB, timeout=60, message="half")
    os.kill(agent.process.pid, signal.SIGKILL)
    agent.process.wait()
    request.join(120)
    assert first["answer"].status_code == 503
    kept = partial.stat().st_size
    assert kept == 20 * MiB

    file_server.stall_at = None
    file_server.release.set()
    again = RealAgent(cp_server, agent.name, tmp_path / "again.log", agent.args, state_dir=agent.state_dir)
    try:
        wait_until(
            lambda: Node.objects.get(name=agent.name).address == again.address,
            timeout=60,
            message="the restarted agent's registration",
        )
        approve_when_registered(agent.name)
        wait_until(lambda: agent_ready(again.client()), timeout=30, message="the restarted agent")
        answer = chat(cp_server.url, admin_key, "resume")
        assert answer.status_code == 200, answer.text
        assert file_server.ranges("big.bin")[-1] == f"bytes={kept}-"
        assert (agent.models_path / "big.bin").stat().st_size == facts["size"]
        assert not partial.exists()
        assert f"resuming at byte {kept}" in replica_log(again, "resume#0")
    finally:
        again.stop()


def test_a_corrupted_file_is_refused_removed_and_backs_off(cp_server, start_agents, file_server, admin_key):
    facts = make_file(file_server.root / "bad.bin", 12 * MiB)
    wrong = "0" * 64
    model_config_upsert(
        name="corrupt",
        backend="echo",
        files=[
            {"uri": f"{file_server.url}/bad.bin", "path": "bad.bin", "sha256": wrong, "size": facts["size"]}
        ],
    )
    (agent,) = start_agents(1, own_models_path=True)
    answer = chat(cp_server.url, admin_key, "corrupt")
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert "checksum mismatch for bad.bin" in message and facts["sha256"] in message
    assert not (agent.models_path / "bad.bin").exists()
    assert not (agent.models_path / ".bad.bin.partial").exists()
    assert not ModelReplica.objects.filter(model_name="corrupt").exists()
    assert LoadFailure.objects.filter(model_name="corrupt").exists()
    assert "checksum mismatch" in replica_log(agent, "corrupt#0")
    again = chat(cp_server.url, admin_key, "corrupt")  # the backoff answers without another download
    assert again.status_code == 503 and again.json()["error"]["code"] == "load_failed"
    assert len(file_server.ranges("bad.bin")) == 1


def test_5xx_is_retried_with_backoff_and_404_fails_after_the_download_timeout(
    cp_server, start_agents, file_server, admin_key, settings
):
    settings.LOCALAI_DOWNLOAD_TIMEOUT = 4
    facts = make_file(file_server.root / "flaky.bin", 8 * MiB)
    model_config_upsert(
        name="flaky",
        backend="echo",
        files=[{"uri": f"{file_server.url}/flaky.bin", "path": "f.bin", **facts}],
    )
    model_config_upsert(
        name="missing",
        backend="echo",
        files=[{"uri": f"{file_server.url}/none.bin", "path": "n.bin", **facts}],
    )
    (agent,) = start_agents(1, own_models_path=True)
    file_server.fail_with = [503, 500]
    answer = chat(cp_server.url, admin_key, "flaky")
    assert answer.status_code == 200, answer.text
    assert len(file_server.ranges("flaky.bin")) == 3
    assert "HTTP 503" in replica_log(agent, "flaky#0")

    missing = chat(cp_server.url, admin_key, "missing")
    assert missing.status_code == 503
    message = missing.json()["error"]["message"]
    assert "HTTP 404" in message and "download timeout" in message
    assert len(file_server.ranges("none.bin")) >= 2
    assert "staging failed" in replica_log(agent, "missing#0")


def test_the_disk_budget_refuses_before_downloading_and_evicts_only_unused_files(
    cp_server, start_agents, file_server, admin_key
):
    a = make_file(file_server.root / "a.bin", 30 * MiB)
    b = make_file(file_server.root / "b.bin", 30 * MiB)
    model_config_upsert(
        name="ma", backend="echo", files=[{"uri": f"{file_server.url}/a.bin", "path": "a.bin", **a}]
    )
    model_config_upsert(
        name="mb", backend="echo", files=[{"uri": f"{file_server.url}/b.bin", "path": "b.bin", **b}]
    )
    (agent,) = start_agents(1, own_models_path=True, extra_args=["--models-cache-size", "50MiB"])
    mine = agent.models_path / "mine.bin"  # a file the agent did not download: never deleted
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"x" * MiB)
    assert chat(cp_server.url, admin_key, "ma").status_code == 200

    refused = chat(cp_server.url, admin_key, "mb")  # ma's replica runs and uses a.bin
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "b.bin needs 30.0 MiB, 20.0 MiB free of the --models-cache-size budget of 50.0 MiB" in message
    assert file_server.ranges("b.bin") == []
    assert "needs 30.0 MiB" in replica_log(agent, "mb#0")

    from nodes.services import replica_unload
    from scheduling.loadfailures import load_failure_clear

    node = agent.node()
    replica_unload(node=node, replicas=list(ModelReplica.objects.filter(model_name="ma")))
    wait_until(lambda: not agent.processes(), timeout=30, message="ma's backend to stop")
    load_failure_clear(model_name="mb", reason="test")
    answer = chat(cp_server.url, admin_key, "mb")
    assert answer.status_code == 200, answer.text
    assert not (agent.models_path / "a.bin").exists()  # evicted: downloaded by the agent, unused
    assert (agent.models_path / "b.bin").stat().st_size == b["size"]
    assert mine.exists()
    assert set(manifest(agent)) == {"b.bin"}


def test_placement_prefers_the_node_holding_the_files_after_a_prefetch_rule(
    cp_server, start_agents, file_server, admin_key
):
    """A rule with `prefetch: true` has the reconciler stage the files on the matching node; the next cold
    request is placed there (ranked above an equal node without them), and the decision says why."""
    facts = make_file(file_server.root / "loc.bin", 16 * MiB)
    model_config_upsert(
        name="loc", backend="echo", files=[{"uri": f"{file_server.url}/loc.bin", "path": "loc.bin", **facts}]
    )
    (first,) = start_agents(1, own_models_path=True, labels="zone=a")
    (second,) = start_agents(1, own_models_path=True, labels="zone=b")
    rule = api(
        cp_server.url,
        admin_key,
        "POST",
        "/api/nodes/scheduling",
        json={"model_name": "loc", "node_selector": {"zone": "b"}, "prefetch": True},
    )
    assert rule.status_code == 200 and rule.json()["prefetch"] is True, rule.text

    from scheduling.reconciler import reconcile_tick

    report = reconcile_tick()
    assert report.prefetched == [f"loc on {second.name}: loc.bin"]
    wait_until(
        lambda: facts["sha256"] in Node.objects.get(name=second.name).artifacts,
        timeout=60,
        message="the prefetched file in the heartbeat",
    )
    assert not (first.models_path / "loc.bin").exists()
    SchedulingRule.objects.filter(model_name="loc").delete()

    answer = chat(cp_server.url, admin_key, "loc")
    assert answer.status_code == 200, answer.text
    assert ModelReplica.objects.get(model_name="loc").node.name == second.name
    decision = PlacementDecision.objects.filter(model_name="loc", outcome="placed").first()
    chosen = decision.candidates[0]
    assert chosen["node"] == second.name and "holds all 1 file(s)" in chosen["detail"]
    assert "1 of 1 file(s) to download" in decision.candidates[1]["detail"]
    assert len(file_server.ranges("loc.bin")) == 1  # staged once, loaded without downloading again

    prefetch = api(cp_server.url, admin_key, "POST", "/api/models/loc/prefetch")
    assert prefetch.status_code == 200, prefetch.text
    by_node = {n["node_name"]: n for n in prefetch.json()["nodes"]}
    assert by_node[second.name]["held"] == ["loc.bin"]
    assert by_node[first.name]["downloading"] == ["loc.bin"]
    audited = AuditEntry.objects.get(action="model.prefetch", target_id="loc")
    assert audited.via == "api" and audited.actor_name == "staging-admin"
    assert audited.after["nodes"][first.name]["downloading"] == ["loc.bin"]
    assert audited.after["nodes"][second.name]["held"] == ["loc.bin"]
    wait_until(lambda: (first.models_path / "loc.bin").exists(), timeout=60, message="the API prefetch")
