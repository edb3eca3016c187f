"""The overview's samples: the health tick stores one `MetricSample` per tick and prunes those older than
`LOCALAI_METRICS_RETENTION`; the overview page reads the last hour as chart columns."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce

from console.models import MetricSample
from console.usage import usage_take_window
from nodes.choices import NodeStatus, ReplicaState
from nodes.models import ModelReplica, Node

logger = logging.getLogger(__name__)

WINDOW = timedelta(hours=1)


def metric_sample_take(*, now: datetime) -> MetricSample | None:
    """Stores one sample (four statements and one Redis transaction, whatever the size of the cluster) and
    prunes old ones. A fault is logged and the tick goes on: charts must never stop the health monitor."""
    try:
        return _take(now)
    except Exception:
        logger.exception("metrics sample not stored")
        return None


def _take(now: datetime) -> MetricSample:
    previous = MetricSample.objects.filter(at__lt=now).order_by("-at").values_list("at", flat=True).first()
    interval = (now - previous).total_seconds() if previous else settings.LOCALAI_HEALTH_CHECK_INTERVAL
    window = usage_take_window()
    replicas = ModelReplica.objects.aggregate(
        in_flight=Coalesce(Sum("in_flight"), 0),
        loaded=Count("id", filter=Q(state=ReplicaState.LOADED)),
    )
    nodes = {
        name: {"used": max(0, total - available), "reserved": reserved, "total": total}
        for name, total, available, reserved in Node.objects.exclude(status=NodeStatus.OFFLINE)
        .order_by("name")
        .values_list("name", "total_vram", "available_vram", "reserved_vram")
    }
    sample = MetricSample.objects.create(
        at=now,
        interval_seconds=max(interval, 0.001),
        requests=window.requests,
        errors=window.errors,
        latency_p50_ms=None if window.p50 is None else window.p50 * 1000,
        latency_p99_ms=None if window.p99 is None else window.p99 * 1000,
        in_flight=replicas["in_flight"],
        loaded_replicas=replicas["loaded"],
        nodes=nodes,
    )
    MetricSample.objects.filter(at__lt=now - timedelta(seconds=settings.LOCALAI_METRICS_RETENTION)).delete()
    return sample


def overview_series(*, now: datetime, window: timedelta = WINDOW) -> dict[str, Any]:
    """The last hour as uPlot columns (one query): `t` (epoch seconds) and one list per chart; `nodes` maps a
    node's name to its `used` and `reserved` VRAM lists (None where the node was absent)."""
    rows = list(
        MetricSample.objects.filter(at__gte=now - window)
        .order_by("at")
        .values_list(
            "at",
            "interval_seconds",
            "requests",
            "errors",
            "latency_p50_ms",
            "latency_p99_ms",
            "in_flight",
            "loaded_replicas",
            "nodes",
        )
    )
    names = sorted({name for row in rows for name in row[8]})
    series: dict[str, Any] = {
        "t": [],
        "rps": [],
        "error_rate": [],
        "p50_ms": [],
        "p99_ms": [],
        "in_flight": [],
        "loaded": [],
        "nodes": {name: {"used": [], "reserved": []} for name in names},
    }
    for at, interval, requests, errors, p50, p99, in_flight, loaded, nodes in rows:
        series["t"].append(at.timestamp())
        series["rps"].append(round(requests / interval, 3) if interval else 0)
        series["error_rate"].append(round(100 * errors / requests, 2) if requests else None)
        series["p50_ms"].append(p50)
        series["p99_ms"].append(p99)
        series["in_flight"].append(in_flight)
        series["loaded"].append(loaded)
        for name in names:
            node = nodes.get(name)
            series["nodes"][name]["used"].append(node["used"] if node else None)
            series["nodes"][name]["reserved"].append(node["reserved"] if node else None)
    return series
