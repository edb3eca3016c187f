"""In-flight accounting, the options side by side: what one in-flight unit (a claim and its release) costs
with the gateway's PostgreSQL statements, one per request or batched per event loop, and with Redis counters
(alone, and with the PostgreSQL read a Redis design still needs per request without caches).

    .venv/bin/python bench/inflight_options.py [--units 2000] [--burst 16]

One process, one event loop, a model with 2 loaded replicas on 2 healthy nodes; the gateway's connections and
settings (the router's hot pool: asynchronous commit, generic plans); the embedded PostgreSQL and Redis on unix
sockets unless DATABASE_URL / REDIS_URL are set. Each row runs `--units` units, after a warm-up, in rounds of N
concurrent units (N=1: one request at a time; N=--burst: requests reaching their claim in the same loop turn).

- pg per request: the claim statement with the gateway's key check (`_AUTHORIZED_CLAIM_SQL`: pick the best
  routable replica, add 1 to its in_flight, record the unit under the process's owner id) and one release
  statement (`_RELEASE_BATCH_SQL` with one unit): 2 round trips, 2 commits per unit. At N=1 this is
  `router.aclaim` + `Lease.release` (a lone claim takes the single path); at N=burst every unit still sends
  its own two statements, as the gateway did before batching.
- pg batched: `asyncio.gather` of N `router.aclaim`, then of N `Lease.release`, as the gateway does now: one
  claim statement for the burst (`_AUTHORIZED_BATCH_CLAIM_SQL`, water-filling) and one release statement.
- redis: a Lua script (EVALSHA) picks the replica with the fewest in-flight among the ids it is given (a hash
  per model: replica id -> count) and adds 1 there and in the process's hash (for a dead-process reclaim); the
  release script takes 1 off both, never below 0, only for a unit the process holds. The ids come from memory,
  as if cached. gather: N concurrent calls; pipelined: a burst's claims in one pipeline, then its releases.
- redis + pg read: the same, plus per request the read a Redis design cannot skip without caches: the key
  check (`GATEWAY_AUTH_SELECT`) and the model's routable replica ids, one statement on the hot pool. This is
  the like-for-like comparison with the pg rows, whose claim statement does both.

Columns: wall time per unit (median over the rounds of a round's wall time / N), units per second over the row,
statements on the hot pool per unit, and CPU per unit of this process (`time.process_time`, every thread),
of the PostgreSQL server (every process of it, from /proc, its background writers included) and of Redis
(`INFO cpu`); on a loaded machine the CPU columns are the steadier measure. Runs in its own database
`bench_inflight`, dropped at the end, as its Redis keys are deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
DATABASE = "bench_inflight"
MODEL = "bench-inflight"
COLUMNS = "{:<22}{:>4}{:>12}{:>10}{:>9}{:>11}{:>9}{:>9}{:>9}"

from bench.benchdb import drop_database, use_fresh_database  # noqa: E402
from bench.pgcpu import postmaster_pid, server_cpu_seconds  # noqa: E402

# KEYS: the model's hash, the process's hash; ARGV: the routable replica ids. Fewest in-flight wins (ties: the
# first given); false when none is given.
CLAIM_LUA = """
local counts = redis.call('HMGET', KEYS[1], unpack(ARGV))
local best, fewest = false, nil
for i, id in ipairs(ARGV) do
  local n = tonumber(counts[i]) or 0
  if fewest == nil or n < fewest then best, fewest = id, n end
end
if best then
  redis.call('HINCRBY', KEYS[1], best, 1)
  redis.call('HINCRBY', KEYS[2], best, 1)
end
return best
"""
# KEYS as above; ARGV[1]: the replica id. Only a unit the process still holds is given back.
RELEASE_LUA = """
if (tonumber(redis.call('HGET', KEYS[2], ARGV[1])) or 0) <= 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
if (tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
end
return 1
"""


def populate() -> None:
    """A model with 2 loaded replicas on 2 healthy, approved nodes."""
    from django.utils import timezone

    from nodes.choices import NodeStatus, NodeType, ReplicaState
    from nodes.models import ModelReplica, Node

    now = timezone.now()
    for i in range(2):
        node = Node.objects.create(
            name=f"bench-node-{i}", node_type=NodeType.BACKEND, address=f"127.0.0.1:{41000 + i}",
            status=NodeStatus.HEALTHY, approved_at=now, last_heartbeat=now, total_vram=24 * 2**30,
            available_vram=24 * 2**30, backends=["echo"],
        )  # fmt: skip
        ModelReplica.objects.create(
            node=node, model_name=MODEL, replica_index=0, state=ReplicaState.LOADED, backend="echo",
            address=f"127.0.0.1:{42000 + i}", loaded_at=now, last_seen_at=now,
        )  # fmt: skip


async def bench(args: argparse.Namespace, redis_keys: list[str]) -> None:
    import redis.asyncio as aioredis
    from django.conf import settings

    from nodes.apikeys import GATEWAY_AUTH_SELECT, gateway_key_hash
    from scheduling import router
    from scheduling.routing import Preference

    read_sql = (
        f"WITH auth AS ({GATEWAY_AUTH_SELECT}) SELECT auth.allowed, "
        f"ARRAY(SELECT r.id {router._ROUTABLE} ORDER BY r.id) FROM auth"
    )
    read_params = {"hash": gateway_key_hash(None), "model": MODEL, "exclude": []}

    async def query(sql: str, params: dict | None = None) -> tuple:
        async def run(conn):
            return await (await conn.execute(sql, params)).fetchone()

        return await router._bounded(router._on_hot_connection(run))

    statements = Counter()  # checkouts of the hot pool: one statement each here (no API key to stamp)
    on_hot_connection = router._on_hot_connection

    async def counted(work):
        statements["sent"] += 1
        return await on_hot_connection(work)

    router._on_hot_connection = counted
    (backend_pid,) = await query("SELECT pg_backend_pid()")
    postmaster = postmaster_pid(backend_pid)
    replica_ids = [str(i) for i in (await query(read_sql, read_params))[1]]
    assert len(replica_ids) == 2, f"expected 2 routable replicas, got {replica_ids}"

    client = aioredis.from_url(settings.REDIS_URL)
    claim_sha, release_sha = await client.script_load(CLAIM_LUA), await client.script_load(RELEASE_LUA)
    prefix = f"bench-inflight:{os.getpid()}"
    keys = [f"{prefix}:model:{MODEL}", f"{prefix}:owner:{uuid.uuid4()}"]
    redis_keys += keys

    async def redis_cpu() -> float:
        info = await client.info("cpu")
        return info["used_cpu_user"] + info["used_cpu_sys"]

    def check(leases: list) -> list:
        assert all(lease is not None for lease in leases), "a claim found no replica"
        return leases

    async def pg_batched(n: int) -> None:
        leases = check(await asyncio.gather(*(router.aclaim(MODEL, raw_key=None) for _ in range(n))))
        await asyncio.gather(*(lease.release() for lease in leases))

    async def release_alone(lease) -> None:
        lease.released = True
        owner = await router._owner_of(lease)
        units = Counter({(owner, lease.replica_id): 1})
        await router._bounded(router._on_hot_connection(partial(router._send_releases, units)))

    async def pg_per_request(n: int) -> None:
        if n == 1:
            return await pg_batched(1)  # a lone claim and a lone release take the single path
        claim = partial(router._claim_one, MODEL, (), None, Preference.none())
        claims = (router._bounded(claim(), abandoned=router._release_abandoned) for _ in range(n))
        leases = check(await asyncio.gather(*claims))
        await asyncio.gather(*(release_alone(lease) for lease in leases))

    def redis_claim(ids: list[str], target=client):
        return target.evalsha(claim_sha, 2, *keys, *ids)

    def redis_release(replica, target=client):
        return target.evalsha(release_sha, 2, *keys, replica)

    async def redis_gather(n: int) -> None:
        got = check(await asyncio.gather(*(redis_claim(replica_ids) for _ in range(n))))
        await asyncio.gather(*(redis_release(replica) for replica in got))

    async def redis_pipelined(n: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(n):
                redis_claim(replica_ids, pipe)
            got = check(await pipe.execute())
            for replica in got:
                redis_release(replica, pipe)
            await pipe.execute()

    async def read_then_claim():
        allowed, ids = await query(read_sql, read_params)
        if not allowed:
            raise router.Unauthorized()
        return await redis_claim([str(i) for i in ids])

    async def redis_with_read(n: int) -> None:
        got = check(await asyncio.gather(*(read_then_claim() for _ in range(n))))
        await asyncio.gather(*(redis_release(replica) for replica in got))

    async def measure(name: str, n: int, one_round) -> None:
        for _ in range(max(4, 64 // n)):  # warm-up: connections, prepared statements, scripts
            await one_round(n)
        rounds = max(1, args.units // n)
        walls = []
        pg_before, redis_before = server_cpu_seconds(postmaster), await redis_cpu()
        sent_before = statements["sent"]
        cpu_before, started = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            began = time.perf_counter()
            await one_round(n)
            walls.append(time.perf_counter() - began)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_before
        pg, rd = server_cpu_seconds(postmaster) - pg_before, await redis_cpu() - redis_before
        units, sent = rounds * n, statements["sent"] - sent_before
        (left,) = await query(f"SELECT coalesce(sum(in_flight), 0) FROM {router.ModelReplica._meta.db_table}")
        held = [int(v) for v in (await client.hgetall(keys[0])).values()]
        assert left == 0 and not any(held), f"{name}: units left claimed (pg {left}, redis {held})"
        us = [x * 1e6 / units for x in (cpu, pg, rd)]
        median = statistics.median(walls) * 1e6 / n
        print(COLUMNS.format(name, n, f"{median:.0f}", f"{units / wall:.0f}", f"{sent / units:.2f}", *(
            f"{x:.0f}" for x in (*us, sum(us))
        )), flush=True)  # fmt: skip

    print(f"{'':26}{'wall/unit':>12}{'units/s':>10}{'pg stmts':>9}{'CPU per unit (µs)':>38}")
    print(COLUMNS.format("row", "N", "median µs", "", "per unit", "bench", "pg", "redis", "total"))
    rows = [
        ("pg per request", pg_per_request),
        ("pg batched", pg_batched),
        ("redis gather", redis_gather),
        ("redis pipelined", redis_pipelined),
        ("redis + pg read", redis_with_read),
    ]
    for n in (1, args.burst):
        for name, one_round in rows:
            if name == "pg batched" and n == 1:
                continue  # the same path as "pg per request" at N=1
            await measure(name, n, one_round)
    await router.close_hot_pools()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2000, help="in-flight units per row")
    parser.add_argument("--burst", type=int, default=16, help="concurrent units of a burst (N)")
    args = parser.parse_args()
    print(
        "reproduce:", shlex.join([".venv/bin/python", "bench/inflight_options.py", *sys.argv[1:]]), flush=True
    )
    server_url = use_fresh_database(DATABASE)
    redis_keys: list[str] = []
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        populate()
        asyncio.run(bench(args, redis_keys))
    finally:
        if redis_keys:
            import redis
            from django.conf import settings

            redis.Redis.from_url(settings.REDIS_URL).delete(*redis_keys)
        from django.db import connections

        from nodes.inflight import PROCESS_OWNER

        PROCESS_OWNER.close()
        connections.close_all()
        drop_database(server_url, DATABASE)


if __name__ == "__main__":
    main()
