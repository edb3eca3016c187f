"""Model files (issue 15) without processes: the catalog field's validation, `import_models`' `download_files`,
the scan, the `downloading` state in claims and heartbeats, progress reports, locality in the ranking."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from django.utils import timezone

from audit.models import AuditEntry
from nodes import services
from nodes.choices import ReplicaState
from nodes.models import ModelReplica, Node
from scheduling import pipeline
from scheduling.artifacts import FilesInvalid, files_clean
from scheduling.catalog import models_import_yaml
from scheduling.models import ModelConfig
from tests.api.conftest import give_token
from tests.factories import ModelConfigFactory, NodeFactory, claim_row

pytestmark = pytest.mark.django_db
GiB = 1024**3
SHA = "ab" * 32
OTHER = "cd" * 32


def entry(**fields):
    return {"uri": "https://files.example/m.gguf", "sha256": SHA, "size": 10, "path": "m/m.gguf", **fields}


# --- validation -------------------------------------------------------------------------------------------


def test_valid_files_are_normalised():
    assert files_clean([entry(sha256=SHA.upper())]) == [entry()]
    assert files_clean([{"uri": "cp://w/m.bin", "path": "m.bin"}]) == [
        {"uri": "cp://w/m.bin", "sha256": "", "size": 0, "path": "m.bin"}
    ]
    assert files_clean(None) == []


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"uri": "x"}, "must be a list"),
        ([entry(path="../escape")], "must not contain '..'"),
        ([entry(path="/etc/passwd")], "must be a relative path"),
        ([entry(path="a/.hidden")], "no part may start with '.'"),
        ([entry(path="a//b")], "empty parts"),
        ([entry(), entry()], "is given twice"),
        ([entry(uri="ftp://x/y")], "must start with https://, http:// or cp://"),
        ([entry(uri="cp://../x")], "must not contain '..'"),
        ([entry(sha256="")], "needs its sha256"),
        ([entry(sha256="xyz")], "64 hexadecimal digits"),
        ([entry(size=-1)], "at least 0"),
        ([entry(size=True)], "whole number"),
        ([{**entry(), "mode": "x"}], "unknown field(s) mode"),
        (["m.gguf"], "must be an object"),
    ],
)
def test_invalid_files_are_refused_with_the_reason(files, message):
    with pytest.raises(FilesInvalid, match=None) as error:
        files_clean(files)
    assert message in str(error.value)


def test_the_api_refuses_bad_files_with_400_and_stores_good_ones(api):
    bad = api.post("/api/models", {"name": "f", "files": [entry(path="../x")]}, format="json")
    assert bad.status_code == 400
    assert "files" in bad.json()["details"]
    assert not ModelConfig.objects.filter(name="f").exists()
    good = api.post("/api/models", {"name": "f", "files": [entry()]}, format="json")
    assert good.status_code == 201 and good.json()["files"] == [entry()]


def test_import_models_reads_localai_download_files(tmp_path: Path):
    yaml_file = tmp_path / "m.yaml"
    yaml_file.write_text(
        "name: phi\nbackend: llama-cpp\nparameters:\n  model: phi.gguf\ndownload_files:\n"
        f"- filename: phi.gguf\n  uri: huggingface://org/repo/phi.gguf\n  sha256: {SHA}\n"
        f"- filename: extra/tok.json\n  uri: https://files.example/tok.json\n  sha256: {OTHER}\n"
    )
    (imported,) = models_import_yaml(paths=[yaml_file], base=tmp_path)
    assert imported.config.files == [
        {
            "uri": "https://huggingface.co/org/repo/resolve/main/phi.gguf",
            "sha256": SHA,
            "size": 0,
            "path": "phi.gguf",
        },
        {"uri": "https://files.example/tok.json", "sha256": OTHER, "size": 0, "path": "extra/tok.json"},
    ]
    assert "download_files" not in imported.config.options


def test_import_models_refuses_a_download_file_escaping_the_models_path(tmp_path: Path):
    from django.core.exceptions import ValidationError

    yaml_file = tmp_path / "m.yaml"
    yaml_file.write_text(f"name: x\ndownload_files:\n- filename: ../x\n  uri: https://a/b\n  sha256: {SHA}\n")
    with pytest.raises(ValidationError, match="must not contain"):
        models_import_yaml(paths=[yaml_file], base=tmp_path)
    assert not ModelConfig.objects.exists()


# --- the scan ---------------------------------------------------------------------------------------------


def test_files_scan_fills_sha256_and_size_of_cp_files(api, settings, tmp_path: Path):
    settings.LOCALAI_ARTIFACTS_PATH = str(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "m.bin").write_bytes(b"hello")
    ModelConfigFactory(
        name="org/s", files=[{"uri": "cp://w/m.bin", "sha256": "", "size": 0, "path": "m.bin"}]
    )
    answer = api.post(f"/api/models/{quote('org/s')}/files/scan")
    assert answer.status_code == 200, answer.content
    import hashlib

    assert answer.json()["files"][0]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert ModelConfig.objects.get(name="org/s").files[0]["size"] == 5
    (entry,) = AuditEntry.objects.filter(action="model.update", target_id="org/s")
    assert (entry.actor_name, entry.via) == ("ops", "api")
    assert entry.before["files"][0]["sha256"] == "" and entry.after["files"][0]["size"] == 5
    assert api.post(f"/api/models/{quote('org/s')}/files/scan").status_code == 200
    assert AuditEntry.objects.filter(action="model.update").count() == 1  # unchanged: no second entry

    ModelConfigFactory(name="gone", files=[{"uri": "cp://nope.bin", "sha256": "", "size": 0, "path": "n"}])
    missing = api.post("/api/models/gone/files/scan")
    assert missing.status_code == 400 and "cp://nope.bin" in str(missing.json()["details"])
    assert api.post("/api/models/unknown/files/scan").status_code == 404


def test_prefetch_of_a_model_without_files_is_400(api):
    ModelConfigFactory(name="plain")
    assert api.post("/api/models/plain/prefetch").status_code == 400
    assert api.post("/api/models/unknown/prefetch").status_code == 404
    assert not AuditEntry.objects.filter(action="model.prefetch").exists()


def test_a_prefetch_through_the_api_is_audited_with_each_nodes_answer(api):
    ModelConfigFactory(name="staged", files=[entry()])
    NodeFactory(name="gpu-x", status="draining")  # not schedulable: not asked
    answer = api.post("/api/models/staged/prefetch")
    assert answer.status_code == 200 and answer.json()["nodes"] == []
    (audited,) = AuditEntry.objects.filter(action="model.prefetch")
    assert (audited.target_id, audited.actor_name, audited.via) == ("staged", "ops", "api")
    assert audited.before is None and audited.after == {"nodes": {}}


# --- state, capacity and progress ------------------------------------------------------------------------


def test_a_claim_for_files_the_node_lacks_starts_downloading_and_counts_like_loading():
    node = NodeFactory(total_vram=24 * GiB, available_vram=24 * GiB)
    row = claim_row(node_id=node.pk, model_name="m", vram_bytes=8 * GiB, artifacts=frozenset({SHA}))
    assert row.state == ReplicaState.DOWNLOADING
    node.refresh_from_db()
    assert node.reserved_vram == 8 * GiB  # reserved like a loading replica
    refused = pipeline.replica_claim(node_id=node.pk, model_name="m", artifacts=frozenset({SHA}))
    assert refused.replica is None and refused.refused.verdict == "no_free_slot"  # the slot is taken

    Node.objects.filter(pk=node.pk).update(artifacts=[SHA])
    holder = claim_row(node_id=node.pk, model_name="n", artifacts=frozenset({SHA}))
    assert holder.state == ReplicaState.LOADING  # the node holds the file: nothing to download


def test_progress_reports_update_downloading_rows_and_move_them_to_loading(client):
    node = NodeFactory()
    row = claim_row(node_id=node.pk, model_name="m", artifacts=frozenset({SHA}))
    token = give_token(node)
    url = f"/api/node/{node.pk}/downloads"
    report = {"key": "m#0", "state": "downloading", "bytes": 25, "total": 100, "rate": 12.5}
    answer = client.post(
        url, {"replicas": [report]}, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert answer.status_code == 200, answer.content
    row.refresh_from_db()
    assert (row.progress, row.download_bytes, row.download_total, row.download_rate) == (0.25, 25, 100, 12)
    client.post(
        url,
        {"replicas": [{"key": "m#0", "state": "loading"}]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    row.refresh_from_db()
    assert row.state == ReplicaState.LOADING and row.progress == 1.0 and row.download_bytes == 100
    bad = client.post(
        url,
        {"replicas": [{"key": "m#0", "state": "loaded"}]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert bad.status_code == 400
    assert client.post(url, {"replicas": []}, content_type="application/json").status_code == 401


def test_a_progress_report_never_touches_a_loaded_row():
    node = NodeFactory()
    row = claim_row(node_id=node.pk, model_name="m", artifacts=frozenset({SHA}))
    assert services.replica_mark_loaded(replica_id=row.pk, address="127.0.0.1:1")
    services.replica_download_progress(node=node, reports=[{"key": "m#0", "state": "loading"}])
    assert ModelReplica.objects.get(pk=row.pk).state == ReplicaState.LOADED


def test_the_heartbeat_stores_artifacts_and_keeps_downloading_rows_for_the_download_timeout(settings):
    settings.LOCALAI_LOAD_TIMEOUT = 60
    settings.LOCALAI_DOWNLOAD_TIMEOUT = 3600
    node = NodeFactory()
    old = timezone.now() - timedelta(seconds=600)
    downloading = claim_row(node_id=node.pk, model_name="d", artifacts=frozenset({SHA}))
    loading = claim_row(node_id=node.pk, model_name="l")
    ModelReplica.objects.filter(pk__in=[downloading.pk, loading.pk]).update(load_started_at=old)
    services.node_heartbeat(node=node, artifacts=[OTHER, SHA, SHA])
    assert Node.objects.get(pk=node.pk).artifacts == sorted([SHA, OTHER])
    assert ModelReplica.objects.filter(pk=downloading.pk).exists()  # 10 min < 1 h of download timeout
    assert not ModelReplica.objects.filter(pk=loading.pk).exists()  # past its load timeout


def test_a_heartbeat_with_a_malformed_artifact_is_400(client):
    node = NodeFactory()
    answer = client.post(
        f"/api/node/{node.pk}/heartbeat",
        {"artifacts": ["not-a-sha"]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {give_token(node)}",
    )
    assert answer.status_code == 400 and "artifacts" in answer.json()["details"]


# --- locality ---------------------------------------------------------------------------------------------


def test_a_node_holding_all_files_ranks_above_an_equal_node_and_the_plan_says_so():
    model = pipeline.ModelRequirement("m", artifacts=frozenset({SHA, OTHER}))
    a = pipeline.NodeSnapshot(id=1, name="a", effective_cap=1, artifacts=frozenset({SHA}))
    b = pipeline.NodeSnapshot(id=2, name="b", effective_cap=1, artifacts=frozenset({SHA, OTHER}))
    plan = pipeline.evaluate(model, [a, b])
    assert plan.chosen is not None and plan.chosen.name == "b"
    assert "holds all 2 file(s)" in plan.candidates[0].detail
    assert "1 of 2 file(s) to download" in plan.candidates[1].detail
    # Without files, the name breaks the tie as before.
    assert pipeline.evaluate(pipeline.ModelRequirement("m"), [a, b]).chosen.name == "a"
    # Spread still comes first: a node already running the model ranks after one that does not.
    busy = pipeline.NodeSnapshot(
        id=2, name="b", effective_cap=2, replicas_of_model=1, artifacts=frozenset({SHA, OTHER})
    )
    assert pipeline.evaluate(model, [a, busy]).chosen.name == "a"
