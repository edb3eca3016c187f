"""In-flight ownership: which web process holds which in-flight units.

Each web process claims in-flight units under an owner id, and holds a PostgreSQL advisory lock for that id on
a connection of its own for as long as it lives. A process that dies (kill -9, OOM, a lost host) loses the lock
with its connection, and the health monitor's `inflight_reclaim_dead_owners` then gives back exactly the units
it held, so a dead web process never leaves replicas looking busy forever.

If the owner's lock connection breaks while the process lives, the process takes a new owner id: its older
units are reclaimed early (the replica looks less busy than it is until those requests end), and their later
releases find no claim and change nothing, so nothing is ever given back twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import psycopg
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest

from localai_cluster import locks
from localai_cluster.dbhealth import statement_deadline
from nodes.models import InFlightClaim, ModelReplica

logger = logging.getLogger(__name__)

# How often a process checks that its owner lock connection still stands (on the claim path, at most).
OWNER_CHECK_INTERVAL = 15.0


def plain_connection_params() -> dict[str, Any]:
    """psycopg connection parameters of the default database, for a session outside Django's pool."""
    params = dict(connection.get_connection_params())
    for django_only in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(django_only, None)
    return params


def _deadline() -> float:
    """How long the owner's lock session may wait for the database (a frozen one must not hold the claim path,
    which waits for the owner id, past the gateway's own bound)."""
    from django.conf import settings

    return float(settings.LOCALAI_DB_POOL_TIMEOUT)


class ProcessOwner:
    """This process's owner id, backed by an advisory lock held on a dedicated connection."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._id: uuid.UUID | None = None
        self._conn: psycopg.Connection | None = None
        self._checked_at = 0.0

    def id(self) -> uuid.UUID:
        with self._mutex:
            now = time.monotonic()
            if self._id is None or (now - self._checked_at > OWNER_CHECK_INTERVAL and not self._alive(now)):
                self._take_new(now)
            assert self._id is not None
            return self._id

    def fresh_id(self) -> uuid.UUID | None:
        """The owner id when its lock connection was checked recently (no I/O), else None: call `id()`."""
        if self._id is not None and time.monotonic() - self._checked_at <= OWNER_CHECK_INTERVAL:
            return self._id
        return None

    def _alive(self, now: float) -> bool:
        try:
            assert self._conn is not None
            with statement_deadline(self._conn, _deadline()):
                self._conn.execute("SELECT 1")
        except (psycopg.Error, AssertionError):
            logger.warning("the in-flight owner lock connection broke: taking a new owner id")
            return False
        self._checked_at = now
        return True

    def _take_new(self, now: float) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        owner = uuid.uuid4()
        conn = psycopg.connect(**plain_connection_params(), autocommit=True)
        try:
            with statement_deadline(conn, _deadline()):
                conn.execute(
                    "SELECT pg_advisory_lock(%s, %s)", [locks.NAMESPACE_WEB_OWNER, locks.owner_key(owner)]
                )
        except psycopg.Error:
            conn.close()
            raise
        self._id, self._conn, self._checked_at = owner, conn, now

    def close(self) -> None:
        """Gives the lock up (tests; a process exiting loses it anyway)."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
            self._id, self._conn = None, None


PROCESS_OWNER = ProcessOwner()


def inflight_reclaim_dead_owners() -> dict[str, int]:
    """Gives back the in-flight units of every owner whose process is gone (its advisory lock is free), and
    forgets those owners. Answers {owner: units given back}. Live owners (this process's too: its lock is on
    another session) are left alone."""
    reclaimed: dict[str, int] = {}
    for owner in InFlightClaim.objects.values_list("owner", flat=True).distinct():
        key = locks.owner_key(owner)
        if not locks.try_advisory_lock(locks.NAMESPACE_WEB_OWNER, key):
            continue  # its process still holds the lock
        try:
            with transaction.atomic():
                claims = list(
                    InFlightClaim.objects.select_for_update()
                    .filter(owner=owner, count__gt=0)
                    .values_list("replica_id", "count")
                )
                for replica_id, count in claims:
                    ModelReplica.objects.filter(pk=replica_id).update(
                        in_flight=Greatest(F("in_flight") - count, 0)
                    )
                InFlightClaim.objects.filter(owner=owner).delete()
        finally:
            locks.advisory_unlock(locks.NAMESPACE_WEB_OWNER, key)
        units = sum(count for _, count in claims)
        reclaimed[str(owner)] = units
        if units:
            logger.warning(
                "gave back %d in-flight unit(s) held by a web process that is gone (%s)", units, owner
            )
    return reclaimed
