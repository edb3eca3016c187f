"""The agent's flags and environment variables (CONTRACT §4), parsed and validated.

A bad value stops start-up with exit code 2 and one line naming the flag (and its variable).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml

from worker_client.agent.state import default_state_dir

PROG = "localai-cluster-worker"
REPLICA_SLOTS_LABEL = "node.replica-slots"
NODE_TYPES = ("backend", "agent")
ECHO_BACKEND = "echo"

T = TypeVar("T")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def _quantity(text: str, units: Mapping[str, float], what: str) -> float:
    match = _QUANTITY.match(text)
    if match is None or match.group(2).lower() not in units:
        raise ValueError(f"expected a {what}")
    return float(match.group(1)) * units[match.group(2).lower()]


def parse_size(text: str) -> int:
    """Bytes from `24GiB`, `512MiB`, `8GB` or plain bytes."""
    return int(_quantity(text, _SIZE_UNITS, "size like 24GiB, 512MiB, 8GB or a number of bytes"))


def parse_rate(text: str) -> int:
    """Bytes per second from a size (`50MiB`, `100MB`, plain bytes), optionally followed by `/s`."""
    size = text.strip()
    return parse_size(size[:-2] if size.lower().endswith("/s") else size)


def parse_duration(text: str) -> float:
    """Seconds from `10s`, `500ms`, `2m`, `1h` or plain seconds."""
    return _quantity(text, _DURATION_UNITS, "duration like 10s, 500ms, 2m or a number of seconds")


def parse_positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number of at least 1") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def parse_host_port(text: str) -> tuple[str, int]:
    """(host, port) from `host:port` or `[v6]:port`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError("expected host:port with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def parse_labels(text: str) -> dict[str, str]:
    """`{k: v}` from `k=v,k=v`."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected k=v,k=v but {item!r} has no key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_node_name(text: str) -> str:
    """A node name: 1 to 255 characters, none of them control, format or line-breaking (the control plane
    refuses those too: they could forge log lines)."""
    if not text or len(text) > 255:
        raise ValueError("expected 1 to 255 characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in text):
        raise ValueError("control, format and line-breaking characters are not allowed")
    return text


def parse_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return text.rstrip("/")


def parse_node_type(text: str) -> str:
    if text not in NODE_TYPES:
        raise ValueError(f"expected one of {', '.join(NODE_TYPES)}")
    return text


@dataclass(frozen=True)
class BackendCommand:
    """How to start a backend: `argv` then `--addr host:port`, with `env` added to the agent's environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


# The echo backend is this package's own code: it is told where the package lives, since backends do not
# inherit the agent's PYTHONPATH (see `supervisor.backend_environment`).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
BUILTIN_BACKENDS = {
    ECHO_BACKEND: BackendCommand(
        (sys.executable, "-m", "worker_client.backends.echo"), {"PYTHONPATH": _PACKAGE_ROOT}
    )
}


def load_backends(path: str) -> dict[str, BackendCommand]:
    """The built-in backends, plus (and overridden by) those of the YAML file at `path` when given."""
    if not path:
        return dict(BUILTIN_BACKENDS)
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read {path}: {error}".replace("\n", " ")) from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must be a mapping of backend name to {{command, env}}")
    return {
        **BUILTIN_BACKENDS,
        **{str(name): _backend_command(name, entry) for name, entry in document.items()},
    }


def _backend_command(name: Any, entry: Any) -> BackendCommand:
    command = entry.get("command") if isinstance(entry, dict) else None
    env = entry.get("env") or {} if isinstance(entry, dict) else None
    if not isinstance(command, list) or not command or not isinstance(env, dict):
        raise ValueError(f"backend {name!r} needs command: [argv...] and optionally env: {{NAME: value}}")
    return BackendCommand(tuple(str(arg) for arg in command), {str(k): str(v) for k, v in env.items()})


def parse_paths(text: str) -> tuple[Path, ...]:
    """Absolute, symlink-resolved directories from `DIR,DIR`."""
    return tuple(Path(item.strip()).resolve() for item in text.split(",") if item.strip())


@dataclass(frozen=True)
class ServerTls:
    """PEM contents the agent's gRPC server presents (`cert_chain`, `private_key`) and, for mTLS, the CA that
    must have signed every client's certificate (`client_ca`)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


def _read_pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None


def check_cert_and_key(cert: str, key: str) -> None:
    """Raises `ValueError` unless `cert` is a PEM certificate chain and `key` its private key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"not a PEM certificate and its private key: {error}") from None


def check_ca(path: str) -> None:
    """Raises `ValueError` unless `path` holds PEM CA certificates."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"not a PEM CA certificate: {error}") from None


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent was told at start-up."""

    register_to: str
    registration_token: str
    node_name: str
    node_type: str
    bind_host: str
    port: int
    advertise_host: str
    advertise_port: int
    heartbeat_interval: float | None  # None: the interval the control plane answers, else 10 s
    labels: dict[str, str]
    max_replicas_per_model: int
    vram: int | None  # None: detect through NVML, else 0
    backends: dict[str, BackendCommand]
    models_path: Path
    drain_timeout: float
    allowed_model_roots: tuple[Path, ...]  # besides `models_path`, which is always allowed
    tls: ServerTls | None  # None: WorkerControl is plaintext
    state_dir: Path  # where the node credential is kept (worker_client.agent.state)
    models_cache_size: int = 0  # bytes of staged model files the agent may keep; 0 = unlimited
    download_rate_limit: int = 0  # bytes per second for all of its downloads together; 0 = unlimited

    @property
    def advertise_addr(self) -> str:
        return f"{self.advertise_host}:{self.advertise_port}"


@dataclass(frozen=True)
class _Option:
    flag: str
    env: str | None
    default: str | None
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def name(self) -> str:
        return f"{self.flag} ({self.env})" if self.env else self.flag


_OPTIONS = {
    option.dest: option
    for option in (
        _Option("--register-to", "LOCALAI_REGISTER_TO", None, "control plane base URL (required)"),
        _Option("--registration-token", "LOCALAI_REGISTRATION_TOKEN", "", "shared secret to register"),
        _Option("--node-name", "LOCALAI_NODE_NAME", None, "identity across restarts (default: hostname)"),
        _Option("--node-type", "LOCALAI_NODE_TYPE", "backend", "backend, or agent for a node without models"),
        _Option("--addr", "LOCALAI_ADDR", "0.0.0.0:50051", "WorkerControl bind host:port"),
        _Option("--advertise-addr", "LOCALAI_ADVERTISE_ADDR", None, "host[:port] the control plane dials"),
        _Option("--heartbeat-interval", "LOCALAI_HEARTBEAT_INTERVAL", None, "e.g. 10s (default: 10s)"),
        _Option("--node-labels", "LOCALAI_NODE_LABELS", "", "k=v,k=v"),
        _Option("--max-replicas-per-model", "LOCALAI_MAX_REPLICAS_PER_MODEL", "1", "replica slots per model"),
        _Option("--vram", "LOCALAI_VRAM", None, "declared VRAM when no GPU is detected, e.g. 24GiB"),
        _Option("--backends-config", "LOCALAI_BACKENDS_CONFIG", "", "YAML: name: {command: [...], env: {}}"),
        _Option("--models-path", "LOCALAI_MODELS_PATH", "./models", "directory of model files"),
        _Option("--drain-timeout", None, "30s", argparse.SUPPRESS),
        _Option(
            "--models-cache-size",
            "LOCALAI_MODELS_CACHE_SIZE",
            "0",
            "disk budget of staged model files, e.g. 200GiB (0 = unlimited)",
        ),
        _Option(
            "--download-rate-limit",
            "LOCALAI_AGENT_DOWNLOAD_RATE_LIMIT",
            "0",
            "bytes per second all model file downloads of the node may take together, e.g. 50MiB (0 = unlimited)",
        ),
        _Option(
            "--allowed-model-roots",
            "LOCALAI_ALLOWED_MODEL_ROOTS",
            "",
            "DIR,DIR where model files may be besides --models-path",
        ),
        _Option(
            "--tls-cert", "LOCALAI_TLS_CERT", None, "PEM certificate chain: serve WorkerControl over TLS"
        ),
        _Option("--tls-key", "LOCALAI_TLS_KEY", None, "PEM private key of --tls-cert"),
        _Option(
            "--tls-client-ca", "LOCALAI_TLS_CLIENT_CA", None, "PEM CA: require client certificates (mTLS)"
        ),
        _Option(
            "--state-dir",
            "LOCALAI_AGENT_STATE_DIR",
            None,
            "where the node credential is kept (default: $XDG_DATA_HOME/localai-cluster-worker)",
        ),
    )
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _advertise_host(bind_host: str) -> str:
    """The bind host, or for a wildcard bind the address of the interface that routes outwards."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP: picks a route, sends nothing
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The agent's configuration from flags, else environment variables, else defaults."""
    environ = os.environ if environ is None else environ
    parser = _Parser(
        prog=PROG, description="LocalAI Cluster worker agent: runs backends for the control plane."
    )
    for option in _OPTIONS.values():
        help_text = option.help if option.env is None else f"{option.help} [env {option.env}]"
        parser.add_argument(option.flag, default=None, help=help_text)
    args = vars(parser.parse_args(argv))

    def raw(dest: str) -> str | None:
        option = _OPTIONS[dest]
        value = args[dest]
        if value is None and option.env:
            value = environ.get(option.env)
        return option.default if value is None else value

    def value(dest: str, convert: Callable[[str], T]) -> T:
        text = raw(dest)
        if text is None:
            parser.error(f"{_OPTIONS[dest].name} is required")
        try:
            return convert(text)
        except ValueError as error:
            parser.error(f"{_OPTIONS[dest].name}: {error} (got {text!r})")

    def optional(dest: str, convert: Callable[[str], T]) -> T | None:
        return None if raw(dest) is None else value(dest, convert)

    bind_host, port = value("addr", parse_host_port)
    advertise_host, advertise_port = optional(
        "advertise_addr", lambda text: parse_host_port(text if ":" in text else f"{text}:{port}")
    ) or (_advertise_host(bind_host), port)
    slots = value("max_replicas_per_model", parse_positive_int)
    tls = _server_tls(parser, raw)
    return AgentConfig(
        register_to=value("register_to", parse_url),
        registration_token=value("registration_token", str),
        node_name=value("node_name", parse_node_name) if raw("node_name") else socket.gethostname(),
        node_type=value("node_type", parse_node_type),
        bind_host=bind_host,
        port=port,
        advertise_host=advertise_host,
        advertise_port=advertise_port,
        heartbeat_interval=optional("heartbeat_interval", parse_positive_duration),
        labels={**value("node_labels", parse_labels), REPLICA_SLOTS_LABEL: str(slots)},
        max_replicas_per_model=slots,
        vram=optional("vram", parse_size),
        backends=value("backends_config", load_backends),
        models_path=value("models_path", Path).resolve(),
        drain_timeout=value("drain_timeout", parse_duration),
        allowed_model_roots=value("allowed_model_roots", parse_paths),
        tls=tls,
        state_dir=(optional("state_dir", Path) or default_state_dir(environ)).expanduser().resolve(),
        models_cache_size=value("models_cache_size", parse_size),
        download_rate_limit=value("download_rate_limit", parse_rate),
    )


def _server_tls(parser: _Parser, raw: Callable[[str], str | None]) -> ServerTls | None:
    """The server's TLS material from `--tls-cert`, `--tls-key` and `--tls-client-ca`, checked; None if unset."""
    cert, key, client_ca = raw("tls_cert"), raw("tls_key"), raw("tls_client_ca")
    names = {dest: _OPTIONS[dest].name for dest in ("tls_cert", "tls_key", "tls_client_ca")}
    if not cert and not key:
        if client_ca:
            parser.error(f"{names['tls_client_ca']} needs {names['tls_cert']} and {names['tls_key']}")
        return None
    if not cert or not key:
        parser.error(f"{names['tls_cert']} and {names['tls_key']} go together")
    assert cert is not None and key is not None
    try:
        check_cert_and_key(cert, key)
        tls = ServerTls(_read_pem(cert), _read_pem(key))
    except ValueError as error:
        parser.error(f"{names['tls_cert']}, {names['tls_key']}: {error} (got {cert!r}, {key!r})")
    if not client_ca:
        return tls
    try:
        check_ca(client_ca)
        return ServerTls(tls.cert_chain, tls.private_key, _read_pem(client_ca))
    except ValueError as error:
        parser.error(f"{names['tls_client_ca']}: {error} (got {client_ca!r})")
