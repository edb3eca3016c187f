"""Process keys `<model>#<index>` and how a stop, logs or is-running request resolves to them (BEHAVIOUR §7)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SEPARATOR = "#"


def process_key(model_name: str, replica_index: int) -> str:
    """The key of replica `replica_index` of `model_name`."""
    return f"{model_name}{SEPARATOR}{replica_index}"


def model_of(key: str) -> str:
    """The model name of a process key."""
    return key.rpartition(SEPARATOR)[0]


def matches(selector: str, key: str) -> bool:
    """Whether `selector` (an exact key, or a bare model name) designates `key`.

    A selector with `#` is exact; a bare model matches only its own replicas (`q` never matches `q3#0`).
    """
    return selector == key if SEPARATOR in selector else model_of(key) == selector


def resolve(selector: str, keys: Iterable[str]) -> list[str]:
    """The keys among `keys` that `selector` designates, sorted."""
    return sorted(key for key in keys if matches(selector, key))


def replica_digest(keys: Iterable[str]) -> str:
    """The digest of a replica set, shared by the agent and the control plane: SHA-256 (hex) of the distinct
    process keys sorted by code point and joined by newlines (the empty set included). A heartbeat carrying
    it lets the control plane skip the reconciliation when nothing changed (`nodes.services`)."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()
