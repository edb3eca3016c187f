"""Placement decision records: what the pipeline decided and why, node by node (scheduling.pipeline).

Written by the placement paths (request cold path, reconciler, burst), evictions, trims and breaker trips —
never by a warm request — and pruned by the health loop. A failed write is logged and never fails the
placement it describes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import DateTimeField, Value
from django.utils import timezone

from scheduling.models import PlacementDecision

logger = logging.getLogger(__name__)

# Nodes listed per record (a decision on a 1,000-node cluster would otherwise store 1,000 lines each time);
# the others are counted per verdict in `omitted`. The dry run (`GET /api/plan`) lists every node.
MAX_RECORDED_NODES = 64


def _bounded(candidates: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    listed = [dict(candidate) for candidate in candidates[:MAX_RECORDED_NODES]]
    omitted: dict[str, int] = {}
    for candidate in candidates[MAX_RECORDED_NODES:]:
        omitted[candidate["verdict"]] = omitted.get(candidate["verdict"], 0) + 1
    return listed, omitted


@dataclass(frozen=True)
class DecisionRecord:
    """One record to write (see `PlacementDecision`)."""

    model_name: str
    trigger: str
    outcome: str
    node_name: str = ""
    replica_index: int | None = None
    duration: float = 0.0
    message: str = ""
    candidates: Sequence[Mapping[str, str]] = field(default_factory=list)
    # Nodes the caller left out of `candidates`, counted by verdict (added to those beyond the bound).
    omitted: Mapping[str, int] | None = None


def decisions_record(*, records: Iterable[DecisionRecord], now: datetime | None = None) -> int:
    """Writes the records in one statement; answers how many. Database errors are logged, not raised."""
    when = now or timezone.now()
    rows = []
    for record in records:
        listed, omitted = _bounded(record.candidates)
        for verdict, count in (record.omitted or {}).items():
            omitted[verdict] = omitted.get(verdict, 0) + count
        rows.append(
            PlacementDecision(
                # An expression here keeps the insert a plain multi-row VALUES: Django's UNNEST form for literal
                # rows sends the JSON columns as text arrays, which psycopg escapes character by character in
                # Python (about 10 ms per record of 64 candidates, measured by bench/reconcile_scale.py).
                created_at=Value(when, output_field=DateTimeField()),
                model_name=record.model_name[:255],
                trigger=record.trigger,
                outcome=record.outcome,
                node_name=record.node_name[:255],
                replica_index=record.replica_index,
                duration=max(record.duration, 0.0),
                message=record.message,
                candidates=listed,
                omitted=omitted,
            )
        )
    if not rows:
        return 0
    try:
        with transaction.atomic():
            PlacementDecision.objects.bulk_create(rows)
    except DatabaseError:
        logger.exception("recording %d placement decision(s) failed", len(rows))
        return 0
    return len(rows)


def decision_record(**fields: Any) -> int:
    """`decisions_record` of one record."""
    return decisions_record(records=[DecisionRecord(**fields)])


def decisions_prune(*, now: datetime | None = None) -> int:
    """Deletes records older than `LOCALAI_DECISION_RETENTION`, then the oldest beyond
    `LOCALAI_DECISION_MAX_ROWS`; answers how many went."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.LOCALAI_DECISION_RETENTION)
    deleted, _ = PlacementDecision.objects.filter(created_at__lt=cutoff).delete()
    keep = settings.LOCALAI_DECISION_MAX_ROWS
    boundary = list(
        PlacementDecision.objects.order_by("-created_at", "-id").values_list("created_at", "id")[
            keep : keep + 1
        ]
    )
    if boundary:
        created_at, row_id = boundary[0]
        extra, _ = (
            PlacementDecision.objects.filter(created_at__lte=created_at)
            .exclude(created_at=created_at, id__gt=row_id)
            .delete()
        )
        deleted += extra
    return deleted
