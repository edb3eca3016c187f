"""The agent's disk budget for staged model files (issue 15 item 2), on its `ArtifactStore` with a plain HTTP file
server on 127.0.0.1: a file that does not fit evicts the least recently used files the agent downloaded that no
running replica uses, one at a time and only as many as needed; files in use and files it did not download stay."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.staging_support import MiB, file_server_fixture, make_file  # noqa: F401
from worker_client.agent.artifacts import MANIFEST_NAME, ArtifactFile, ArtifactStore


def staged(models: Path, name: str, last_used: float) -> tuple[ArtifactFile, dict]:
    facts = make_file(models / name, MiB)
    entry = {"sha256": facts["sha256"], "size": MiB, "owned": True, "last_used": last_used}
    return ArtifactFile(uri=f"http://unused/{name}", path=name, **facts), entry


async def test_the_budget_evicts_the_least_recently_used_unused_files_first(
    file_server, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    in_use, in_use_entry = staged(models, "in-use.bin", last_used=100)  # the oldest, but a replica runs on it
    _newer, newer_entry = staged(models, "newer.bin", last_used=300)
    _older, older_entry = staged(models, "older.bin", last_used=200)
    (models / "mine.bin").write_bytes(b"x" * MiB)  # not downloaded by the agent: never counted nor deleted
    manifest = {"in-use.bin": in_use_entry, "newer.bin": newer_entry, "older.bin": older_entry}
    (models / MANIFEST_NAME).write_text(json.dumps({"files": manifest}))
    store = ArtifactStore(models, cache_size=3 * MiB)
    await store.ensure([in_use], key="m#0", timeout=30)  # staged already: pinned by the running replica
    assert file_server.ranges("in-use.bin") == []

    facts = make_file(file_server.root / "new.bin", MiB)
    new = ArtifactFile(uri=f"{file_server.url}/new.bin", path="new.bin", **facts)
    await store.ensure([new], key="n#0", timeout=30)

    assert not (models / "older.bin").exists()  # the least recently used file no replica uses
    assert (models / "newer.bin").exists()  # one eviction made room: nothing more went
    assert (models / "in-use.bin").exists() and (models / "mine.bin").exists()
    assert (models / "new.bin").stat().st_size == MiB
    kept = json.loads((models / MANIFEST_NAME).read_text())["files"]
    assert set(kept) == {"in-use.bin", "newer.bin", "new.bin"}
    assert store.used_bytes() == 3 * MiB
