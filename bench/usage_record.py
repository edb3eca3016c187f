"""What the overview's request tally (`console.usage.usage_record`) adds to each gateway answer, next to the
Prometheus counter and histogram `_observe` already updates. Run: `.venv/bin/python bench/usage_record.py`."""

from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")

import django

django.setup()

from console import usage  # noqa: E402
from localai_cluster import metrics  # noqa: E402

N = 100_000


def per_call(work) -> float:
    best = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(N):
            work()
        best.append((time.perf_counter() - started) / N * 1e9)
    return min(best)


def prometheus() -> None:
    metrics.GATEWAY_REQUESTS.labels("m", "chat.completions", "200").inc()
    metrics.GATEWAY_LATENCY.labels("m", "chat.completions").observe(0.0123)


async def main() -> None:
    usage.FLUSH_INTERVAL = 3600  # the flusher sleeps: only the in-memory tally is measured
    tally = per_call(lambda: usage.usage_record(200, 0.0123))
    prom = per_call(prometheus)
    print(f"usage_record: {tally:.0f} ns per answer; Prometheus counter + histogram: {prom:.0f} ns")
    print("command: .venv/bin/python bench/usage_record.py")
    for task in usage._flushers.values():
        task.cancel()


asyncio.run(main())
