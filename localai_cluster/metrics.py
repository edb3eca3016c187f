"""Prometheus metrics: counters and histograms other code increments, and gauges read from the database at
scrape time. Served at `GET /metrics` (Prometheus text format, no authentication: bind it to a scrape
network). Names and labels are listed in docs/internal-interfaces.md ("metrics").

Counters and histograms live in the memory of the process that increments them. With several web or Celery
processes, set `PROMETHEUS_MULTIPROC_DIR` to an empty, writable directory shared by all of them (before they
start): prometheus-client then writes every process's values there and `/metrics` aggregates them. Without
it, each process exposes only its own counters (the database gauges are always cluster-wide).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# --- incremented by the code (import and call .labels(...).inc() / .observe(...)) ----------------------

PLACEMENTS = Counter(
    "localai_cluster_placements",
    "Replicas placed (a slot claimed and the load succeeded).",
    ["model"],
)
PLACEMENT_FAILURES = Counter(
    "localai_cluster_placement_failures",
    "Placements that failed; reason is e.g. no_capacity, load_failed, agent_unreachable.",
    ["model", "reason"],
)
BREAKER_TRIPS = Counter(
    "localai_cluster_breaker_trips",
    "Times a scheduling rule's circuit breaker opened (unsatisfiable_until set).",
    ["model"],
)
TICK_DURATION = Histogram(
    "localai_cluster_tick_duration_seconds",
    "Duration of one loop tick; loop is reconcile or health.",
    ["loop"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GATEWAY_REQUESTS = Counter(
    "localai_cluster_gateway_requests",
    "Requests answered by the /v1 gateway; model a catalog name (authenticated, model found) or unknown, "
    "endpoint e.g. chat.completions, status the HTTP status code.",
    ["model", "endpoint", "status"],
)
GATEWAY_LATENCY = Histogram(
    "localai_cluster_gateway_request_duration_seconds",
    "Time from receiving a /v1 request to its last byte; model a catalog name or unknown.",
    ["model", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
GATEWAY_OPTIMISTIC_CALLS = Counter(
    "localai_cluster_gateway_optimistic_calls",
    "Backend calls the gateway started before their claim answered (optimistic dispatch); outcome used (the "
    "claim picked that replica), discarded (it picked another, none, or refused the key: the call was "
    "cancelled) or failed (the call was made again on the claimed replica).",
    ["outcome"],
)


# --- read from the database at scrape time -----------------------------------------------------------------


class ClusterCollector(Collector):
    """Gauges computed from the registry when scraped, in a fixed number of queries: nodes by status, replicas
    by model and state, in-flight per model, and VRAM (total, available, reserved) per node."""

    def collect(self) -> Iterator[Metric]:
        from django.db import DatabaseError

        from localai_cluster.db_router import replica_reads

        try:
            with replica_reads():  # gauges may lag by the replica's replication (DATABASE_REPLICA_URL)
                metrics = list(self._collect())
        except DatabaseError:
            logger.warning("metrics: the database could not be read", exc_info=True)
            metrics = []
        yield from metrics
        yield GaugeMetricFamily(
            "localai_cluster_database_up",
            "1 when the gauges could be read from the database.",
            value=int(bool(metrics)),
        )

    def _collect(self) -> Iterator[Metric]:
        from django.db.models import Count, Sum

        from nodes.choices import NodeStatus
        from nodes.models import ModelReplica, Node

        nodes = GaugeMetricFamily("localai_cluster_nodes", "Nodes by status.", labels=["status"])
        counts = dict(Node.objects.order_by().values_list("status").annotate(n=Count("id")))
        for status in NodeStatus.values:
            nodes.add_metric([status], counts.get(status, 0))
        yield nodes

        replicas = GaugeMetricFamily(
            "localai_cluster_replicas", "Replica rows by model and state.", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "localai_cluster_in_flight_requests", "Requests in flight per model.", labels=["model"]
        )
        per_model: dict[str, int] = {}
        rows = (
            ModelReplica.objects.order_by()
            .values_list("model_name", "state")
            .annotate(n=Count("id"), busy=Sum("in_flight"))
        )
        for model_name, state, n, busy in rows:
            replicas.add_metric([model_name, state], n)
            per_model[model_name] = per_model.get(model_name, 0) + (busy or 0)
        for model_name, busy in sorted(per_model.items()):
            in_flight.add_metric([model_name], busy)
        yield replicas
        yield in_flight

        labels = ["node"]
        total = GaugeMetricFamily(
            "localai_cluster_node_vram_total_bytes", "Total VRAM per node.", labels=labels
        )
        available = GaugeMetricFamily(
            "localai_cluster_node_vram_available_bytes", "Free VRAM the node reported.", labels=labels
        )
        reserved = GaugeMetricFamily(
            "localai_cluster_node_vram_reserved_bytes", "VRAM reserved by loads in progress.", labels=labels
        )
        for name, t, a, r in Node.objects.order_by("name").values_list(
            "name", "total_vram", "available_vram", "reserved_vram"
        ):
            total.add_metric([name], t)
            available.add_metric([name], a)
            reserved.add_metric([name], r)
        yield total
        yield available
        yield reserved
        yield GaugeMetricFamily(
            "localai_cluster_vram_reserved_bytes",
            "VRAM reserved cluster-wide.",
            value=Node.objects.aggregate(s=Sum("reserved_vram"))["s"] or 0,
        )


def render() -> tuple[bytes, str]:
    """The exposition text of every metric (process or multiprocess counters plus the database gauges)."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REGISTRY)  # a registry is a collector of everything registered in it
    registry.register(ClusterCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_view(request):
    """`GET /metrics`."""
    from django.http import HttpResponse, HttpResponseNotAllowed

    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    body, content_type = render()
    return HttpResponse(body, content_type=content_type)
