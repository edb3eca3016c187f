"""The agent's flags and environment: sizes, durations, validation (SCENARIO 167, CONTRACT §4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_client.agent.config import ECHO_BACKEND, parse_config, parse_duration, parse_size

GiB = 1024**3
BASE = ["--register-to", "http://127.0.0.1:8000"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GiB),
        ("512MiB", 512 * 1024**2),
        ("8GB", 8 * 10**9),
        ("1000", 1000),
        ("1.5gib", 3 * GiB // 2),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("10s", 10), ("500ms", 0.5), ("2m", 120), ("7", 7), ("1h", 3600)]
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "24 bananas", "1e9"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_defaults() -> None:
    config = parse_config(BASE, {})
    assert config.max_replicas_per_model == 1
    assert config.labels == {"node.replica-slots": "1"}
    assert (config.bind_host, config.port, config.node_type) == ("0.0.0.0", 50051, "backend")
    assert config.heartbeat_interval is None and config.vram is None and config.drain_timeout == 30
    assert ECHO_BACKEND in config.backends
    assert config.models_path == Path("models").resolve()


def test_environment_applies_and_flags_win() -> None:
    env = {"LOCALAI_MAX_REPLICAS_PER_MODEL": "3", "LOCALAI_VRAM": "24GiB", "LOCALAI_NODE_LABELS": "tier=fast"}
    config = parse_config([*BASE, "--max-replicas-per-model", "4", "--addr", "127.0.0.1:6000"], env)
    assert config.max_replicas_per_model == 4 and config.vram == 24 * GiB
    assert config.labels == {"tier": "fast", "node.replica-slots": "4"}
    assert config.advertise_addr == "127.0.0.1:6000"


def test_download_rate_limit_is_a_size_per_second_from_the_flag_or_the_environment() -> None:
    assert parse_config(BASE, {}).download_rate_limit == 0
    assert parse_config([*BASE, "--download-rate-limit", "50MiB"], {}).download_rate_limit == 50 * 1024**2
    assert parse_config([*BASE, "--download-rate-limit", "8MB/s"], {}).download_rate_limit == 8 * 10**6
    env = {"LOCALAI_AGENT_DOWNLOAD_RATE_LIMIT": "1GiB"}
    assert parse_config(BASE, env).download_rate_limit == GiB
    assert parse_config([*BASE, "--download-rate-limit", "0"], env).download_rate_limit == 0


def test_advertise_host_alone_keeps_the_port_of_addr() -> None:
    config = parse_config([*BASE, "--addr", "0.0.0.0:7000", "--advertise-addr", "gpu-1.lan"], {})
    assert config.advertise_addr == "gpu-1.lan:7000"


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--max-replicas-per-model", "0"], {}, "--max-replicas-per-model"),
        (["--max-replicas-per-model", "abc"], {}, "--max-replicas-per-model"),
        ([], {"LOCALAI_MAX_REPLICAS_PER_MODEL": "-2"}, "LOCALAI_MAX_REPLICAS_PER_MODEL"),
        (["--vram", "lots"], {}, "--vram"),
        (["--heartbeat-interval", "0s"], {}, "--heartbeat-interval"),
        (["--addr", "nohost"], {}, "--addr"),
        (["--node-labels", "tier"], {}, "--node-labels"),
        (["--node-type", "gpu"], {}, "--node-type"),
        (["--backends-config", "/nonexistent.yaml"], {}, "--backends-config"),
        (["--download-rate-limit", "fast"], {}, "--download-rate-limit"),
        ([], {"LOCALAI_AGENT_DOWNLOAD_RATE_LIMIT": "-5MiB"}, "LOCALAI_AGENT_DOWNLOAD_RATE_LIMIT"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(
    args: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_config([*BASE, *args], env)
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1 and named in message


def test_register_to_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config([], {})
    assert "--register-to" in capsys.readouterr().err


def test_backends_config_adds_backends_and_keeps_echo(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(
        "llama-cpp:\n  command: [/opt/llama/grpc-server, --threads, 8]\n  env: {CUDA_VISIBLE_DEVICES: 0}\n"
    )
    backends = parse_config([*BASE, "--backends-config", str(path)], {}).backends
    assert backends["llama-cpp"].argv == ("/opt/llama/grpc-server", "--threads", "8")
    assert backends["llama-cpp"].env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert ECHO_BACKEND in backends


@pytest.mark.parametrize("document", ["- a list", "x: {command: []}", "x: {command: [a], env: [b]}", ": ["])
def test_malformed_backends_config_is_rejected(tmp_path: Path, document: str) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(document)
    with pytest.raises(SystemExit):
        parse_config([*BASE, "--backends-config", str(path)], {})


def test_allowed_model_roots_are_resolved_and_default_to_none(tmp_path: Path) -> None:
    assert parse_config(BASE, {}).allowed_model_roots == ()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    env = {"LOCALAI_ALLOWED_MODEL_ROOTS": f"{tmp_path / 'link'}, /srv/models/"}
    assert parse_config(BASE, env).allowed_model_roots == (tmp_path / "real", Path("/srv/models"))


def test_tls_is_off_by_default_and_read_from_the_flags(tmp_path: Path) -> None:
    from tests.e2e.tls_support import CertificateAuthority

    assert parse_config(BASE, {}).tls is None
    ca = CertificateAuthority(tmp_path, "ca")
    agent = ca.issue("agent", hosts=("127.0.0.1",))
    env = {"LOCALAI_TLS_CERT": str(agent.cert), "LOCALAI_TLS_KEY": str(agent.key)}
    tls = parse_config(BASE, env).tls
    assert tls is not None and tls.cert_chain == agent.cert_pem and tls.client_ca is None
    mtls = parse_config([*BASE, "--tls-client-ca", str(ca.cert)], env).tls
    assert mtls is not None and mtls.client_ca == ca.cert_pem


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tls-cert", "{cert}"], "--tls-key"),
        (["--tls-key", "{key}"], "--tls-cert"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca"),
        (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "--tls-key"),  # not the certificate's key
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert"),
        (["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{key}"], "--tls-client-ca"),
    ],
)
def test_bad_tls_flags_exit_2_naming_the_flag(
    tmp_path: Path, flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.e2e.tls_support import CertificateAuthority

    ca = CertificateAuthority(tmp_path, "ca")
    agent, other = ca.issue("agent", hosts=("127.0.0.1",)), ca.issue("other", hosts=("127.0.0.1",))
    paths = {
        "cert": agent.cert,
        "key": agent.key,
        "other_key": other.key,
        "ca": ca.cert,
        "missing": tmp_path / "x",
    }
    with pytest.raises(SystemExit) as exit_:
        parse_config([*BASE, *(flag.format(**paths) for flag in flags)], {})
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1 and named in message
