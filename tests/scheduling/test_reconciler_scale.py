"""The reconciler on a large cluster (issue 16): the ranked heap instead of judging every node, one batch
claim for the tick, and decision records of the same shape (the chosen node, the next by rank, the others
counted by verdict)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from nodes.choices import NodeStatus
from nodes.models import ModelReplica, Node, NodeLabel
from scheduling.choices import Outcome, Verdict
from scheduling.decisions import MAX_RECORDED_NODES
from scheduling.models import PlacementDecision
from scheduling.reconciler import FAST_PATH_MIN_NODES, reconcile_tick
from tests.factories import ModelConfigFactory, RuleFactory

pytestmark = pytest.mark.django_db
GiB = 1024**3
NODES = FAST_PATH_MIN_NODES + 44  # 300: the large-cluster path


def cluster(agent) -> None:
    """300 nodes, the first ones with the most free VRAM; 10 of them draining, 20 without the rule's label."""
    now = timezone.now()
    nodes = Node.objects.bulk_create(
        Node(
            name=f"n{i:03d}",
            address=agent.address,
            status=NodeStatus.DRAINING if i % 30 == 29 else NodeStatus.HEALTHY,
            approved_at=now,
            last_heartbeat=now,
            worker_max_replicas_per_model=2,
            total_vram=80 * GiB,
            available_vram=(80 - i % 70) * GiB,
        )
        for i in range(NODES)
    )
    NodeLabel.objects.bulk_create(
        NodeLabel(node=node, key="gpu", value="a100" if i % 15 else "h100") for i, node in enumerate(nodes)
    )


def test_a_large_tick_places_on_the_best_nodes_in_a_fixed_number_of_statements(agent):
    cluster(agent)
    for name in ("a", "b", "c"):
        ModelConfigFactory(name=name, vram_bytes=30 * GiB)
        RuleFactory(model_name=name, min_replicas=2, node_selector={"gpu": "a100"})
    with CaptureQueriesContext(connection) as captured:
        report = reconcile_tick()
    assert len(report.placed) == 6, report.failed
    hosts = {
        name: sorted(ModelReplica.objects.filter(model_name=name).values_list("node__name", flat=True))
        for name in ("a", "b", "c")
    }
    # Most free VRAM first among the nodes the selector lets through (80 GiB: n070, n140, n280 — n000 and n210
    # carry h100), one replica per node, and each model counts what the models before it reserved in this
    # tick: after `a` took 30 GiB on n070 and n140 (50 GiB left), `b` goes to n280 (80) and n001 (79), then
    # `c` to n071 and n141 (79) — on the stale snapshot all three would have stacked on n070 and n140.
    assert hosts == {"a": ["n070", "n140"], "b": ["n001", "n280"], "c": ["n071", "n141"]}
    # The tick's statements: a fixed number (lock, snapshot, catalog, backoffs, the one claim transaction,
    # records: 22 today) plus one per placement (its load's outcome) — not the 7 per placement of one claim
    # transaction each.
    assert len(captured.captured_queries) <= 24 + 6, [q["sql"][:80] for q in captured.captured_queries]
    record = PlacementDecision.objects.filter(outcome=Outcome.PLACED, model_name="a").order_by("id").first()
    assert len(record.candidates) == MAX_RECORDED_NODES
    assert record.candidates[0]["verdict"] == Verdict.CHOSEN
    assert {c["verdict"] for c in record.candidates[1:]} == {Verdict.RANKED_LOWER}
    assert record.omitted[Verdict.DRAINING] == 10
    assert record.omitted[Verdict.SELECTOR_MISMATCH] == 20
    assert sum(record.omitted.values()) + len(record.candidates) == NODES
