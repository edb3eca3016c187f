"""Cluster-wide request counts and gateway latency for the overview's charts.

Prometheus counters live in the process that increments them; the overview needs figures for the whole
cluster, whichever web process answered. Each web process therefore tallies its answers in memory (a few
integer additions per request, no I/O on the request's path) and a background task on its event loop adds
the tally to one Redis hash every `FLUSH_INTERVAL` (one pipelined `HINCRBY` round trip). The health tick
takes the hash (read and delete in one transaction) and stores one `MetricSample` from it
(`console.samples`). Latency is kept as counts per fixed bucket, so percentiles over the whole cluster come
out of the sum of every process's buckets.

A process that dies loses at most its last unflushed second; a Redis outage keeps the tally in memory (merged
back, bounded: it is counts, not events) until Redis answers again.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from dataclasses import dataclass, field

from django.conf import settings

logger = logging.getLogger(__name__)

REDIS_KEY = "localai:console:gateway-usage"


def usage_key() -> str:
    """The Redis hash of this cluster: named after its database, so clusters (and test runs) sharing one Redis
    keep their counts apart."""
    return f"{REDIS_KEY}:{settings.DATABASES['default']['NAME']}"


FLUSH_INTERVAL = 1.0
# Upper bounds (seconds) of the latency buckets: 1 ms to about 150 s, 15 % apart (an estimate within 15 %).
BOUNDS: tuple[float, ...] = tuple(0.001 * 1.15**i for i in range(86))


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0  # answers with a 5xx status
    buckets: dict[int, int] = field(default_factory=dict)

    def fields(self) -> dict[str, int]:
        """The Redis hash fields this tally adds to."""
        values = {"requests": self.requests, "errors": self.errors}
        values.update({f"b{index}": count for index, count in self.buckets.items()})
        return {name: count for name, count in values.items() if count}

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for index, count in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + count


_tally = Tally()
_flushers: dict[int, asyncio.Task] = {}  # per event loop (id): one flusher task


def usage_record(status: int, seconds: float) -> None:
    """Counts one gateway answer in this process (called by the gateway's `_observe`)."""
    _tally.requests += 1
    if status >= 500:
        _tally.errors += 1
    index = bisect.bisect_left(BOUNDS, seconds)
    _tally.buckets[index] = _tally.buckets.get(index, 0) + 1
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop (a sync caller): the next `usage_flush` call sends it
    task = _flushers.get(id(loop))
    if task is None or task.done():
        for key in [key for key, other in _flushers.items() if other.done()]:
            del _flushers[key]  # flushers of loops that ended (test clients run a loop per request)
        _flushers[id(loop)] = loop.create_task(_flush_forever(), name="console-usage-flush")


def _take() -> Tally:
    global _tally
    taken, _tally = _tally, Tally()
    return taken


def usage_flush() -> None:
    """Adds this process's tally to the cluster-wide hash now (synchronously)."""
    import redis

    taken = _take()
    if not taken.requests:
        return
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        key = usage_key()
        with client.pipeline(transaction=False) as pipe:
            for name, count in taken.fields().items():
                pipe.hincrby(key, name, count)
            pipe.execute()
    except redis.RedisError as error:
        logger.warning("gateway usage not sent to Redis (kept for the next try): %s", error)
        _tally.merge(taken)


async def _flush_forever() -> None:
    import redis.asyncio as aioredis
    from redis import RedisError

    client = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            taken = _take()
            if not taken.requests:
                continue
            try:
                key = usage_key()
                async with client.pipeline(transaction=False) as pipe:
                    for name, count in taken.fields().items():
                        pipe.hincrby(key, name, count)
                    await pipe.execute()
            except (RedisError, OSError) as error:
                logger.warning("gateway usage not sent to Redis (kept for the next try): %s", error)
                _tally.merge(taken)
    finally:
        await client.aclose()


@dataclass
class Window:
    """What the cluster answered since the last sample."""

    requests: int
    errors: int
    p50: float | None  # seconds
    p99: float | None


def _percentile(buckets: dict[int, int], total: int, fraction: float) -> float | None:
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            return BOUNDS[min(index, len(BOUNDS) - 1)]
    return BOUNDS[-1]


def usage_take_window() -> Window:
    """Reads and clears the cluster-wide hash in one transaction (the health tick's sampler)."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(usage_key())
        pipe.delete(usage_key())
        raw, _ = pipe.execute()
    values = {name.decode(): int(count) for name, count in raw.items()}
    buckets = {int(name[1:]): count for name, count in values.items() if name.startswith("b")}
    total = sum(buckets.values())
    return Window(
        requests=values.get("requests", 0),
        errors=values.get("errors", 0),
        p50=_percentile(buckets, total, 0.50),
        p99=_percentile(buckets, total, 0.99),
    )
