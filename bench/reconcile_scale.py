"""Reconciler tick at scale: by default 1,000 nodes, 5,000 replicas, 300 rules in PostgreSQL; the documented
large size is 10,000 nodes, 30,000 replicas, 3,000 rules (targets: a steady tick <= 300 ms with a fixed number
of queries; a tick placing 300 replicas <= 3 queries per placement and <= 2 s of control-plane work). No agents:
only the agent's `LoadReplica`/`StopReplica` calls are replaced by instant answers, at the client boundary, so
the figures are the control plane's own work.

    .venv/bin/python bench/reconcile_scale.py [--nodes 1000] [--replicas 5000] [--rules 300] [--runs 7]
    .venv/bin/python bench/reconcile_scale.py --nodes 10000 --replicas 30000 --rules 3000 --runs 3

Rows: a steady tick (nothing to do); a tick with 10 % of the rules one replica short (one placement each);
then "lose 10 % of nodes": every tenth node goes offline with its replicas (as the health loop leaves it) and
ticks run until every rule is back at its minimum. Columns: wall time (median), statements on the tick's
connection (load threads use none), CPU of this process (every thread) and of the PostgreSQL server (every
process of it, read from /proc) — on a loaded machine the CPU columns are the steadier measure of the work.

Uses its own database `bench_reconcile` on the embedded PostgreSQL (or on DATABASE_URL's server).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
DATABASE = "bench_reconcile"

from bench.benchdb import use_fresh_database  # noqa: E402
from bench.pgcpu import postmaster_pid, process_cpu_seconds, server_cpu_seconds  # noqa: E402


def _populate(nodes: int, replicas: int, rules: int) -> None:
    from django.utils import timezone

    from nodes.choices import NodeStatus, ReplicaState
    from nodes.models import ModelReplica, Node, NodeLabel
    from scheduling.models import ModelConfig, SchedulingRule

    now = timezone.now()
    node_rows = Node.objects.bulk_create(
        Node(
            name=f"node-{i:04d}",
            address=f"127.0.0.1:{20000 + i}",
            status=NodeStatus.HEALTHY,
            approved_at=now,
            last_heartbeat=now,
            worker_max_replicas_per_model=8,
            total_vram=80 * 2**30,
            available_vram=80 * 2**30,
        )
        for i in range(nodes)
    )
    NodeLabel.objects.bulk_create(
        NodeLabel(node=node, key=key, value=value)
        for i, node in enumerate(node_rows)
        for key, value in (("zone", f"z{i % 4}"), ("gpu.vendor", "nvidia"), ("node.replica-slots", "8"))
    )
    models = [f"model-{i:03d}" for i in range(rules)]
    ModelConfig.objects.bulk_create(ModelConfig(name=name, backend="echo") for name in models)
    counts = dict.fromkeys(models, 0)
    rows = []
    for i in range(replicas):
        model = models[i % rules]
        node = node_rows[(i * 7 + i // rules) % nodes]
        rows.append(
            ModelReplica(
                node=node,
                model_name=model,
                replica_index=counts[model] // nodes,
                state=ReplicaState.LOADED,
                address=f"127.0.0.1:{30000 + i}",
                loaded_at=now,
                last_used=now,
                last_seen_at=now,
            )
        )
        counts[model] += 1
    ModelReplica.objects.bulk_create(rows, batch_size=2000)
    SchedulingRule.objects.bulk_create(
        SchedulingRule(
            model_name=name, min_replicas=counts[name], max_replicas=0, node_selector={"gpu.vendor": "nvidia"}
        )
        for name in models
    )


def _fake_agent_calls() -> None:
    """Instant LoadReplica/StopReplica answers at the client boundary (this bench has no agents)."""
    from worker_client import client

    def load_replica(
        self,
        model_name,
        replica_index,
        backend,
        model_options=None,
        vram_bytes=0,
        load_timeout=300.0,
        *,
        files=(),
        download_timeout=0.0,
    ):
        return client.LoadResult(f"{model_name}#{replica_index}", "127.0.0.1:1", 1, 0.0)

    client.WorkerControlClient.load_replica = load_replica
    client.WorkerControlClient.stop_replica = lambda self, id: [id]


_POSTMASTER = 0


def _timed_tick():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from scheduling.reconciler import reconcile_tick

    global _POSTMASTER
    if not _POSTMASTER:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            _POSTMASTER = postmaster_pid(cursor.fetchone()[0])
    with CaptureQueriesContext(connection) as captured:
        pg_before, cpu_before = server_cpu_seconds(_POSTMASTER), process_cpu_seconds()
        started = time.perf_counter()
        report = reconcile_tick()
        elapsed = time.perf_counter() - started
        cpu = process_cpu_seconds() - cpu_before
        pg = server_cpu_seconds(_POSTMASTER) - pg_before
    return Tick(elapsed, len(captured.captured_queries), report, cpu, pg)


@dataclass
class Tick:
    elapsed: float
    queries: int
    report: object
    cpu: float
    pg: float


def _lose_nodes(percent: int) -> int:
    """Every node whose number is a multiple of 100/percent goes offline and loses its replica rows (what the
    health loop leaves of a node that stopped heartbeating); answers how many replicas went."""
    from nodes.choices import NodeStatus
    from nodes.models import ModelReplica, Node

    step = max(100 // percent, 1)
    names = [f"node-{i:04d}" for i in range(0, Node.objects.count(), step)]
    lost, _ = ModelReplica.objects.filter(node__name__in=names).delete()
    Node.objects.filter(name__in=names).update(status=NodeStatus.OFFLINE)
    return lost


def _short_rules() -> int:
    """How many rules have fewer live replicas than their minimum."""
    from django.db.models import Count

    from nodes.models import ModelReplica
    from scheduling.models import SchedulingRule

    counts = dict(
        ModelReplica.objects.filter(state__in=["loading", "loaded"])
        .order_by()
        .values_list("model_name")
        .annotate(n=Count("id"))
    )
    return sum(
        1
        for name, minimum in SchedulingRule.objects.values_list("model_name", "min_replicas")
        if counts.get(name, 0) < minimum
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=5000)
    parser.add_argument("--rules", type=int, default=300)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print("reproduce:", shlex.join([sys.executable, *sys.argv]), flush=True)

    use_fresh_database(DATABASE)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    _fake_agent_calls()
    _populate(args.nodes, args.replicas, args.rules)
    from nodes.models import ModelReplica
    from scheduling.models import SchedulingRule

    print(
        f"cluster: {args.nodes} nodes, {ModelReplica.objects.count()} replicas, "
        f"{SchedulingRule.objects.count()} rules",
        flush=True,
    )
    _timed_tick()  # warm-up: connections, caches

    steady = [_timed_tick() for _ in range(args.runs)]
    assert all(not t.report.placed and not t.report.trimmed for t in steady), (
        "the steady cluster was not steady"
    )

    below = max(args.rules // 10, 1)
    below_runs = []
    for _ in range(args.runs):
        chosen = list(SchedulingRule.objects.order_by("model_name")[:below])
        before = set(ModelReplica.objects.values_list("id", flat=True))
        SchedulingRule.objects.filter(pk__in=[r.pk for r in chosen]).update(
            min_replicas=django.db.models.F("min_replicas") + 1
        )
        below_runs.append(_timed_tick())
        # Back to the steady state (not timed).
        ModelReplica.objects.exclude(id__in=before).delete()
        SchedulingRule.objects.filter(pk__in=[r.pk for r in chosen]).update(
            min_replicas=django.db.models.F("min_replicas") - 1
        )
    placed = [len(t.report.placed) for t in below_runs]
    failed = [f for t in below_runs for f in t.report.failed]
    assert not failed, f"placements failed (the bench would time failures, not loads): {failed[:3]}"

    lost = _lose_nodes(10)
    loss_ticks = []
    while len(loss_ticks) < 5:
        tick = _timed_tick()
        loss_ticks.append(tick)
        if not tick.report.placed:
            break
    short_after = _short_rules()

    def row(name, runs, per_placement=0):
        median = statistics.median
        times = [t.elapsed * 1000 for t in runs]
        queries = sorted({t.queries for t in runs})
        cpu = median(t.cpu * 1000 for t in runs)
        pg = median(t.pg * 1000 for t in runs)
        line = (
            f"| {name:<40} | {median(times):9.1f} | {min(times):9.1f} | {max(times):9.1f} | "
            f"{','.join(map(str, queries)):>9} | {cpu:9.1f} | {pg:9.1f} |"
        )
        if per_placement:
            q = median(t.queries for t in runs) / per_placement
            line += f" {q:5.2f} q, {(cpu + pg) / per_placement:6.2f} ms CPU per placement"
        print(line)

    print(f"runs: {args.runs} each")
    print(
        "| tick                                     | median ms |    min ms |    max ms |   queries |"
        " bench CPU ms | PG CPU ms |"
    )
    print("|" + "---|" * 7)
    row("steady (nothing to do)", steady)
    row(f"{below} rules one replica short", below_runs, per_placement=max(placed) if placed else 0)
    for number, tick in enumerate(loss_ticks, 1):
        row(
            f"lost 10 % of nodes: tick {number}, placed {len(tick.report.placed)}",
            [tick],
            per_placement=len(tick.report.placed),
        )
    print(f"placed per below-min tick: {sorted(set(placed))}")
    restored = next((i for i, t in enumerate(loss_ticks, 1) if not t.report.placed), None)
    print(
        f"lost 10 % of nodes: {lost} replicas gone; rules short after the ticks: {short_after}; "
        f"ticks until nothing more to place: {restored}"
    )


if __name__ == "__main__":
    main()
