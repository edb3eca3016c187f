"""The router: pick a loaded replica for a request and claim it, or place one under the per-model load lock
(BEHAVIOUR §3).

Sync functions do the database work; the async API (`acquire`, `Lease.release`, `discard_unreachable`) runs
them on small thread pools so the event loop never blocks and the hot path costs one thread hop to claim and
one to release. Every request is routed anew: nothing is remembered per process except which cold loads this
process is already waiting for (and the backend tokens of the nodes' current salts, `nodes.tokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psycopg
from django.conf import settings
from django.db import DatabaseError, connection

from localai_cluster import locks
from localai_cluster.dbhealth import idle_connection_suspect
from nodes.apikeys import GATEWAY_AUTH_SELECT, gateway_key_hash, gateway_key_used
from nodes.inflight import PROCESS_OWNER, REPUBLISHING
from nodes.models import InFlightClaim, ModelReplica, Node, process_key
from nodes.tokens import backend_token
from scheduling.models import ModelConfig
from scheduling.pipeline import routable_replica_sql
from scheduling.placement import NoCapacity, UnknownModel
from scheduling.routing import PREFIX_CACHE, SESSION, Preference, remember_policy

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Polling of the per-model load lock by a process that does not hold it. Between two polls it listens for the
# holder's word that the load is done (`MODEL_LOADED_CHANNEL`), so it usually wakes at once; the polls are the
# fallback when no word comes (the listening session failed, or the model was made routable another way).
LOCK_POLL_START = 0.02
LOCK_POLL_MAX = 0.25
# PostgreSQL NOTIFY channel: the payload is the name of a model the load-lock holder just loaded.
MODEL_LOADED_CHANNEL = "localai_model_loaded"
# How long `discard_unreachable` waits for the agent to stop the unreachable replica's process.
STOP_WAIT = 5.0

# Database work of the hot path (claim, release) and of the cold path (placement: waits on a lock and on
# LoadReplica) run on separate pools, so slow loads never starve routing of threads.
# Hot-path threads keep their pooled connection between hops (handing it back and taking it again costs
# about 0.4 ms a hop), so this pool stays well below the database pool's size (LOCALAI_DB_POOL_SIZE, 20).
_hot_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="router-db")
_load_executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="router-load")


# Which replicas may serve a request: `scheduling.pipeline` owns the definition (states, selector matching).
def _routable(replica: str, node: str) -> str:
    return f"""
FROM {ModelReplica._meta.db_table} {replica}
JOIN {Node._meta.db_table} {node} ON {node}.id = {replica}.node_id
WHERE {replica}.model_name = %(model)s
  AND NOT ({replica}.id = ANY(%(exclude)s))
  AND {routable_replica_sql(replica, node, "%(model)s")}
"""


_ROUTABLE = _routable("r", "n")

# The model's routing policy (scheduling.routing): its catalog entry's, else LOCALAI_ROUTING_POLICY.
_ROUTE_CTE = f"""
route AS (
  SELECT COALESCE(
    (SELECT m.routing FROM {ModelConfig._meta.db_table} m WHERE m.name = %(model)s), %(default_policy)s
  ) AS policy
)"""

# Pick and claim in one statement (one round trip, one commit). The order of the candidates, by the model's
# policy (scheduling.routing):
# - prefix_cache: the replicas of `prefer` (the gateway's lookup in the prefix index, longest matched prefix
#   first) whose in-flight is at most the least-loaded routable replica's + `threshold`, in that order;
# - session: the highest `md5(session key:replica id)` (rendezvous hashing);
# - then, and for least_in_flight, fewest in-flight; among equally loaded replicas, for prefix_cache, the
#   highest `md5(home:replica id)` (the prompt's home: rendezvous hashing of its first block); then most
#   effective free VRAM on its node, then least recently used.
# The best one gets `in_flight + 1`. `FOR UPDATE` makes a claim that raced another change wait for it and
# re-check the row: a replica that left `loaded` (or whose node stopped being routable) meanwhile is passed over
# for the next candidate, never claimed.
_CLAIM_ORDER = f"""
      ORDER BY
        CASE WHEN cardinality(%(prefer)s::bigint[]) > 0
                  AND (SELECT policy FROM route) = '{PREFIX_CACHE}'
                  AND r.in_flight <= (SELECT min(r2.in_flight) {_routable("r2", "n2")}) + %(threshold)s
             THEN array_position(%(prefer)s::bigint[], r.id) END ASC NULLS LAST,
        CASE WHEN %(session)s <> '' AND (SELECT policy FROM route) = '{SESSION}'
             THEN md5(%(session)s || ':' || r.id::text) END DESC NULLS LAST,
        r.in_flight,
        CASE WHEN %(home)s <> '' AND (SELECT policy FROM route) = '{PREFIX_CACHE}'
             THEN md5(%(home)s || ':' || r.id::text) END DESC NULLS LAST,
        (n.available_vram - n.reserved_vram) DESC, r.last_used ASC NULLS FIRST, r.id
"""

_CLAIMED_CTE = f"""
{_ROUTE_CTE}, claimed AS (
  UPDATE {ModelReplica._meta.db_table} AS claimed
  SET in_flight = claimed.in_flight + 1, last_used = now()
  FROM {Node._meta.db_table} AS node
  WHERE claimed.id = (
      SELECT r.id {_ROUTABLE}{_CLAIM_ORDER}      LIMIT 1
      FOR UPDATE OF r
    )
    AND node.id = claimed.node_id
    /*guard*/
  RETURNING claimed.id, claimed.replica_index, claimed.address, node.id AS node_id, node.name, node.address AS node_address,
            node.token_salt AS node_token_salt
), recorded AS (
  INSERT INTO {InFlightClaim._meta.db_table} (owner, replica_id, count)
  SELECT %(owner)s, id, 1 FROM claimed
  ON CONFLICT (owner, replica_id) DO UPDATE SET count = {InFlightClaim._meta.db_table}.count + 1
)"""

# Always one row: the model's policy, and the claimed replica or NULLs.
_CLAIM_SQL = f"""
WITH {_CLAIMED_CTE}
SELECT route.policy, claimed.id, claimed.replica_index, claimed.address, claimed.node_id, claimed.name,
       claimed.node_address, claimed.node_token_salt
FROM route LEFT JOIN claimed ON true
"""

# The gateway's key check and the claim in one round trip: nothing is claimed unless the key rule allows the
# request; the answer is always one row (the check's outcome, the model's policy, and the claimed replica or
# NULLs).
_AUTHORIZED_CLAIM_SQL = f"""
WITH auth AS ({GATEWAY_AUTH_SELECT}), {_CLAIMED_CTE.replace("/*guard*/", "AND (SELECT allowed FROM auth)")}
SELECT auth.allowed, auth.key_id, auth.key_last_used_at, (SELECT policy FROM route),
       claimed.id, claimed.replica_index, claimed.address, claimed.node_id, claimed.name, claimed.node_address,
       claimed.node_token_salt
FROM auth LEFT JOIN claimed ON true
"""

# Claims batched per event loop (`_Claims`): `%(units)s` units of one model for requests with no routing
# preference queued together (one turn of the loop, or the time the model's previous statement was out), in
# one statement. Every routable replica of the model is locked (in id
# order: a batch never waits on another in a cycle, nor on a release batch), then the units are dealt by
# water-filling — each unit to the replica least loaded once the units dealt before it are counted, ties broken
# as a single claim breaks them — so a batch places its units as that many single claims in a row would.
_BATCH_CLAIMED_CTE = f"""
{_ROUTE_CTE}, candidates AS (
  SELECT r.id, r.in_flight, n.available_vram - n.reserved_vram AS free, r.last_used
  {_ROUTABLE}
  /*guard*/
  ORDER BY r.id
  FOR UPDATE OF r
), dealt AS (
  SELECT c.id FROM candidates c CROSS JOIN generate_series(0, %(units)s - 1) AS unit(k)
  ORDER BY c.in_flight + unit.k, c.free DESC, c.last_used ASC NULLS FIRST, c.id
  LIMIT %(units)s
), claimed AS (
  UPDATE {ModelReplica._meta.db_table} AS claimed
  SET in_flight = claimed.in_flight + given.units, last_used = now()
  FROM (SELECT id, count(*)::integer AS units FROM dealt GROUP BY id) AS given, {Node._meta.db_table} AS node
  WHERE claimed.id = given.id AND node.id = claimed.node_id
  RETURNING claimed.id, given.units, claimed.replica_index, claimed.address, node.id AS node_id, node.name,
            node.address AS node_address, node.token_salt AS node_token_salt
), recorded AS (
  INSERT INTO {InFlightClaim._meta.db_table} (owner, replica_id, count)
  SELECT %(owner)s, id, units FROM claimed
  ON CONFLICT (owner, replica_id) DO UPDATE SET count = {InFlightClaim._meta.db_table}.count + EXCLUDED.count
)"""

# One row per replica given units, or one row of NULLs: the model's policy, the replica and its units.
_BATCH_CLAIM_SQL = f"""
WITH {_BATCH_CLAIMED_CTE.replace("/*guard*/", "")}
SELECT route.policy, claimed.id, claimed.units, claimed.replica_index, claimed.address, claimed.node_id,
       claimed.name, claimed.node_address, claimed.node_token_salt
FROM route LEFT JOIN claimed ON true
"""

# With the gateway's key check: nothing is claimed unless the key rule allows the batch's requests (which all
# carry the same bearer value).
_AUTHORIZED_BATCH_CLAIM_SQL = f"""
WITH auth AS ({GATEWAY_AUTH_SELECT}), {_BATCH_CLAIMED_CTE.replace("/*guard*/", "AND (SELECT allowed FROM auth)")}
SELECT auth.allowed, auth.key_id, auth.key_last_used_at, (SELECT policy FROM route),
       claimed.id, claimed.units, claimed.replica_index, claimed.address, claimed.node_id, claimed.name,
       claimed.node_address, claimed.node_token_salt
FROM auth LEFT JOIN claimed ON true
"""

# The most units one batched statement claims (more queued requests go in further statements, sent together).
MAX_BATCH_UNITS = 64

_ROUTABLE_EXISTS_SQL = f"SELECT EXISTS (SELECT 1 {_ROUTABLE})"


NO_AUTH = object()  # `aclaim` without the gateway's key check


class Unauthorized(Exception):
    """The gateway's key rule refused the request (no valid key while keys exist)."""


@dataclass(eq=False)  # each lease is one unit: compared and hashed by identity (the process owner's set)
class Lease:
    """One in-flight unit claimed on a loaded replica. Release it exactly once (`release`), or drop the
    replica when its backend could not be reached (`discard_unreachable`)."""

    replica_id: int
    model_name: str
    replica_index: int
    address: str
    node_id: Any
    node_name: str
    node_address: str
    backend_token: str
    owner: Any = None  # the owner id the unit was recorded under (nodes.inflight)
    policy: str = "least_in_flight"  # the model's routing policy when it was claimed (scheduling.routing)
    released: bool = field(default=False, repr=False)

    @property
    def process_key(self) -> str:
        return process_key(self.model_name, self.replica_index)

    async def release(self) -> None:
        """Gives the in-flight unit back and waits for it; later calls do nothing. Never raises: the release
        runs in a task of its own that a cancelled caller does not interrupt (and that retries a failed
        statement, see `_give_back`)."""
        if self.released:
            return
        self.released = True
        await asyncio.shield(_in_background(_give_back_lease(self)))

    def release_soon(self) -> None:
        """Gives the in-flight unit back without waiting for it (the answer is complete and need not wait
        for the counter); later calls, and `release`, do nothing."""
        if self.released:
            return
        self.released = True
        _in_background(_give_back_lease(self))


# --- sync: database work -----------------------------------------------------------------------------------


def replica_release(replica_id: int, owner: Any) -> None:
    """Gives back one in-flight unit that `owner` holds on the replica (never below 0; nothing when the
    unit was already reclaimed)."""
    with connection.cursor() as cursor:
        cursor.execute(_RELEASE_SQL, {"owner": owner, "replica": replica_id})


def model_has_routable_replica(*, model_name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(_ROUTABLE_EXISTS_SQL, {"model": model_name, "exclude": []})
        return bool(cursor.fetchone()[0])


def replica_ensure_loaded(*, model_name: str, timeout: float, download_timeout: float = 0.0) -> None:
    """Makes sure `model_name` has a routable replica: takes the per-model load lock shared by every web
    process (a PostgreSQL advisory lock, polled so the wait is bounded by `timeout`, plus `download_timeout`
    for a catalog model with `files` to stage), re-checks, and places one when there is still none. Raises `UnknownModel`, `NoCapacity` or `LoadFailed` from placement, or
    `NoCapacity` when the wait for another process's load times out."""
    from scheduling.models import ModelConfig
    from scheduling.services import replica_place

    key = locks.model_key(model_name)
    if download_timeout and ModelConfig.objects.filter(name=model_name).exclude(files=[]).exists():
        timeout += download_timeout
    deadline = time.monotonic() + timeout
    delay = LOCK_POLL_START
    with _LoadedWatch() as watch:
        while True:
            if model_has_routable_replica(model_name=model_name):
                return
            if locks.try_advisory_lock(locks.NAMESPACE_MODEL_LOAD, key):
                try:
                    if model_has_routable_replica(model_name=model_name):
                        return
                    try:
                        replica_place(model_name=model_name)
                    except UnknownModel:
                        if ModelReplica.objects.filter(model_name=model_name).exists():
                            raise NoCapacity(
                                f"no replica of {model_name} is available, and it is not in the catalog to "
                                "load another"
                            ) from None
                        raise
                    _announce_loaded(model_name)
                    return
                finally:
                    locks.advisory_unlock(locks.NAMESPACE_MODEL_LOAD, key)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoCapacity(f"timed out after {timeout:g}s waiting for {model_name} to load")
            watch.wait(min(delay, remaining))
            delay = min(delay * 1.5, LOCK_POLL_MAX)


def _announce_loaded(model_name: str) -> None:
    """Tells the other web processes waiting for `model_name` that the load they wait for is done (they then
    re-check at once instead of at their next poll). A failure only costs them that poll: logged."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [MODEL_LOADED_CHANNEL, model_name])
    except DatabaseError as error:
        logger.warning("could not announce that %s is loaded: %s", model_name, error)


class _LoadedWatch:
    """A waiter's wake-up on `MODEL_LOADED_CHANNEL`: its own session, opened on the first wait (so a process
    that takes the load lock at once never opens it), listening from then on. The first wait returns as soon as
    the session listens, so the caller re-checks after that: a load finished before it listened is seen by that
    check, one finished after wakes the next wait. Any notification wakes it (the caller re-checks its model).
    When the session cannot be opened or fails, `wait` sleeps instead."""

    def __init__(self) -> None:
        self._conn: psycopg.Connection | None = None
        self._failed = False

    def __enter__(self) -> _LoadedWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            self._conn.close()

    def wait(self, seconds: float) -> None:
        if self._failed:
            time.sleep(seconds)
            return
        try:
            if self._conn is None:
                from nodes.inflight import plain_connection_params

                # Django's connection options bound the attempt (LOCALAI_DB_CONNECT_TIMEOUT).
                self._conn = psycopg.connect(**plain_connection_params(), autocommit=True)
                self._conn.execute(f"LISTEN {MODEL_LOADED_CHANNEL}")
                return
            for _notification in self._conn.notifies(timeout=seconds, stop_after=1):
                return
        except psycopg.Error as error:
            logger.info("waiting for a load without its wake-up (%s): polling instead", error)
            self._failed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            time.sleep(seconds)


# --- the hot path on native async connections ---------------------------------------------------------------
# Claim, release and the gateway's key check run on psycopg's async connections, on the event loop: no thread
# hop and no GIL hand-off per request. One pool per event loop (a pool belongs to its loop); `close_hot_pools`
# runs at ASGI lifespan shutdown.
#
# Database faults on this path (docs/reliability.md): a connection that died while pooled (its session was
# terminated, the server restarted) is dropped and replaced as it is taken from the pool, before any statement
# is sent on it (`_on_hot_connection`), so the statement runs on a live connection instead of failing. A
# statement that failed after it was sent is never run again: its outcome is unknown, and a claim is not
# idempotent (run twice after a commit whose answer was lost, it would hold a second unit nobody releases). Every hot operation is bounded by
# `LOCALAI_DB_POOL_TIMEOUT` (`_bounded`): a frozen database gives `DatabaseTimeout` (the gateway's 503), not a
# hang.


class DatabaseTimeout(psycopg.OperationalError):
    """A hot-path database operation did not finish within `LOCALAI_DB_POOL_TIMEOUT` (the database is frozen,
    overloaded or unreachable). It goes on in the background until the database answers or the connection
    fails."""


HOT_POOL_SIZE = 10
# One pool per event loop, created once: concurrent first requests all wait for the same opening.
# Keyed by the loop itself, never by `id(loop)`: a closed loop's id is reused by a later loop (tests run one loop
# per test), which would then be handed the dead loop's pool.
_hot_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = weakref.WeakKeyDictionary()


async def hot_pool() -> Any:
    """This event loop's pool of autocommit connections to the default database."""
    loop = asyncio.get_running_loop()
    opening = _hot_pools.get(loop)
    if opening is None:
        opening = _hot_pools[loop] = loop.create_task(_open_hot_pool())
        # A pool that could not open (the database is down) is forgotten, so a later request tries again.
        opening.add_done_callback(
            lambda task: _hot_pools.pop(loop, None) if task.cancelled() or task.exception() else None
        )
    elif opening.done() and not opening.cancelled() and opening.exception() is None:
        return opening.result()  # the usual case: no future to shield it with
    return await asyncio.shield(opening)


async def _open_hot_pool() -> Any:
    from psycopg_pool import AsyncConnectionPool

    from nodes.inflight import plain_connection_params

    params = await asyncio.to_thread(plain_connection_params)
    # Asynchronous commit on these connections only: they write in-flight counters and their claim rows,
    # always together in one transaction, so a database crash can lose the last few of them but never
    # split them; the owners' claims are reclaimed after such a crash anyway (nodes.inflight).
    # The server cancels a hot statement after LOCALAI_DB_POOL_TIMEOUT (a lock wait, an overloaded server);
    # `_bounded` stops waiting then even when the server cannot say so (frozen).
    # Prepared statements run on their generic plan: left to choose, PostgreSQL re-planned the claim at every
    # request for a model routed by least_in_flight (its per-request plan drops the prefix branch, so it always
    # looked cheaper than the generic one), about 0.45 ms of planning per request.
    timeout = float(settings.LOCALAI_DB_POOL_TIMEOUT)
    options = (
        f"{params.pop('options', '')} -c synchronous_commit=off -c statement_timeout={int(timeout * 1000)}"
        " -c plan_cache_mode=force_generic_plan"
    )
    pool = AsyncConnectionPool(
        kwargs={**params, "autocommit": True, "options": options.strip()},
        min_size=1,
        max_size=HOT_POOL_SIZE,
        open=False,
        timeout=timeout,
        reconnect_timeout=float(settings.DB_POOL_RECONNECT_TIMEOUT),
        name="router-hot",
    )
    await pool.open()
    return pool


async def _dead_on_arrival(conn: Any) -> bool:
    """Whether a connection just taken from the pool is dead: closed, or its session ended while it was idle.
    Costs a poll of the socket; a round trip only when the server sent something meanwhile. A dead one is
    closed (the pool then opens a replacement when it is put back)."""
    if not idle_connection_suspect(conn):
        return False
    if not conn.closed:
        try:
            await conn.execute("")  # raises on a session the server ended; consumes a harmless notice
            return False
        except psycopg.Error as error:
            logger.info("dropping a pooled connection whose session ended: %s", error)
            await conn.close()
    return True


async def _on_hot_connection(work: Callable[[Any], Awaitable[T]]) -> T:
    """`work(conn)` on a live connection of this event loop's hot pool. Connections that died while pooled
    are dropped one after the other, at once, until a live one (or a new one) comes: the pool's own `check`
    would wait 1, 2, 4… s between two dead connections."""
    pool = await hot_pool()
    while True:
        conn = await pool.getconn()
        if not await _dead_on_arrival(conn):
            break
        PROCESS_OWNER.suspect()  # the server ended a session of ours: maybe the owner's lock session too
        await pool.putconn(conn)
    try:
        async with conn:
            return await work(conn)
    except psycopg.OperationalError:
        PROCESS_OWNER.suspect()
        raise
    finally:
        await pool.putconn(conn)


def _timed_out() -> DatabaseTimeout:
    return DatabaseTimeout(f"the database did not answer within {float(settings.LOCALAI_DB_POOL_TIMEOUT):g}s")


async def _bounded(work: Coroutine[Any, Any, T], *, abandoned: Callable[[T], Any] | None = None) -> T:
    """Awaits `work` for at most `LOCALAI_DB_POOL_TIMEOUT`, then raises `DatabaseTimeout`. The work itself is
    never interrupted (cutting a statement that may already sit in the server's input would leave its outcome
    unknown): it goes on in the background, and when it ends with a result nobody awaits any more (the deadline
    passed, or the caller was cancelled) `abandoned(result)` undoes it (a claim gives its unit back)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), float(settings.LOCALAI_DB_POOL_TIMEOUT))
    except TimeoutError:
        _abandon(task, abandoned)
        raise _timed_out() from None
    except asyncio.CancelledError:
        _abandon(task, abandoned)
        raise


def _abandon(task: asyncio.Future[T], abandoned: Callable[[T], Any] | None) -> None:
    def finished(task: asyncio.Future[T]) -> None:
        _background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            if not isinstance(error, Unauthorized):
                logger.warning("a database operation the gateway stopped waiting for failed: %s", error)
        elif abandoned is not None:
            abandoned(task.result())

    _background.add(task)
    task.add_done_callback(finished)


def _release_abandoned(lease: Lease | None) -> None:
    """A claim that landed after its caller stopped waiting (deadline passed, or the client went away): its
    unit is given back at once."""
    if lease is not None:
        lease.release_soon()


async def database_ready() -> bool:
    """Whether a statement runs on this event loop's hot pool within `LOCALAI_DB_POOL_TIMEOUT` (`/readyz`)."""

    async def ping(conn: Any) -> None:
        await conn.execute("SELECT 1")

    try:
        await _bounded(_on_hot_connection(ping))
    except psycopg.Error as error:
        logger.warning("readiness: the database is unavailable: %s", error)
        return False
    return True


async def close_hot_pools() -> None:
    """Sends this event loop's queued releases, then closes its pool (ASGI lifespan shutdown)."""
    await releases_settled()
    opening = _hot_pools.pop(asyncio.get_running_loop(), None)
    if opening is not None and opening.done() and not opening.cancelled() and opening.exception() is None:
        await opening.result().close()


def run_in_background(work: Coroutine[Any, Any, Any]) -> None:
    """Runs `work` as a task kept alive until it ends (it must log its own failures)."""
    _in_background(work)


def _in_background(work: Any) -> asyncio.Task:
    """Runs `work` as a task that nothing cancels and that is kept alive until it ends."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


async def _owner() -> Any:
    owner = PROCESS_OWNER.fresh_id()
    return owner if owner is not None else await asyncio.to_thread(PROCESS_OWNER.id)


def _lease(model_name: str, row: tuple, owner: Any) -> Lease:
    policy, replica_id, index, address, node_id, node_name, node_address, node_token_salt = row
    lease = Lease(
        policy=policy,
        replica_id=replica_id,
        model_name=model_name,
        replica_index=index,
        address=address,
        node_id=node_id,
        node_name=node_name,
        node_address=node_address,
        backend_token=backend_token(node_id, node_token_salt),
        owner=owner,
    )
    if not PROCESS_OWNER.hold(lease):
        # Claimed under an owner id the process replaced meanwhile (the database switched): move it.
        _in_background(asyncio.to_thread(PROCESS_OWNER.adopt, lease))
    return lease


async def aclaim(
    model_name: str,
    *,
    exclude: Sequence[int] = (),
    raw_key: Any = NO_AUTH,
    preference: Preference | None = None,
) -> Lease | None:
    """Claims one in-flight unit on the best routable replica of `model_name` (`_CLAIM_SQL`: `loaded`, on a
    healthy, approved backend node matching the model's rule's selector now, as `scheduling.pipeline`
    defines it; ordered by the model's routing policy with `preference`, see `scheduling.routing`; then fewest
    in-flight, most effective free VRAM on its node, least recently used), recorded under this process's owner
    id in the same statement; None when there is none. The model's policy the statement read is remembered
    (`scheduling.routing.remember_policy`) and set on the lease. With `raw_key` (a bearer value or None), the
    gateway's key rule is checked in the same statement, and `Unauthorized` raised (nothing claimed) when it
    fails. Bounded by `LOCALAI_DB_POOL_TIMEOUT` (`DatabaseTimeout`).

    A claim with no routing preference and nothing excluded joins the claims of the same model and bearer value
    made in the same turn of the event loop, or while the group's previous statement was out, and they are
    claimed by one statement (`_Claims`).

    The claim runs in a task of its own that neither the deadline nor the caller's cancellation (a client that
    disconnects) interrupts: cancelling psycopg in the middle of the claim statement, or of the key's
    last-used stamp after it, would leave a committed claim that no lease holds; a claim that lands after its
    caller stopped waiting is given back at once."""
    prefer = preference or Preference.none()
    try:
        if not exclude and prefer.by_load_alone:
            return await _claimed(_claims().claim(model_name, raw_key))
        return await _bounded(_claim_one(model_name, exclude, raw_key, prefer), abandoned=_release_abandoned)
    except asyncio.CancelledError:
        logger.info(
            "the client of a request for %r went away while its replica was being claimed; a unit it "
            "claims is given back",
            model_name,
        )
        raise


async def _claimed(future: asyncio.Future[Lease | None]) -> Lease | None:
    """The lease a queued claim hands out. A caller cancelled after its lease was handed out, but before it
    could run again to take it, gives it back here (`_claim_for` gives back only the units of requests whose
    future was cancelled before the hand-out)."""
    try:
        return await future
    except asyncio.CancelledError:
        if future.done() and not future.cancelled() and future.exception() is None:
            _release_abandoned(future.result())
        raise


async def _claim_one(
    model_name: str, exclude: Sequence[int], raw_key: Any, prefer: Preference
) -> Lease | None:
    owner = await _owner()
    params = {
        "model": model_name,
        "exclude": list(exclude),
        "owner": owner,
        "default_policy": settings.LOCALAI_ROUTING_POLICY,
        "prefer": prefer.replicas,
        "threshold": int(settings.LOCALAI_PREFIX_BALANCE_THRESHOLD),
        "session": prefer.session,
        "home": prefer.home,
    }
    run = partial(_claimed_rows, model_name, raw_key, params, _CLAIM_SQL, _AUTHORIZED_CLAIM_SQL)
    policy, rows = await _on_hot_connection(run)
    return _lease(model_name, (policy, *rows[0]), owner) if rows else None


async def _claim_units(model_name: str, raw_key: Any, units: int) -> list[Lease]:
    """`units` units of `model_name` by one statement (`_BATCH_CLAIM_SQL`); none when nothing is routable."""
    owner = await _owner()
    params = {
        "model": model_name,
        "exclude": [],
        "owner": owner,
        "default_policy": settings.LOCALAI_ROUTING_POLICY,
        "units": units,
    }
    run = partial(_claimed_rows, model_name, raw_key, params, _BATCH_CLAIM_SQL, _AUTHORIZED_BATCH_CLAIM_SQL)
    policy, rows = await _on_hot_connection(run)
    leases = []
    for replica_id, count, *rest in rows:
        leases += [_lease(model_name, (policy, replica_id, *rest), owner) for _ in range(count)]
    return leases


async def _claimed_rows(
    model_name: str, raw_key: Any, params: dict[str, Any], sql: str, authorized_sql: str, conn: Any
) -> tuple[str, list[tuple]]:
    """Runs a claim statement — `sql`, or with `raw_key` (not `NO_AUTH`) `authorized_sql`, whose first columns
    are the key check's — and answers the model's policy and the claimed replicas' rows (the statement's row of
    NULLs, when nothing was claimed, left out). The policy is remembered (`remember_policy`); a refused key
    raises `Unauthorized` (the statement claimed nothing)."""
    if raw_key is NO_AUTH:
        rows = await (await conn.execute(sql, params)).fetchall()
        policy, claimed = rows[0][0], [row[1:] for row in rows]
        remember_policy(model_name, policy)
    else:
        rows = await (
            await conn.execute(authorized_sql, {**params, "hash": gateway_key_hash(raw_key)})
        ).fetchall()
        allowed, key_id, key_last_used_at, policy = rows[0][:4]
        if not allowed:
            raise Unauthorized()
        remember_policy(model_name, policy)
        await _stamp_after_claim(conn, key_id, key_last_used_at)
        claimed = [row[4:] for row in rows]
    return policy, [row for row in claimed if row[0] is not None]


async def _stamp_after_claim(conn: Any, key_id: int | None, key_last_used_at: Any) -> None:
    """The accepted key's last-used stamp, after its claim committed: a failure of the stamp (a row lock held
    past the statement timeout, a connection that broke) must not lose the claimed units, so it is logged, not
    raised."""
    if key_id is None:
        return
    try:
        await gateway_key_used(conn, key_id, key_last_used_at)
    except psycopg.Error as error:
        logger.warning("last-used stamp of API key %s failed: %s", key_id, error)


class _Claims:
    """Claims of one event loop, by (model, bearer value): each group is claimed by one statement — one unit
    alone by the single claim (`_CLAIM_SQL`), more by `_BATCH_CLAIM_SQL` — with at most one statement of a
    group in flight at a time. A claim whose group has none in flight waits for the next turn of the loop, so
    a lone claim (concurrency 1) costs what it did (one `call_soon` more); one made while its group's
    statement is in flight waits for that statement and goes with the next, together with every claim of the
    group queued meanwhile. Under load the requests share statements, round trips and the replica rows' locks,
    and the process's claims never queue on those locks behind one another.

    Every claim's wait is bounded by `LOCALAI_DB_POOL_TIMEOUT` from the moment it was queued (its statement's
    deadline counts from its batch's oldest claim). A statement still out at its deadline (the database froze)
    stops holding its group: the claims queued behind it go in a statement of their own."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Each queued group's claims, and when the oldest of them was queued (loop time).
        self._queued: dict[tuple[str, Any], tuple[float, list[asyncio.Future[Lease | None]]]] = {}
        self._scheduled = False
        # The groups with a statement in flight: a token for each, told apart from a later statement's.
        self._sending: dict[tuple[str, Any], object] = {}

    def claim(self, model_name: str, raw_key: Any) -> asyncio.Future[Lease | None]:
        """A future of the claimed lease (None when nothing is routable); cancelling it gives its unit back."""
        future: asyncio.Future[Lease | None] = self._loop.create_future()
        group = (model_name, raw_key)
        queued = self._queued.get(group)
        if queued is None:
            queued = self._queued[group] = (self._loop.time(), [])
        queued[1].append(future)
        if group not in self._sending:
            self._schedule()
        return future

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        for group in [group for group in self._queued if group not in self._sending]:
            since, queued = self._queued.pop(group)
            waiters = [waiter for waiter in queued if not waiter.done()]
            if waiters:  # none when every request of the group went away while it was queued
                self._start(group, waiters, since + float(settings.LOCALAI_DB_POOL_TIMEOUT))

    def _start(
        self, group: tuple[str, Any], waiters: list[asyncio.Future[Lease | None]], expires_at: float
    ) -> None:
        """Sends the group's statement(s) for `waiters`. At `expires_at` the requests still waiting get
        `DatabaseTimeout` while the statement goes on (a unit it claims for them later is given back), and the
        group is free to send its next claims."""
        model_name, raw_key = group
        token = self._sending[group] = object()
        tasks = [
            _in_background(_claim_for(model_name, raw_key, waiters[start : start + MAX_BATCH_UNITS]))
            for start in range(0, len(waiters), MAX_BATCH_UNITS)
        ]

        def overdue() -> None:
            _expire(waiters)
            self._free(group, token)

        deadline = self._loop.call_at(expires_at, overdue)
        pending = len(tasks)

        def ended(_: asyncio.Task) -> None:
            nonlocal pending
            pending -= 1
            if not pending:
                deadline.cancel()
                self._free(group, token)

        for task in tasks:
            task.add_done_callback(ended)

    def _free(self, group: tuple[str, Any], token: object) -> None:
        """The group's statement ended, or is still out at its deadline: the group's next claims may go."""
        if self._sending.get(group) is token:
            del self._sending[group]
            if group in self._queued:
                self._schedule()


async def _claim_for(model_name: str, raw_key: Any, waiters: list[asyncio.Future[Lease | None]]) -> None:
    """Claims one unit per waiting request and hands them out. This task is the claim's own (nothing cancels
    it); `_Claims` bounds the requests' wait (`DatabaseTimeout` at their batch's deadline), and a unit claimed
    for a request that stopped waiting (the deadline passed, or its client went away) is given back at once."""
    waiters = [waiter for waiter in waiters if not waiter.done()]
    if not waiters:
        return
    try:
        if len(waiters) == 1:
            lease = await _claim_one(model_name, (), raw_key, Preference.none())
            leases = [] if lease is None else [lease]
        else:
            leases = await _claim_units(model_name, raw_key, len(waiters))
    except Exception as error:
        if all(waiter.done() for waiter in waiters) and not isinstance(error, Unauthorized):
            logger.warning("a claim the gateway stopped waiting for failed: %s", error)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        return
    except BaseException:  # this task was cancelled (the loop is closing): nobody waits for ever
        for waiter in waiters:
            waiter.cancel()
        raise
    for waiter in waiters:
        lease = leases.pop() if leases else None
        if not waiter.done():
            waiter.set_result(lease)
        elif lease is not None:
            lease.release_soon()  # its request stopped waiting meanwhile
    for lease in leases:
        lease.release_soon()


def _expire(waiters: list[asyncio.Future[Lease | None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(_timed_out())


async def authorize(raw_key: str | None) -> None:
    """The gateway's key rule alone (requests that claim nothing: `/v1/models`, a rejected body); raises
    `Unauthorized`, or `DatabaseTimeout` after `LOCALAI_DB_POOL_TIMEOUT`."""

    async def check(conn: Any) -> None:
        cursor = await conn.execute(GATEWAY_AUTH_SELECT, {"hash": gateway_key_hash(raw_key)})
        await _admit(conn, *await cursor.fetchone())

    await _bounded(_on_hot_connection(check))


async def _admit(conn: Any, allowed: bool, key_id: int | None, key_last_used_at: Any) -> None:
    if not allowed:
        raise Unauthorized()
    if key_id is not None:
        await gateway_key_used(conn, key_id, key_last_used_at)


# --- releases, batched per event loop ----------------------------------------------------------------------
# Releases commute (each gives back one unit its owner holds, never more), so the units an event loop gives
# back are sent together: one statement for every unit released since the last one was sent, and one such
# statement in flight at a time. A lone release (concurrency 1) is sent at the next turn of the loop, as
# before; under load a statement carries many (at concurrency 32, about a tenth as many release statements as
# requests: docs/performance.md, "Claims and releases batched per event loop"), which takes most of the release's
# statements, round trips and row-lock waits off the hot path.
#
# Only a unit its owner still holds is given back: after the health monitor reclaimed a dead (or lost)
# owner's units, their late releases change nothing. Locks are taken in the claim's order — the replica rows
# (in id order, so two batches never wait on each other in a cycle), then the claim rows — so a claim and a
# release of the same replica can never deadlock.
_RELEASE_BATCH_SQL = f"""
WITH given AS (
  SELECT * FROM unnest(%(owners)s::uuid[], %(replicas)s::bigint[], %(counts)s::integer[])
    AS given(owner, replica_id, count)
), target AS (
  SELECT id FROM {ModelReplica._meta.db_table} WHERE id IN (SELECT replica_id FROM given) ORDER BY id FOR UPDATE
), held AS (
  SELECT c.owner, c.replica_id, LEAST(c.count, given.count) AS units
  FROM {InFlightClaim._meta.db_table} c
  JOIN given ON given.owner = c.owner AND given.replica_id = c.replica_id
  WHERE c.replica_id IN (SELECT id FROM target) AND c.count > 0
  FOR UPDATE OF c
), released AS (
  UPDATE {InFlightClaim._meta.db_table} c SET count = c.count - held.units
  FROM held WHERE c.owner = held.owner AND c.replica_id = held.replica_id
  RETURNING c.replica_id, held.units
)
UPDATE {ModelReplica._meta.db_table} r SET in_flight = GREATEST(r.in_flight - given_back.units, 0)
FROM (SELECT replica_id, sum(units) AS units FROM released GROUP BY replica_id) given_back
WHERE r.id = given_back.replica_id
"""

# One unit, the common case at low load: the same rule and lock order for one row.
_RELEASE_SQL = f"""
WITH target AS (
  SELECT id FROM {ModelReplica._meta.db_table} WHERE id = %(replica)s FOR UPDATE
), released AS (
  UPDATE {InFlightClaim._meta.db_table} SET count = count - 1
  WHERE owner = %(owner)s AND replica_id IN (SELECT id FROM target) AND count > 0
  RETURNING replica_id
)
UPDATE {ModelReplica._meta.db_table} SET in_flight = GREATEST(in_flight - 1, 0)
WHERE id IN (SELECT replica_id FROM released)
"""

# A batch whose statement failed (the database is unreachable for a moment) is tried again for about a
# minute, with every release queued meanwhile: a unit never given back would make its replica look busy for
# as long as this process lives, while a repeated release can at worst give back early another unit this
# process holds on the replica (never more than the process holds: see `_RELEASE_BATCH_SQL`).
RELEASE_RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class _Releases:
    """The in-flight units one event loop gives back, queued until its next release statement."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._units: Counter[tuple[Any, int]] = Counter()  # (owner, replica id) -> units
        self._waiters: list[asyncio.Future[None]] = []
        self._sending: asyncio.Task | None = None

    def add(self, replica_id: int, owner: Any) -> asyncio.Future[None]:
        """Queues one unit; the future is done once its statement ran (or was given up, which is logged)."""
        self._units[(owner, replica_id)] += 1
        done = self._loop.create_future()
        self._waiters.append(done)
        if self._sending is None:
            self._sending = _in_background(self._send_queued())
        return done

    async def settled(self) -> None:
        """Waits until nothing is queued or being sent (ASGI shutdown, tests)."""
        while self._sending is not None:
            await asyncio.shield(self._sending)

    async def _send_queued(self) -> None:
        try:
            while self._units:
                await self._send_with_retries()
        finally:
            self._sending = None

    def _take(self) -> tuple[Counter[tuple[Any, int]], list[asyncio.Future[None]]]:
        units, waiters = self._units, self._waiters
        self._units, self._waiters = Counter(), []
        return units, waiters

    async def _send_with_retries(self) -> None:
        units, waiters = self._take()
        try:
            for delay in (*RELEASE_RETRY_DELAYS, None):
                try:
                    await _bounded(_on_hot_connection(partial(_send_releases, units)))
                    return
                except DatabaseTimeout as error:
                    # The statement goes on in the background and gives the units back when the database
                    # resumes: sending it again could give back units this process claims meanwhile.
                    logger.warning(
                        "a release of %d unit(s) is still waiting for the database: %s",
                        sum(units.values()),
                        error,
                    )
                    return
                except Exception as error:
                    if delay is None:
                        logger.error("%d in-flight unit(s) not given back: %s", sum(units.values()), error)
                        return
                    logger.warning(
                        "giving back %d in-flight unit(s) failed (%s); retrying", sum(units.values()), error
                    )
                    await asyncio.sleep(delay)
                    more, more_waiters = self._take()  # what was queued meanwhile goes with the retry
                    units.update(more)
                    waiters.extend(more_waiters)
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


async def _send_releases(units: Counter[tuple[Any, int]], conn: Any) -> None:
    if len(units) == 1 and sum(units.values()) == 1:
        # One unit (concurrency 1): the single release, about 0.15 ms cheaper for the server than the batch's
        # statement with one row (docs/performance.md, "Claims and releases batched per event loop").
        [(owner, replica_id)] = units
        await conn.execute(_RELEASE_SQL, {"owner": owner, "replica": replica_id})
        return
    keys = sorted(units, key=lambda key: (key[1], str(key[0])))
    await conn.execute(
        _RELEASE_BATCH_SQL,
        {
            "owners": [owner for owner, _ in keys],
            "replicas": [replica_id for _, replica_id in keys],
            "counts": [units[key] for key in keys],
        },
    )


# One queue of each kind per event loop, keyed by the loop itself (see `_hot_pools`).
_release_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Releases] = weakref.WeakKeyDictionary()
_claim_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Claims] = weakref.WeakKeyDictionary()


S = TypeVar("S")


def of_this_loop(
    states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, S],
    make: Callable[[asyncio.AbstractEventLoop], S],
) -> S:
    """The running event loop's entry of `states`, made by `make(loop)` on first use."""
    loop = asyncio.get_running_loop()
    state = states.get(loop)
    if state is None:
        state = states[loop] = make(loop)
    return state


def _claims() -> _Claims:
    return of_this_loop(_claim_queues, _Claims)


def _releases() -> _Releases:
    return of_this_loop(_release_queues, _Releases)


async def releases_settled() -> None:
    """Waits until this event loop's queued releases were sent (ASGI shutdown, tests)."""
    queue = _release_queues.get(asyncio.get_running_loop())
    if queue is not None:
        await queue.settled()


async def _owner_of(lease: Lease) -> Any:
    """The owner id to release `lease`'s unit under; the process owner forgets the lease. Waits while the
    process moves its units to a new owner id (after a database switch), which is bounded by its deadline."""
    while (owner := PROCESS_OWNER.retire(lease)) is REPUBLISHING:
        await asyncio.to_thread(PROCESS_OWNER.wait_settled, 1.0)
    return owner


async def _give_back_lease(lease: Lease) -> None:
    await _give_back(lease.replica_id, await _owner_of(lease))


async def _give_back(replica_id: int, owner: Any) -> None:
    """Queues the unit's release and waits for its statement (retried after failures; never raises)."""
    await _releases().add(replica_id, owner)


# --- async API ---------------------------------------------------------------------------------------------


def _in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs database work in a load-pool thread and hands its connection back to the pool afterwards (those
    threads wait on locks and loads; they must not pin connections)."""
    try:
        return func(*args, **kwargs)
    finally:
        connection.close()


def _in_hot_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs database work in a hot-path thread, keeping its connection for the next hop unless it failed. A
    kept connection whose session ended meanwhile is handed back first (the pool's check replaces it), so the
    work runs on a live one."""
    kept = connection.connection
    if kept is not None and not connection.in_atomic_block and idle_connection_suspect(kept):
        connection.close()
    try:
        return func(*args, **kwargs)
    except DatabaseError:
        connection.close()
        raise


async def run_db(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`func(*args, **kwargs)` on the hot-path pool (one thread hop)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_hot_executor, partial(_in_hot_thread, func, *args, **kwargs))


async def _shielded(executor: ThreadPoolExecutor, func: Callable[..., T], *args: Any) -> T:
    """Runs `func` in `executor`; a cancelled caller still lets it finish (releases must happen)."""
    loop = asyncio.get_running_loop()
    wrapper = _in_hot_thread if executor is _hot_executor else _in_thread
    future = loop.run_in_executor(executor, partial(wrapper, func, *args))
    return await asyncio.shield(future)


# Cold loads this process is waiting for: (loop id, model) → the future of `replica_ensure_loaded`.
# Per loop (the loop itself as key, see `_hot_pools`), per model.
_cold_loads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[None]]] = (
    weakref.WeakKeyDictionary()
)


async def _ensure_loaded(model_name: str) -> None:
    """Waits until the model has a routable replica, placing one when needed. Concurrent callers in this
    process share one wait (and one load); the wait is bounded by `LOCALAI_LOAD_TIMEOUT`, plus
    `LOCALAI_DOWNLOAD_TIMEOUT` for a model whose files are staged first."""
    loop = asyncio.get_running_loop()
    waits = _cold_loads.setdefault(loop, {})
    future = waits.get(model_name)
    if future is None:
        timeout = float(settings.LOCALAI_LOAD_TIMEOUT)
        work = partial(
            _in_thread,
            replica_ensure_loaded,
            model_name=model_name,
            timeout=timeout,
            download_timeout=float(settings.LOCALAI_DOWNLOAD_TIMEOUT),
        )
        future = waits[model_name] = loop.run_in_executor(_load_executor, work)
        future.add_done_callback(lambda _done: waits.pop(model_name, None))
    await asyncio.shield(future)


async def acquire(
    model_name: str,
    *,
    exclude: Sequence[int] = (),
    raw_key: Any = NO_AUTH,
    preference: Preference | None = None,
) -> Lease:
    """A claimed in-flight unit on a replica of `model_name`, loading one first when the model is cold.

    With `raw_key` (the request's bearer value, or None), the gateway's key rule is checked in the claim's
    statement (`Unauthorized`); `preference` orders the candidates by the model's routing policy
    (`scheduling.routing`). A warm request costs one statement on the event loop (two with an API key's
    last-used stamp). Raises `UnknownModel` (not in the catalog and no replica), `NoCapacity(reason)` or
    `LoadFailed`."""
    lease = await aclaim(model_name, exclude=exclude, raw_key=raw_key, preference=preference)
    if lease is not None:
        return lease
    for _round in range(2):
        await _ensure_loaded(model_name)
        lease = await aclaim(model_name, exclude=exclude, preference=preference)
        if lease is not None:
            return lease
    raise NoCapacity(f"no replica of {model_name} could be claimed")


async def discard_unreachable(lease: Lease) -> None:
    """The lease's backend refused the connection before any byte was exchanged: remove that one replica row
    (so a retry cannot pick it again; its in-flight units go with it) and stop its process on its agent. The
    stop is waited for (at most `STOP_WAIT`), so that it cannot reach the agent after a retry's fresh load of
    the same process key and stop that one. The lease counts as released; when the row cannot be removed, its
    unit is given back instead."""
    if lease.released:
        return
    lease.released = True
    owner = await _owner_of(lease)
    logger.warning(
        "backend %r of %r on %r is unreachable: removing that replica",
        lease.address,
        lease.process_key,
        lease.node_name,
    )
    try:
        node = await _shielded(_hot_executor, _remove_row, lease.replica_id)
    except Exception as error:
        logger.warning("could not remove replica %s: %s", lease.process_key, error)
        await asyncio.shield(_in_background(_give_back(lease.replica_id, owner)))
        return
    if node is None:
        return
    loop = asyncio.get_running_loop()
    stop = partial(_in_thread, _stop_key, node, lease.process_key)
    task = loop.run_in_executor(_load_executor, stop)
    _background.add(task)
    task.add_done_callback(_background.discard)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), STOP_WAIT)


async def probe_replica(lease: Lease) -> bool:
    """Probes the lease's replica now (the gRPC health check of the health monitor, `health.replica_probe`):
    one that does not answer is removed and its process stopped before this returns. Answers whether it
    answered. The lease is untouched (release it afterwards: a removed replica's release changes nothing).
    Survives cancellation of the caller."""
    from scheduling.health import replica_probe

    return await _shielded(_load_executor, partial(replica_probe, replica_id=lease.replica_id))


def probe_replica_soon(lease: Lease) -> None:
    """`probe_replica` in the background (a stream broke after its first byte reached the client)."""
    _in_background(_probe_logged(lease))


async def _probe_logged(lease: Lease) -> None:
    try:
        await probe_replica(lease)
    except Exception:
        logger.exception("probe of %s on %s failed", lease.process_key, lease.node_name)


def _remove_row(replica_id: int) -> Any:
    from nodes.services import replica_remove

    replica = replica_remove(replica_id=replica_id)
    return None if replica is None else replica.node_id


def _stop_key(node_id: Any, process_key: str) -> None:
    from scheduling.services import replica_stop_on_node

    replica_stop_on_node(node_id=node_id, process_key=process_key)


_background: set[asyncio.Future[Any]] = set()


def release_in_background(lease: Lease) -> None:
    """Gives back the lease's in-flight unit from a pool thread, without an event loop (finalizers)."""
    _hot_executor.submit(_in_hot_thread, _release_lease_now, lease)


def _release_lease_now(lease: Lease) -> None:
    while (owner := PROCESS_OWNER.retire(lease)) is REPUBLISHING:
        PROCESS_OWNER.wait_settled(1.0)
    replica_release(lease.replica_id, owner)
