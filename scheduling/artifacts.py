"""A catalog model's `files` (issue 15): validation, `cp://` files under `LOCALAI_ARTIFACTS_PATH`, the scan
that fills their sha256 and size, and the prefetch that asks nodes to stage them.

Each entry is `{"uri", "sha256", "size", "path"}`:

- `uri`: `https://…`, `http://…` or `cp://NAME` (NAME a relative path under `LOCALAI_ARTIFACTS_PATH`, served by
  the control plane to agents only, `GET /api/node/{id}/artifacts/NAME` with the node token);
- `sha256`: 64 hex digits (lower case), required for `http(s)` files; `size`: bytes, 0 when unknown (the
  agent then takes the server's `Content-Length` before downloading). A `cp://` file may leave both empty until
  `POST /api/models/{name}/files/scan` fills them (an agent refuses to stage a file without a sha256);
- `path`: where the file lands under the agent's models path: relative, no `..`, no part starting with `.`
  (the agent's partial downloads and its manifest are dot files), unique within the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

MAX_FILES = 256
MAX_URI = 2048
MAX_PATH = 1024
MAX_SIZE = 2**63 - 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"uri", "sha256", "size", "path"})
CP_SCHEME = "cp://"


class FilesInvalid(ValueError):
    """`files` is not a valid list of entries; the message names the entry and the problem."""


def _relative(value: Any, what: str, *, dots: bool = False) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATH:
        raise FilesInvalid(f"{what} must be a non-empty string of at most {MAX_PATH} characters")
    if "\\" in value or "\x00" in value or PurePosixPath(value).is_absolute():
        raise FilesInvalid(f"{what} {value!r} must be a relative path")
    parts = value.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise FilesInvalid(f"{what} {value!r} must not contain '..', '.' or empty parts")
    if not dots and any(part.startswith(".") for part in parts):
        raise FilesInvalid(f"{what} {value!r}: no part may start with '.'")
    return value


def files_clean(value: Any) -> list[dict[str, Any]]:
    """The validated, normalised `files` list; raises `FilesInvalid`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise FilesInvalid("files must be a list of {uri, sha256, size, path}")
    if len(value) > MAX_FILES:
        raise FilesInvalid(f"at most {MAX_FILES} files")
    cleaned: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, entry in enumerate(value):
        where = f"files[{index}]"
        if not isinstance(entry, dict):
            raise FilesInvalid(f"{where} must be an object with uri, sha256, size, path")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise FilesInvalid(f"{where}: unknown field(s) {', '.join(unknown)}")
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri or len(uri) > MAX_URI or any(c.isspace() for c in uri):
            raise FilesInvalid(f"{where}.uri must be a URI of at most {MAX_URI} characters, without spaces")
        is_cp = uri.startswith(CP_SCHEME)
        if is_cp:
            _relative(uri[len(CP_SCHEME) :], f"{where}.uri's NAME")
        elif not re.match(r"^https?://[^/?#]+", uri):
            raise FilesInvalid(f"{where}.uri must start with https://, http:// or cp://")
        sha256 = entry.get("sha256") or ""
        if not isinstance(sha256, str) or (sha256 and not _SHA256.match(sha256.lower())):
            raise FilesInvalid(f"{where}.sha256 must be 64 hexadecimal digits")
        size = entry.get("size") or 0
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
            raise FilesInvalid(f"{where}.size must be a whole number of bytes, at least 0")
        if not is_cp and not sha256:
            raise FilesInvalid(f"{where}: an http(s) file needs its sha256")
        path = _relative(entry.get("path"), f"{where}.path")
        if path in seen:
            raise FilesInvalid(f"{where}.path {path!r} is given twice")
        seen.add(path)
        cleaned.append({"uri": uri, "sha256": sha256.lower(), "size": size, "path": path})
    return cleaned


# --- cp:// files ------------------------------------------------------------------------------------------


def artifacts_root() -> Path:
    return Path(os.path.realpath(settings.LOCALAI_ARTIFACTS_PATH))


def artifact_path(name: str) -> Path | None:
    """The file `cp://name` designates under `LOCALAI_ARTIFACTS_PATH` (symlinks followed, contained), or None
    when the name is invalid, escapes the directory or names no regular file."""
    try:
        _relative(name, "name", dots=False)
    except FilesInvalid:
        return None
    root = artifacts_root()
    real = Path(os.path.realpath(root / name))
    if root not in real.parents or not real.is_file():
        return None
    return real


def file_digest(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as source:
        while block := source.read(1024 * 1024):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def files_scan(files: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """`files` with `sha256` and `size` of every `cp://` entry computed from the file under
    `LOCALAI_ARTIFACTS_PATH`; also answers the names that could not be found (left unchanged)."""
    scanned: list[dict[str, Any]] = []
    missing: list[str] = []
    for entry in files:
        uri = str(entry.get("uri", ""))
        if uri.startswith(CP_SCHEME):
            path = artifact_path(uri[len(CP_SCHEME) :])
            if path is None:
                missing.append(uri)
            else:
                sha256, size = file_digest(path)
                entry = {**entry, "sha256": sha256, "size": size}
        scanned.append(entry)
    return scanned, missing
