"""The agent's state directory (`--state-dir`): the node credential that proves, at every registration, that
this agent is the one that registered its node name first — across restarts, even after `kill -9`.

`<state dir>/node-credential.json` holds `{"node_name": ..., "credential": ...}`, mode 0600, written atomically
(a temporary file renamed over it) before the first registration, so the control plane never records a
credential the agent could lose. Only its SHA-256 is kept by the control plane. Started under another
`--node-name`, the agent makes a new credential for that name (the old name is then the admin's to delete).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

CREDENTIAL_FILE = "node-credential.json"
CREDENTIAL_BYTES = 32


class StateError(Exception):
    """The state directory or its credential file cannot be used; the agent does not start."""


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """`$XDG_DATA_HOME/localai-cluster-worker`, i.e. `~/.local/share/localai-cluster-worker` by default."""
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "localai-cluster-worker"


def _read(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateError(f"cannot read {path}: {error}") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise StateError(f"{path} is not valid JSON; restore it or delete the node and the file") from None
    if not (
        isinstance(document, dict)
        and isinstance(document.get("node_name"), str)
        and isinstance(document.get("credential"), str)
        and document["credential"]
    ):
        raise StateError(
            f"{path} has no node_name and credential; restore it or delete the node and the file"
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("%s is readable by others; making it 0600", path)
        path.chmod(0o600)
    return document


def _write(path: Path, document: dict[str, str]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(document, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def node_credential(state_dir: Path, node_name: str) -> str:
    """This node name's credential from the state file, created (0600, in a 0700 directory) when there is none
    or it belongs to another name. Raises `StateError` when the directory or file cannot be used."""
    path = state_dir / CREDENTIAL_FILE
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise StateError(f"cannot create the state directory {state_dir}: {error}") from None
    document = _read(path)
    if document is not None and document["node_name"] == node_name:
        return document["credential"]
    if document is not None:
        log.warning(
            "%s holds the credential of node %r; making a new one for %r",
            path,
            document["node_name"],
            node_name,
        )
    credential = secrets.token_urlsafe(CREDENTIAL_BYTES)
    try:
        _write(path, {"node_name": node_name, "credential": credential})
    except OSError as error:
        raise StateError(f"cannot write {path}: {error}") from None
    log.info("new node credential for %r kept in %s", node_name, path)
    return credential
