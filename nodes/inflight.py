"""In-flight ownership: which web process holds which in-flight units.

Each web process claims in-flight units under an owner id, and holds a PostgreSQL advisory lock for that id on
a connection of its own for as long as it lives. A process that dies (kill -9, OOM, a lost host) loses the lock
with its connection, and the health monitor's `inflight_reclaim_dead_owners` then gives back exactly the units
it held, so a dead web process never leaves replicas looking busy forever.

If the owner's lock connection breaks while the process lives, the process takes a new owner id, and
re-publishes under it every unit it still holds (its live leases, which it keeps in memory): the old id's
claims are then reclaimed by the next health tick like a dead process's, and the leases are released under the
new id. So after a database switch (a failover: the new primary holds none of the old advisory locks, and the
hot path's asynchronous commit may have lost the last claims and releases before the crash) the counters are
rebuilt from what each live process actually holds, soon after its first claims on the new server and the
health tick after them (docs/reliability.md, "PostgreSQL failover"). The lock connection is checked (a round
trip) every OWNER_CHECK_INTERVAL, and at the next claim after the hot path saw a session of this process end
(`suspect`): a switch ends them all.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections import Counter
from typing import Any

import psycopg
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest

from localai_cluster import locks
from localai_cluster.dbhealth import idle_connection_suspect, statement_deadline
from nodes.models import InFlightClaim, ModelReplica
from nodes.services import replicas_locked

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


# Units moved to a new owner id in one statement: the replica's counter first, then the claim row (the claim's
# lock order). A replica removed meanwhile is skipped (its units went with its row).
_REPUBLISH_SQL = f"""
WITH live AS (
  SELECT * FROM unnest(%(replicas)s::bigint[], %(counts)s::integer[]) AS live(replica_id, count)
), bumped AS (
  UPDATE {ModelReplica._meta.db_table} AS r SET in_flight = r.in_flight + live.count
  FROM live WHERE r.id = live.replica_id
  RETURNING r.id, live.count
)
INSERT INTO {InFlightClaim._meta.db_table} (owner, replica_id, count)
SELECT %(owner)s, id, count FROM bumped
ON CONFLICT (owner, replica_id) DO UPDATE SET count = {InFlightClaim._meta.db_table}.count + EXCLUDED.count
"""

REPUBLISHING = object()  # `retire`'s answer while units are being moved to a new owner id


class ProcessOwner:
    """This process's owner id, backed by an advisory lock held on a dedicated connection, and the leases
    (objects with `replica_id`, `owner`, `released`) it holds under it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # the id and its connection (held across I/O)
        self._id: uuid.UUID | None = None
        self._conn: psycopg.Connection | None = None
        self._checked_at = 0.0
        self._suspect = False
        self._units_lock = threading.Lock()  # the leases (never held across I/O)
        # Weak: a lease dropped without its release (a bug) is not re-published for ever; its old claim is
        # reclaimed after a switch.
        self._leases: weakref.WeakSet[Any] = weakref.WeakSet()
        self._republishing = False
        self._settled = threading.Event()
        self._settled.set()

    def id(self) -> uuid.UUID:
        with self._mutex:
            now = time.monotonic()
            if self._id is None or (
                (now - self._checked_at > OWNER_CHECK_INTERVAL or self._suspect or self._connection_suspect())
                and not self._alive(now)
            ):
                self._take_new(now)
            assert self._id is not None
            return self._id

    def fresh_id(self) -> uuid.UUID | None:
        """The owner id when its lock connection was checked recently and nothing cast doubt on it since
        (no I/O), else None: call `id()`."""
        if (
            self._id is not None
            and not self._suspect
            and time.monotonic() - self._checked_at <= OWNER_CHECK_INTERVAL
        ):
            return self._id
        return None

    def suspect(self) -> None:
        """The hot path saw a database session of this process end (terminated, a restart, a failover): the
        next claim checks the lock connection instead of trusting it until OWNER_CHECK_INTERVAL."""
        self._suspect = True

    def _connection_suspect(self) -> bool:
        conn = self._conn
        return conn is None or idle_connection_suspect(conn)

    # --- the leases held -------------------------------------------------------------------------------------

    def hold(self, lease: Any) -> bool:
        """Records a lease just claimed. Answers False when it was claimed under an owner id this process has
        replaced since (the database switched while the claim ran): call `adopt(lease)` then."""
        with self._units_lock:
            self._leases.add(lease)
            return lease.owner == self._id

    def retire(self, lease: Any) -> Any:
        """Forgets a lease being released and answers the owner id to release its unit under; `REPUBLISHING`
        while units are being moved to a new owner id (`wait_settled`, then ask again)."""
        with self._units_lock:
            if self._republishing:
                return REPUBLISHING
            self._leases.discard(lease)
            return lease.owner

    def wait_settled(self, timeout: float) -> None:
        self._settled.wait(timeout)

    def held(self) -> Counter:
        """replica id -> units this process holds (tests, the failover drill)."""
        with self._units_lock:
            return Counter(lease.replica_id for lease in self._leases if not lease.released)

    def adopt(self, lease: Any) -> None:
        """Moves a lease claimed under a replaced owner id to the current one (its old id's claim is
        reclaimed by the health tick)."""
        with self._mutex:
            if self._id is None or self._conn is None:
                return  # the next `id()` takes a new id and moves every lease held, this one too
            try:
                self._republish(self._conn, self._id, [lease])
            except psycopg.Error as error:
                # The unit stays uncounted until its request ends (its old claim is reclaimed, its release
                # under the new id finds nothing): never counted twice.
                logger.warning("could not move an in-flight unit to the new owner id: %s", error)
                self._suspect = True

    def _republish(self, conn: psycopg.Connection, owner: uuid.UUID, leases: list[Any] | None) -> None:
        """Moves `leases` (None: every lease held) that are still held to `owner`, in memory and in the
        database; releases wait meanwhile (`retire`)."""
        with self._units_lock:
            moving = [
                lease
                for lease in (list(self._leases) if leases is None else leases)
                if lease in self._leases and not lease.released and lease.owner != owner
            ]
            if not moving:
                return
            for lease in moving:
                lease.owner = owner
            self._republishing = True
            self._settled.clear()
        try:
            counts = Counter(lease.replica_id for lease in moving)
            with statement_deadline(conn, _deadline()):
                conn.execute(
                    _REPUBLISH_SQL,
                    {"owner": owner, "replicas": list(counts), "counts": list(counts.values())},
                )
            logger.warning(
                "re-published %d in-flight unit(s) this process holds under its new owner id %s",
                len(moving),
                owner,
            )
        finally:
            with self._units_lock:
                self._republishing = False
                self._settled.set()

    def _alive(self, now: float) -> bool:
        try:
            assert self._conn is not None
            with statement_deadline(self._conn, _deadline()):
                self._conn.execute("SELECT 1")
        except (psycopg.Error, AssertionError):
            logger.warning("the in-flight owner lock connection broke: taking a new owner id")
            return False
        self._checked_at, self._suspect = now, False
        return True

    def _take_new(self, now: float) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._id, self._conn = None, None
        owner = uuid.uuid4()
        conn = psycopg.connect(**plain_connection_params(), autocommit=True)
        try:
            with statement_deadline(conn, _deadline()):
                conn.execute(
                    "SELECT pg_advisory_lock(%s, %s)", [locks.NAMESPACE_WEB_OWNER, locks.owner_key(owner)]
                )
            # Every unit still held moves to the new id before any claim runs under it.
            self._republish(conn, owner, None)
        except psycopg.Error:
            conn.close()
            raise
        self._id, self._conn, self._checked_at, self._suspect = owner, conn, now, False

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
                # The replica rows first, then the claim rows: the router's lock order, so a late release
                # under this owner id (a process that moved to a new one) cannot deadlock with the reclaim.
                held = InFlightClaim.objects.filter(owner=owner, count__gt=0).values("replica_id")
                replicas_locked(ModelReplica.objects.filter(pk__in=held))
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
