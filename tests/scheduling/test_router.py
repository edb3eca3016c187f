"""Routing choices and in-flight claims on the real database (SCENARIOS 87–95)."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections
from django.utils import timezone

from nodes.models import ModelReplica
from scheduling import router
from scheduling.router import replica_release
from tests.conftest import turns_until, wait_until
from tests.factories import GiB, NodeFactory, NodeLabelFactory, ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _hot_pools_closed():
    """These tests call the router on their own event loop (no ASGI lifespan to close its hot-path pool): the
    pool is closed before the loop closes. Left open, the loop's shutdown cancels the pool's workers in the
    middle of a connection attempt, and the pool's reconnect backoff then keeps the loop from closing."""
    yield
    await router.close_hot_pools()


def claim(*, model_name, exclude=()):
    """One claim by the router's real claim statement (`router.aclaim`) from sync code: its own event loop,
    whose hot-path pool is closed after."""

    async def run():
        try:
            return await router.aclaim(model_name, exclude=exclude)
        finally:
            await router.close_hot_pools()

    return asyncio.run(run())


def node(name, free_gib=10, **extra):
    return NodeFactory(name=name, total_vram=free_gib * GiB, available_vram=free_gib * GiB, **extra)


def flights(model="m"):
    return dict(ModelReplica.objects.filter(model_name=model).values_list("node__name", "in_flight"))


def test_claim_updates_last_used_and_in_flight():  # 87
    replica = ReplicaFactory(node=node("n1"), model_name="m")
    lease = claim(model_name="m")
    replica.refresh_from_db()
    assert lease.replica_id == replica.id
    assert replica.in_flight == 1
    assert replica.last_used is not None
    replica_release(replica.id, lease.owner)
    replica.refresh_from_db()
    assert replica.in_flight == 0


def test_the_lease_carries_the_backend_token_of_the_nodes_current_salt():
    from nodes.tokens import backend_token_for, new_token_salt

    worker = node("n1")
    ReplicaFactory(node=worker, model_name="m")
    assert claim(model_name="m").backend_token == backend_token_for(worker)
    old = backend_token_for(worker)
    worker.token_salt = new_token_salt()  # what a re-registration does
    worker.save(update_fields=["token_salt"])
    assert claim(model_name="m").backend_token == backend_token_for(worker) != old


def test_fewest_in_flight_wins():  # 88
    ReplicaFactory(node=node("n1"), model_name="m", in_flight=2)
    ReplicaFactory(node=node("n2"), model_name="m", in_flight=0)
    assert claim(model_name="m").node_name == "n2"


def test_ties_go_to_more_free_vram_then_least_recently_used():  # 89
    ReplicaFactory(node=node("small", 4), model_name="m")
    ReplicaFactory(node=node("big", 16), model_name="m")
    assert claim(model_name="m").node_name == "big"
    ModelReplica.objects.update(in_flight=0)
    now = timezone.now()
    ModelReplica.objects.filter(node__name="big").update(last_used=now)
    ModelReplica.objects.filter(node__name="small").update(last_used=now - timezone.timedelta(minutes=1))
    ModelReplica.objects.filter(node__name="small").update(node=node("big2", 16))
    assert claim(model_name="m").node_name == "big2"


def test_draining_node_skipped_for_a_busier_healthy_one():  # 90
    ReplicaFactory(node=node("draining", status="draining"), model_name="m")
    ReplicaFactory(node=node("healthy"), model_name="m", in_flight=3)
    assert claim(model_name="m").node_name == "healthy"


@pytest.mark.parametrize(
    ("state", "status"),
    [("failed", "healthy"), ("unloading", "healthy"), ("loading", "healthy"), ("loaded", "unhealthy")],
)
def test_unusable_replicas_are_not_routed(state, status):  # 91
    ReplicaFactory(node=node("n1", status=status), model_name="m", state=state)
    assert claim(model_name="m") is None
    assert flights() == {"n1": 0}


def test_pending_and_agent_nodes_are_not_routed():
    ReplicaFactory(node=node("pending", status="pending", approved_at=None), model_name="m")
    ReplicaFactory(node=node("agent", node_type="agent"), model_name="m")
    assert claim(model_name="m") is None


def test_selector_is_checked_now():  # 92
    matching = node("matching")
    other = node("other")
    NodeLabelFactory(node=matching, key="tier", value="fast")
    NodeLabelFactory(node=other, key="tier", value="slow")
    ReplicaFactory(node=other, model_name="m")
    RuleFactory(model_name="m", node_selector={"tier": "fast"})
    assert claim(model_name="m") is None
    assert flights() == {"other": 0}
    ReplicaFactory(node=matching, model_name="m")
    assert claim(model_name="m").node_name == "matching"


def test_lost_claim_takes_the_next_candidate():  # 94
    """The best replica leaves `loaded` while the claim is in progress: the claim waits on its row, re-checks
    it, and takes the next candidate; nothing is added to or released from the first."""
    import psycopg

    first = ReplicaFactory(node=node("first", 20), model_name="m")
    ReplicaFactory(node=node("second", 10), model_name="m")
    params = {
        k: v for k, v in connection.get_connection_params().items() if k not in {"cursor_factory", "context"}
    }
    with psycopg.connect(**params) as other:
        other.execute("SELECT id FROM nodes_modelreplica WHERE id = %s FOR UPDATE", [first.pk])
        with ThreadPoolExecutor(1) as pool:
            claim = pool.submit(_claim_in_thread, "m")
            wait_until(lambda: _waiting_on_a_lock(), message="the claim to wait on the row lock")
            other.execute("UPDATE nodes_modelreplica SET state = 'unloading' WHERE id = %s", [first.pk])
            other.commit()
            assert claim.result(timeout=10) == "second"
    assert flights() == {"first": 0, "second": 1}


def _claim_in_thread(model: str) -> str:
    try:
        return claim(model_name=model).node_name
    finally:
        connections.close_all()


def _waiting_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return cursor.fetchone()[0] > 0


def test_release_never_goes_below_zero():  # 95
    replica = ReplicaFactory(node=node("n1"), model_name="m")
    lease = claim(model_name="m")
    claim(model_name="m")
    assert flights() == {"n1": 2}
    for expected in (1, 0, 0):
        replica_release(replica.id, lease.owner)
        assert flights() == {"n1": expected}


def test_no_stickiness_between_requests():  # 93
    ReplicaFactory(node=node("a"), model_name="m")
    assert claim(model_name="m").node_name == "a"  # a is now busy
    ReplicaFactory(node=node("b", 5), model_name="m")
    assert claim(model_name="m").node_name == "b"


async def test_lease_release_is_exactly_once():
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    lease = await router.acquire("m")
    await asyncio.gather(lease.release(), lease.release())
    await lease.release()
    assert await sync_to_async(flights)() == {"n1": 0}


async def test_unknown_model_raises_without_loading():
    from scheduling.placement import UnknownModel

    with pytest.raises(UnknownModel):
        await router.acquire("never-heard-of")


def test_claims_are_recorded_under_this_process_owner():
    from nodes.models import InFlightClaim

    replica = ReplicaFactory(node=node("n1"), model_name="m")
    lease = claim(model_name="m")
    claim(model_name="m")
    assert list(InFlightClaim.objects.values_list("owner", "replica_id", "count")) == [
        (lease.owner, replica.id, 2)
    ]


def test_a_release_of_a_reclaimed_unit_changes_nothing():
    """After the health monitor gave back a (lost) owner's units, that owner's late release must not take a
    unit another process holds."""
    from nodes.models import InFlightClaim

    replica = ReplicaFactory(node=node("n1"), model_name="m")
    lease = claim(model_name="m")
    InFlightClaim.objects.filter(owner=lease.owner).delete()  # reclaimed
    ModelReplica.objects.filter(pk=replica.pk).update(in_flight=1)  # another process's unit
    replica_release(replica.id, lease.owner)
    assert flights() == {"n1": 1}


async def test_concurrent_first_requests_share_one_hot_pool():
    """The first requests of an event loop all wait for one pool, instead of each opening its own."""
    pools = await asyncio.gather(*(router.hot_pool() for _ in range(20)))
    try:
        assert len({id(pool) for pool in pools}) == 1
    finally:
        await router.close_hot_pools()
    assert await router.hot_pool() is not pools[0]  # closed and forgotten: the next request opens a new one
    await router.close_hot_pools()


async def test_a_release_whose_statement_fails_is_retried():
    """The release meets a pooled connection the server terminated: it is tried again on another connection
    (never raised, never lost), so the unit comes back."""
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    lease = await router.acquire("m")
    pool = await router.hot_pool()
    try:
        held = [await pool.getconn() for _ in range(pool.get_stats()["pool_size"])]  # every pooled connection
        pids = [conn.info.backend_pid for conn in held]
        for conn in held:
            await pool.putconn(conn)

        def terminate() -> None:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])

        await sync_to_async(terminate)()
        await lease.release()
        assert await sync_to_async(flights)() == {"n1": 0}
    finally:
        await router.close_hot_pools()


async def test_releases_queued_in_one_turn_of_the_loop_go_in_one_statement(monkeypatch):
    """Releases commute, so the units an event loop gives back together are sent in one statement
    (docs/performance.md, "Claims and releases batched per event loop"): 20 releases of two replicas, one
    statement, and each replica's count back to what the other owner holds."""
    from asgiref.sync import sync_to_async

    from nodes.models import InFlightClaim

    a = await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("a"), model_name="m")
    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("b"), model_name="m")
    leases = [await router.acquire("m") for _ in range(20)]
    assert {lease.node_name for lease in leases} == {"a", "b"}
    # Another web process's unit on `a`: a batch gives back only what its owners hold.
    other = "00000000-0000-0000-0000-000000000001"
    await sync_to_async(InFlightClaim.objects.create)(owner=other, replica_id=a.id, count=1)
    await sync_to_async(ModelReplica.objects.filter(pk=a.pk).update)(in_flight=11)
    sent = []
    real_send = router._send_releases

    async def counting(units, conn):
        sent.append(sum(units.values()))
        await real_send(units, conn)

    monkeypatch.setattr(router, "_send_releases", counting)
    await asyncio.gather(*(lease.release() for lease in leases))
    assert sent == [20]
    assert await sync_to_async(flights)() == {"a": 1, "b": 0}


async def test_a_failed_release_batch_is_retried_with_what_was_queued_meanwhile(monkeypatch):
    """The first statement fails; the retry carries its units and the one released while it waited."""
    import psycopg
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    first, second = await router.acquire("m"), await router.acquire("m")
    monkeypatch.setattr(router, "RELEASE_RETRY_DELAYS", (0.05,))
    sent = []
    real_send = router._send_releases

    async def failing_once(units, conn):
        sent.append(sum(units.values()))
        if len(sent) == 1:
            second.release_soon()  # queued while the first statement is out
            raise psycopg.OperationalError("the server went away")
        await real_send(units, conn)

    monkeypatch.setattr(router, "_send_releases", failing_once)
    await first.release()
    await router.releases_settled()
    assert sent == [1, 2]
    assert await sync_to_async(flights)() == {"n1": 0}


def _count_statements(monkeypatch, name):
    """Wraps `router.<name>` (a coroutine function) to record the size of each call's batch."""
    sizes = []
    real = getattr(router, name)

    async def counting(model_name, raw_key, units):
        sizes.append(units)
        return await real(model_name, raw_key, units)

    monkeypatch.setattr(router, name, counting)
    return sizes


async def test_claims_of_one_turn_of_the_loop_go_in_one_statement_dealt_by_load(monkeypatch):
    """Four requests reach their claim in the same turn: one statement claims the four units, dealt as four
    single claims in a row would deal them (fewest in-flight first; at equal load the node with more free
    VRAM), and each request gets one lease."""
    from asgiref.sync import sync_to_async

    from nodes.models import InFlightClaim

    a = await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("a", 10), model_name="m")
    b = await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("b", 5), model_name="m")
    await sync_to_async(ModelReplica.objects.filter(pk=b.pk).update)(in_flight=1)
    sizes = _count_statements(monkeypatch, "_claim_units")
    leases = await asyncio.gather(*(router.aclaim("m") for _ in range(4)))
    assert sizes == [4]
    assert len({id(lease) for lease in leases}) == 4
    # a: 0, 1, then 2 (tied with b's 2: more free VRAM); b: 1 → a gets 3, b gets 1.
    assert sorted(lease.node_name for lease in leases) == ["a", "a", "a", "b"]
    assert await sync_to_async(flights)() == {"a": 3, "b": 2}
    owners = await sync_to_async(lambda: dict(InFlightClaim.objects.values_list("replica_id", "count")))()
    assert owners == {a.id: 3, b.id: 1}
    await asyncio.gather(*(lease.release() for lease in leases))
    assert await sync_to_async(flights)() == {"a": 0, "b": 1}


async def test_a_batch_refused_by_the_key_rule_claims_nothing(monkeypatch):
    from asgiref.sync import sync_to_async

    from nodes.apikeys import api_key_create

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    await sync_to_async(api_key_create)(name="ci")
    sizes = _count_statements(monkeypatch, "_claim_units")
    outcomes = await asyncio.gather(
        *(router.aclaim("m", raw_key="not-a-key") for _ in range(3)), return_exceptions=True
    )
    assert sizes == [3]
    assert all(isinstance(outcome, router.Unauthorized) for outcome in outcomes)
    assert await sync_to_async(flights)() == {"n1": 0}


async def test_a_request_gone_before_its_batch_returned_gives_its_unit_back(monkeypatch):
    """The batch's statement is out when one of its requests is cancelled (its client went away): the
    statement is not interrupted, and the unit it claimed for that request is given back."""
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    sent = asyncio.Event()
    proceed = asyncio.Event()
    real = router._claim_units

    async def slow(model_name, raw_key, units):
        sent.set()
        await proceed.wait()
        return await real(model_name, raw_key, units)

    monkeypatch.setattr(router, "_claim_units", slow)
    kept, gone = asyncio.ensure_future(router.aclaim("m")), asyncio.ensure_future(router.aclaim("m"))
    await sent.wait()
    gone.cancel()
    proceed.set()
    lease = await kept
    assert gone.cancelled()
    await sync_to_async(wait_until)(lambda: flights() == {"n1": 1}, message="the gone request's unit back")
    await lease.release()
    assert await sync_to_async(flights)() == {"n1": 0}


async def test_a_request_cancelled_just_after_its_lease_was_handed_out_gives_it_back(monkeypatch):
    """The lease is handed out, then the request is cancelled before it runs again to take it (its client
    went away in that instant): the unit is given back, not lost. Found by a reset-at-random-moments test
    (`tests/e2e/test_client_disconnects.py`), which leaked a unit about one run in three."""
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    real = router._claim_one

    async def cancel_at_hand_out(*args):
        lease = await real(*args)
        asyncio.get_running_loop().call_soon(request.cancel)  # runs before the request's wake-up
        return lease

    monkeypatch.setattr(router, "_claim_one", cancel_at_hand_out)
    request = asyncio.ensure_future(router.aclaim("m"))
    with pytest.raises(asyncio.CancelledError):
        await request
    await sync_to_async(wait_until)(lambda: flights() == {"n1": 0}, message="the handed-out unit back")


def _record_claim_statements(monkeypatch, hold_first):
    """Wraps the router's two claim statements (`_claim_one` for a lone claim, `_claim_units` for a batch):
    records each statement's units, in order, and holds the first statement until `hold_first` is set."""
    sent = []
    real_one, real_units = router._claim_one, router._claim_units

    async def one(model_name, exclude, raw_key, prefer):
        sent.append((model_name, 1))
        if len(sent) == 1:
            await hold_first.wait()
        return await real_one(model_name, exclude, raw_key, prefer)

    async def units(model_name, raw_key, count):
        sent.append((model_name, count))
        if len(sent) == 1:
            await hold_first.wait()
        return await real_units(model_name, raw_key, count)

    monkeypatch.setattr(router, "_claim_one", one)
    monkeypatch.setattr(router, "_claim_units", units)
    return sent


async def test_claims_made_while_their_groups_statement_is_out_go_together_in_the_next(monkeypatch):
    """One claim statement of a (model, key) group in flight at a time (docs/performance.md, "One claim
    statement in flight per model"): the claims made while it is out wait for it, then go in one statement;
    another model's claim is not held by it. Every request gets its lease."""
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("a"), model_name="m")
    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("b"), model_name="other")
    hold_first = asyncio.Event()
    sent = _record_claim_statements(monkeypatch, hold_first)
    first = asyncio.ensure_future(router.aclaim("m"))
    await turns_until(lambda: sent == [("m", 1)])
    queued = [asyncio.ensure_future(router.aclaim("m")) for _ in range(3)]
    elsewhere = await router.aclaim("other")  # its own group: sent while m's statement is out
    for _ in range(5):  # turns of the loop: nothing more of m's is sent while its statement is out
        await asyncio.sleep(0)
    assert sent == [("m", 1), ("other", 1)]
    hold_first.set()
    leases = [await first, *[await claim for claim in queued]]
    assert sent == [("m", 1), ("other", 1), ("m", 3)]
    assert all(lease is not None and lease.node_name == "a" for lease in leases)
    assert await sync_to_async(flights)() == {"a": 4}
    await asyncio.gather(*(lease.release() for lease in [*leases, elsewhere]))
    assert await sync_to_async(flights)() == {"a": 0}


async def test_a_statement_past_its_deadline_stops_holding_the_claims_queued_behind_it(monkeypatch, settings):
    """The database froze under a group's statement: at its deadline its request gets `DatabaseTimeout`, and
    the claims queued behind it go out in a statement of their own instead of waiting for the frozen one for
    ever; they time out in their turn (the database is still frozen), each within its own bound."""
    settings.LOCALAI_DB_POOL_TIMEOUT = 0.1
    frozen = asyncio.Event()
    sent = []

    async def one(model_name, exclude, raw_key, prefer):
        sent.append(1)
        await frozen.wait()  # no answer until the test ends

    async def units(model_name, raw_key, count):
        sent.append(count)
        await frozen.wait()

    monkeypatch.setattr(router, "_claim_one", one)
    monkeypatch.setattr(router, "_claim_units", units)
    try:
        first = asyncio.ensure_future(router.aclaim("m"))
        await turns_until(lambda: sent == [1])
        queued = [asyncio.ensure_future(router.aclaim("m")) for _ in range(2)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert sent == [1]  # held behind the statement in flight
        for request in (first, *queued):
            with pytest.raises(router.DatabaseTimeout):
                await request
        assert sent == [1, 2]  # the queued two went together once the first was past its deadline
    finally:
        frozen.set()


async def test_the_claim_is_planned_once_per_connection_not_per_request():
    """The hot pool's prepared claim runs on its generic plan. Left to choose, PostgreSQL planned the
    least_in_flight claim anew at every request (its custom plan drops the prefix branch when `prefer` is
    empty, so it always looks cheaper), which cost about 0.45 ms of planning per request
    (docs/performance.md, "Gateway overhead with routing policies")."""
    from asgiref.sync import sync_to_async

    await sync_to_async(ReplicaFactory)(node=await sync_to_async(node)("n1"), model_name="m")
    for _ in range(12):  # psycopg prepares a statement at its 5th use; PostgreSQL weighs plans after 5 more
        lease = await router.acquire("m")
        await lease.release()
    pool = await router.hot_pool()
    held = [await pool.getconn() for _ in range(pool.get_stats()["pool_size"])]
    try:
        plans = [0, 0]
        for conn in held:
            assert (await (await conn.execute("SHOW plan_cache_mode")).fetchone())[0] == "force_generic_plan"
            cursor = await conn.execute(
                "SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0)"
                " FROM pg_prepared_statements WHERE statement LIKE '%%claimed AS%%'"
            )
            generic, custom = await cursor.fetchone()
            plans[0] += generic
            plans[1] += custom
        assert plans[0] > 0 and plans[1] == 0
    finally:
        for conn in held:
            await pool.putconn(conn)


def _hold_model_load_locks(names, held, release) -> None:
    """Another process's cold loads: the per-model load locks taken on a connection of this thread."""
    from localai_cluster import locks

    try:
        for name in names:
            assert locks.try_advisory_lock(locks.NAMESPACE_MODEL_LOAD, locks.model_key(name))
        held.set()
        release.wait(60)
    finally:
        connection.close()  # the session's advisory locks end with it


def test_the_wait_for_a_load_elsewhere_adds_the_download_timeout_for_a_model_with_files():
    """Issue 15: a request held for a cold model whose files are staged first waits up to
    `LOCALAI_LOAD_TIMEOUT` plus `LOCALAI_DOWNLOAD_TIMEOUT`; a model without files, the load timeout only."""
    import threading

    from scheduling.placement import NoCapacity
    from tests.factories import ModelConfigFactory

    ModelConfigFactory(name="plain", backend="echo")
    file = {"uri": "https://files.example/w.bin", "sha256": "ab" * 32, "size": 10, "path": "w.bin"}
    ModelConfigFactory(name="staged", backend="echo", files=[file])
    held, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(_hold_model_load_locks, ["plain", "staged"], held, release)
        try:
            assert held.wait(30)
            with pytest.raises(NoCapacity, match=r"timed out after 0\.05s waiting for plain"):
                router.replica_ensure_loaded(model_name="plain", timeout=0.05, download_timeout=0.1)
            with pytest.raises(NoCapacity, match=r"timed out after 0\.15s waiting for staged"):
                router.replica_ensure_loaded(model_name="staged", timeout=0.05, download_timeout=0.1)
        finally:
            release.set()
            holder.result(30)


def _ensure_loaded_in_thread(**kwargs) -> None:
    """`replica_ensure_loaded` as a web process's load thread runs it (its own database connection)."""
    try:
        router.replica_ensure_loaded(**kwargs)
    finally:
        connection.close()


def _listening_sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'idle'",
            [f"LISTEN {router.MODEL_LOADED_CHANNEL}"],
        )
        return cursor.fetchone()[0]


@contextlib.contextmanager
def _waiting_for_a_load_elsewhere(model_name):
    """Another process holds `model_name`'s load lock, and this process's load thread waits for it: yields the
    future of that wait (`replica_ensure_loaded`, load timeout 120 s)."""
    import threading

    held, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(_hold_model_load_locks, [model_name], held, release)
        try:
            assert held.wait(30)
            yield pool.submit(_ensure_loaded_in_thread, model_name=model_name, timeout=120)
        finally:
            release.set()
            holder.result(30)


def test_a_wait_for_a_load_elsewhere_wakes_when_the_holder_says_it_is_loaded(monkeypatch):
    """A process waiting for another process's cold load listens for the holder's word (`_announce_loaded`)
    and re-checks at once, instead of at its next poll (up to LOCK_POLL_MAX later). Its polls are an hour
    apart here, so only the word can wake it before its load timeout."""
    monkeypatch.setattr(router, "LOCK_POLL_START", 3600.0)
    monkeypatch.setattr(router, "LOCK_POLL_MAX", 3600.0)
    with _waiting_for_a_load_elsewhere("listened") as waiter:
        wait_until(lambda: _listening_sessions() == 1, timeout=60)
        assert not waiter.done()
        ReplicaFactory(node=node("n1"), model_name="listened")  # the other process's load is done…
        router._announce_loaded("listened")  # …and it says so
        waiter.result(timeout=60)  # returned, without NoCapacity: it saw the replica
    wait_until(lambda: _listening_sessions() == 0, timeout=30)  # its session closed with the wait


def test_a_wait_for_a_load_elsewhere_polls_when_it_cannot_listen(monkeypatch, caplog):
    """The wake-up is an accelerator: when its session cannot be opened, the waiter polls as before."""
    import psycopg

    def refused(*args, **kwargs):
        raise psycopg.OperationalError("connection refused (test)")

    monkeypatch.setattr(router.psycopg, "connect", refused)
    monkeypatch.setattr(router, "LOCK_POLL_START", 0.01)
    monkeypatch.setattr(router, "LOCK_POLL_MAX", 0.01)
    with (
        caplog.at_level("INFO", logger="scheduling.router"),
        _waiting_for_a_load_elsewhere("polled") as waiter,
    ):
        wait_until(lambda: "polling instead" in caplog.text, timeout=60)
        ReplicaFactory(node=node("n1"), model_name="polled")  # loaded elsewhere, and nobody says so
        waiter.result(timeout=60)


def test_announcing_a_load_when_the_database_fails_is_logged_not_raised(monkeypatch, caplog):
    from django.db import OperationalError

    def broken(*args, **kwargs):
        raise OperationalError("server closed the connection (test)")

    monkeypatch.setattr(connection, "cursor", broken)
    router._announce_loaded("m")
    assert "could not announce that m is loaded" in caplog.text


async def test_concurrent_requests_for_a_cold_model_share_one_wait(monkeypatch, settings):
    """Issue 15: the requests of a process for a cold model (its files downloading) share one wait and one
    load, bounded by the load timeout plus the download timeout."""
    import threading

    settings.LOCALAI_LOAD_TIMEOUT = 7
    settings.LOCALAI_DOWNLOAD_TIMEOUT = 11
    calls: list[dict] = []
    started, finish = threading.Event(), threading.Event()

    def ensure_loaded(**kwargs) -> None:
        calls.append(kwargs)
        started.set()
        finish.wait(30)

    monkeypatch.setattr(router, "replica_ensure_loaded", ensure_loaded)
    waits = [asyncio.ensure_future(router._ensure_loaded("cold")) for _ in range(5)]
    await asyncio.sleep(0)  # every wait has started
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
    assert not any(wait.done() for wait in waits)
    finish.set()
    await asyncio.gather(*waits)
    assert calls == [{"model_name": "cold", "timeout": 7.0, "download_timeout": 11.0}]
