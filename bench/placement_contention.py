"""Placement under contention: 500 concurrent placements against 50 nodes with tight VRAM, on real PostgreSQL
(QUALITY.md target: 0 over-commits, 0 duplicate slots, 0 errors other than clean "no capacity"; placements/s
reported). Each node is a real gRPC `WorkerControl` server in this process that answers `LoadReplica` at once,
so the figures are the control plane's own work: ranking, the node-row lock, the slot claim, eviction.

    .venv/bin/python bench/placement_contention.py [--nodes 50] [--placements 500] [--models 50] [--threads 16]

Uses its own database `bench_placement` on the embedded PostgreSQL (or on DATABASE_URL's server). Every node
has 10 GiB and 2 slots per model; every model needs 3 GiB, so 3 replicas fit a node and most placements find the
cluster full (they evict an idle replica of another model when that makes room, else fail with NoCapacity).
While they run, a separate session checks the invariants every few milliseconds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
DATABASE = "bench_placement"
GiB = 1024**3

from bench.benchdb import use_fresh_database  # noqa: E402


def _plain_connection():
    import psycopg
    from django.db import connection

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg.connect(**params, autocommit=True)


class Watcher(threading.Thread):
    """Checks the invariants from its own session until stopped."""

    def __init__(self) -> None:
        super().__init__(name="invariant-watcher", daemon=True)
        self.samples = 0
        self.overcommits: set = set()
        self.duplicates: set = set()
        self.over_cap: set = set()
        self.drift: set = set()
        self.stop = threading.Event()

    def run(self) -> None:
        from tests.reliability import invariants

        with _plain_connection() as conn, conn.cursor() as cursor:
            while not self.stop.is_set():
                found = invariants.check(cursor)
                self.samples += 1
                self.overcommits.update(row[0] for row in found.overcommits)
                self.duplicates.update(row[:3] for row in found.duplicates)
                self.over_cap.update(row[:2] for row in found.over_cap)
                self.drift.update(row[0] for row in found.drift)
                time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--placements", type=int, default=500)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--threads", type=int, default=16, help="concurrent schedulers (DB pool holds 20)")
    args = parser.parse_args()
    print("reproduce:", shlex.join([sys.executable, *sys.argv]), flush=True)

    use_fresh_database(DATABASE)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from nodes.choices import NodeStatus
    from nodes.models import ModelReplica, Node
    from scheduling.models import ModelConfig
    from scheduling.placement import NoCapacity
    from scheduling.services import replica_place
    from tests.reliability import invariants
    from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer

    call_command("migrate", verbosity=0)
    agent = FakeAgent()
    with FakeAgentServer(agent) as server:
        now = timezone.now()
        Node.objects.bulk_create(
            Node(
                name=f"node-{i:03d}",
                address=server.address,
                status=NodeStatus.HEALTHY,
                approved_at=now,
                last_heartbeat=now,
                worker_max_replicas_per_model=2,
                total_vram=10 * GiB,
                available_vram=10 * GiB,
            )
            for i in range(args.nodes)
        )
        models = [f"m-{i:03d}" for i in range(args.models)]
        ModelConfig.objects.bulk_create(
            ModelConfig(name=name, backend="echo", vram_bytes=3 * GiB) for name in models
        )
        print(
            f"cluster: {args.nodes} nodes x 10 GiB, 2 slots per model; {args.models} models x 3 GiB; "
            f"{args.placements} placements on {args.threads} threads",
            flush=True,
        )

        start = threading.Event()
        latencies: list[float] = []

        def one(model_name: str) -> str:
            start.wait()
            began = time.perf_counter()
            try:
                replica_place(model_name=model_name)
                return "placed"
            except NoCapacity:
                return "no_capacity"
            except Exception as error:
                return type(error).__name__
            finally:
                latencies.append(time.perf_counter() - began)
                connection.close()

        watcher = Watcher()
        watcher.start()
        with ThreadPoolExecutor(args.threads) as pool:
            futures = [pool.submit(one, models[i % args.models]) for i in range(args.placements)]
            time.sleep(0.2)  # every thread waiting at the start line
            began = time.perf_counter()
            start.set()
            outcomes = Counter(future.result() for future in futures)
            elapsed = time.perf_counter() - began
        watcher.stop.set()
        watcher.join()

        with _plain_connection() as conn, conn.cursor() as cursor:
            final = invariants.check(cursor)
            cursor.execute(invariants.IN_FLIGHT_SQL)
            in_flight = cursor.fetchone()[0]
        rows = ModelReplica.objects.count()

    errors = {kind: count for kind, count in outcomes.items() if kind not in ("placed", "no_capacity")}
    overcommits = len(watcher.overcommits | {row[0] for row in final.overcommits})
    duplicates = len(watcher.duplicates | {row[:3] for row in final.duplicates})
    latencies.sort()
    print(f"elapsed: {elapsed:.2f} s")
    print(f"placement attempts/s: {args.placements / elapsed:.0f}")
    print(f"successful placements/s: {outcomes['placed'] / elapsed:.0f}")
    print(
        f"outcomes: placed {outcomes['placed']}, no capacity (clean 503) {outcomes['no_capacity']}, "
        f"evictions {len(agent.stops)}, replicas at the end {rows} (capacity {args.nodes * 3})"
    )
    print(
        f"latency per placement: median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms"
    )
    print(f"invariant samples during the run: {watcher.samples}")
    print(f"over-commits: {overcommits}")
    print(f"duplicate slots: {duplicates}")
    print(f"slots over a node's cap: {len(watcher.over_cap | {row[:2] for row in final.over_cap})}")
    print(
        f"reservation drift (reserved != sum of unconfirmed rows): {len(watcher.drift | {r[0] for r in final.drift})}"
    )
    print(f"in-flight at the end: {in_flight}")
    print(f"errors by kind: {errors or 'none'}")
    if overcommits or duplicates or errors or final:
        sys.exit(1)


if __name__ == "__main__":
    main()
