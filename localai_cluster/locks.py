"""Registry of PostgreSQL advisory-lock keys, and helpers to take them.

Every advisory lock the project takes is named here so two features can never collide on a key.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from django.db import connection

# Fixed keys for the singleton loops (first argument of the two-key form: a namespace).
NAMESPACE_LOOPS = 0x4C41  # "LA"
NAMESPACE_MODEL_LOAD = 0x4C42  # per-model load lock: second key derived from the model name
NAMESPACE_WEB_OWNER = (
    0x4C43  # held by each web process for its lifetime: second key derived from its owner id
)
RECONCILER = 1
HEALTH_MONITOR = 2


def model_key(model_name: str) -> int:
    """A stable signed 32-bit key for a model name."""
    return _key32(model_name)


def owner_key(owner: object) -> int:
    """A stable signed 32-bit key for a web process's owner id."""
    return _key32(str(owner))


def _key32(text: str) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def try_advisory_lock(namespace: int, key: int) -> bool:
    """Take a session-level advisory lock without waiting; True when this connection now holds it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [namespace, key])
        return bool(cursor.fetchone()[0])


def advisory_unlock(namespace: int, key: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [namespace, key])


@contextlib.contextmanager
def singleton(namespace: int, key: int) -> Iterator[bool]:
    """`with singleton(NAMESPACE_LOOPS, RECONCILER) as acquired:` — acquired is False when another
    process holds the lock; the caller skips its work then."""
    acquired = try_advisory_lock(namespace, key)
    try:
        yield acquired
    finally:
        if acquired:
            advisory_unlock(namespace, key)
