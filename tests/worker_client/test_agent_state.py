"""The agent's state directory (`--state-dir`): where the node credential lives, its mode, its reuse."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from worker_client.agent.config import parse_config
from worker_client.agent.state import CREDENTIAL_FILE, StateError, node_credential

BASE = ["--register-to", "http://127.0.0.1:8000"]


def test_state_dir_defaults_to_xdg_data_home_then_home(tmp_path: Path, monkeypatch) -> None:
    config = parse_config(BASE, {"XDG_DATA_HOME": str(tmp_path / "data")})
    assert config.state_dir == tmp_path / "data" / "localai-cluster-worker"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = parse_config(BASE, {})
    assert config.state_dir == tmp_path / "home" / ".local" / "share" / "localai-cluster-worker"


def test_state_dir_from_environment_and_flag_wins(tmp_path: Path) -> None:
    environ = {"LOCALAI_AGENT_STATE_DIR": str(tmp_path / "env")}
    assert parse_config(BASE, environ).state_dir == tmp_path / "env"
    assert (
        parse_config([*BASE, "--state-dir", str(tmp_path / "flag")], environ).state_dir == tmp_path / "flag"
    )


@pytest.mark.parametrize("name", ["w1\nINFO forged", "w1\r", "w\x00", "w\u2028x", "w\u202ex", "x" * 256])
def test_node_names_that_could_forge_log_lines_exit_2(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config([*BASE, "--node-name", name], {})
    assert exit_info.value.code == 2
    assert "--node-name" in capsys.readouterr().err


def test_credential_is_created_once_0600_and_reused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = node_credential(state_dir, "w1")
    path = state_dir / CREDENTIAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert len(first) >= 32
    assert node_credential(state_dir, "w1") == first
    assert not [p for p in state_dir.iterdir() if p.name != CREDENTIAL_FILE]  # no temporary left behind


def test_another_node_name_gets_a_new_credential(tmp_path: Path) -> None:
    first = node_credential(tmp_path, "w1")
    assert node_credential(tmp_path, "w2") != first


def test_a_readable_credential_file_is_made_0600(tmp_path: Path) -> None:
    node_credential(tmp_path, "w1")
    (tmp_path / CREDENTIAL_FILE).chmod(0o644)
    node_credential(tmp_path, "w1")
    assert stat.S_IMODE((tmp_path / CREDENTIAL_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"node_name": "w1"}', '{"node_name": "w1", "credential": ""}']
)
def test_a_damaged_credential_file_stops_the_agent_instead_of_being_replaced(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / CREDENTIAL_FILE).write_text(content)
    with pytest.raises(StateError):
        node_credential(tmp_path, "w1")
    assert (tmp_path / CREDENTIAL_FILE).read_text() == content
