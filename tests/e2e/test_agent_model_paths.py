"""Model paths stay inside the agent's models path and allowed roots: a real agent refuses the rest, and the
gateway answers 503 `load_failed` carrying the agent's reason."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from tests.e2e.conftest import AgentProcess, FakeControlPlane, child_pids
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory
from worker_client.errors import WorkerError

pytestmark = pytest.mark.e2e


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """A models path with a symlink escaping to /etc and one into the shared root, and the shared root."""
    models, shared = tmp_path / "models", tmp_path / "shared"
    models.mkdir()
    shared.mkdir()
    (models / "escape").symlink_to("/etc")
    (models / "escape.gguf").symlink_to("/etc/passwd")
    (shared / "big.gguf").write_text("weights")
    (models / "big.gguf").symlink_to(shared / "big.gguf")
    return models, shared


@pytest.fixture
def agent(control_plane: FakeControlPlane, start_agent, roots: tuple[Path, Path]) -> AgentProcess:
    models, shared = roots
    return start_agent(control_plane, "--models-path", str(models), "--allowed-model-roots", str(shared))


@pytest.mark.parametrize(
    "options",
    [
        {"Model": "../../etc/passwd"},
        {"Model": "/etc/passwd"},
        {"Model": "m", "ModelFile": "/etc/passwd"},
        {"Model": "m", "ModelPath": "/etc"},
        {"Model": "escape/passwd"},
        {"Model": "escape.gguf"},
    ],
)
def test_paths_outside_the_roots_are_refused_before_any_process_starts(
    agent: AgentProcess, roots: tuple[Path, Path], options: dict
) -> None:
    models, shared = roots
    with pytest.raises(WorkerError) as refused:
        agent.client().load_replica("m", 0, "echo", options)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and not refused.value.retryable
    path = options.get("ModelFile") or options.get("ModelPath") or options["Model"]
    assert repr(path) in refused.value.details
    assert f"outside the allowed model roots ({models}, {shared})" in refused.value.details
    assert agent.client().list_replicas() == [] and child_pids(agent.pid) == set()


@pytest.mark.parametrize(
    "options",
    [
        {"Model": "echo-1"},
        {},
        {"Model": "sentence-transformers/all-MiniLM-L6-v2"},
        {"Model": "huggingface://TheBloke/m-GGUF/m.Q4_K_M.gguf"},
        {"Model": "big.gguf"},  # a symlink into the shared root
        {"Model": "m", "ModelFile": "{shared}/big.gguf"},
    ],
)
def test_names_ids_uris_and_allowed_paths_load(
    agent: AgentProcess, roots: tuple[Path, Path], options: dict
) -> None:
    options = {key: value.format(shared=roots[1]) for key, value in options.items()}
    loaded = agent.client().load_replica("m", 0, "echo", options)
    assert [replica.process_key for replica in agent.client().list_replicas()] == [loaded.process_key]


@pytest.mark.django_db(transaction=True)
def test_gateway_answers_503_load_failed_naming_the_refused_path(cp_server, start_agents) -> None:
    (agent,) = start_agents(1)
    ModelConfigFactory(name="passwd", options={"ModelFile": "/etc/passwd"})
    body = {"model": "passwd", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(f"{cp_server.url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "load_failed"
    assert "ModelFile '/etc/passwd'" in error["message"] and "allowed model roots" in error["message"]
    assert agent.processes() == []
