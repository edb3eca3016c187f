"""A backend sees an allowlisted environment, never the agent's secrets: read from /proc/<pid>/environ of the
real backend process a real agent started."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import BACKEND_TOKEN, TEST_BACKENDS, AgentProcess, FakeControlPlane
from worker_client.agent.supervisor import inherits

pytestmark = pytest.mark.e2e

SECRETS = {
    "LOCALAI_REGISTRATION_TOKEN": "registration-secret-3f9a",
    "DJANGO_SECRET_KEY": "django-secret-7c21",
    "DATABASE_URL": "postgres://cluster:db-password-55e0@db.internal/cluster",
    "REDIS_URL": "redis://:redis-password-1b2c@redis.internal:6379/0",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-9d8e",
    "PYTHONPATH": "/opt/agent-only",
    "NVIDIA_API_KEY": "nvapi-secret-42aa",  # a GPU prefix, but a credential
}
GPU_AND_LOCALE = {
    "CUDA_VISIBLE_DEVICES": "0,1",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "ROCR_VISIBLE_DEVICES": "0",
    "HIP_VISIBLE_DEVICES": "0",
    "HSA_OVERRIDE_GFX_VERSION": "10.3.0",
    "GPU_DEVICE_ORDINAL": "0",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
CONFIGURED = {"MY_BACKEND_SETTING": "on", "CUDA_VISIBLE_DEVICES": "1"}


@pytest.fixture
def backends_config(tmp_path: Path) -> Path:
    """The test backends plus `envecho`: the echo backend with a configured `env`."""
    path = tmp_path / "backends.yaml"
    envecho = {"command": [sys.executable, "-m", "worker_client.backends.echo"], "env": CONFIGURED}
    path.write_text(yaml.safe_dump({**TEST_BACKENDS, "envecho": envecho}))
    return path


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_backends_see_the_allowlist_their_env_and_token_but_no_agent_secret(
    control_plane: FakeControlPlane, start_agent, tmp_path: Path
) -> None:
    agent: AgentProcess = start_agent(
        control_plane, env={**SECRETS, **GPU_AND_LOCALE, "TMPDIR": str(tmp_path)}
    )
    client = agent.client()
    configured = client.load_replica("m", 0, "envecho", {"Model": "m"})
    builtin = client.load_replica("e", 0, "echo", {"Model": "e"})

    seen = environ_of(configured.pid)
    for name in SECRETS:
        assert name not in seen
    leaked = [value for value in seen.values() for secret in SECRETS.values() if secret in value]
    assert not leaked
    extra = {"MY_BACKEND_SETTING", "LOCALAI_GRPC_AUTH_TOKEN"}
    assert all(inherits(name) or name in extra for name in seen), sorted(seen)
    # The GPU and locale variables pass; the backend's configured env wins over the agent's.
    assert {name: seen.get(name) for name in GPU_AND_LOCALE} == {
        **GPU_AND_LOCALE,
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert seen["MY_BACKEND_SETTING"] == "on"
    assert seen["LOCALAI_GRPC_AUTH_TOKEN"] == BACKEND_TOKEN
    assert (seen["PATH"], seen["HOME"], seen["TMPDIR"]) == (
        os.environ["PATH"],
        os.environ["HOME"],
        str(tmp_path),
    )

    builtin_seen = environ_of(builtin.pid)
    assert not (set(SECRETS) - {"PYTHONPATH"}) & set(builtin_seen)
    assert builtin_seen["PYTHONPATH"] == str(
        Path(__file__).resolve().parents[2]
    )  # the package, not the agent's
    assert "MY_BACKEND_SETTING" not in builtin_seen and builtin_seen["CUDA_VISIBLE_DEVICES"] == "0,1"
