"""`/metrics` and `cluster_status`."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.test import Client

from localai_cluster import metrics
from nodes.choices import NodeStatus, ReplicaState
from tests.factories import GiB, NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db


def test_metrics_expose_database_gauges_and_counters(django_assert_max_num_queries):
    alpha = NodeFactory(name="alpha", total_vram=24 * GiB, available_vram=20 * GiB, reserved_vram=3 * GiB)
    NodeFactory(name="beta", status=NodeStatus.PENDING, approved_at=None)
    ReplicaFactory(node=alpha, model_name="org/m:v1", replica_index=0, in_flight=2)
    ReplicaFactory(
        node=alpha, model_name="org/m:v1", replica_index=1, in_flight=1, state=ReplicaState.LOADING
    )
    metrics.PLACEMENTS.labels("org/m:v1").inc()
    metrics.PLACEMENT_FAILURES.labels("org/m:v1", "no_capacity").inc()
    metrics.BREAKER_TRIPS.labels("org/m:v1").inc()
    metrics.TICK_DURATION.labels("reconcile").observe(0.02)
    metrics.GATEWAY_REQUESTS.labels("org/m:v1", "chat.completions", "200").inc()
    metrics.GATEWAY_LATENCY.labels("org/m:v1", "chat.completions").observe(0.1)

    with django_assert_max_num_queries(4):
        response = Client().get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    expected = {
        'localai_cluster_nodes{status="healthy"}': 1,
        'localai_cluster_nodes{status="pending"}': 1,
        'localai_cluster_nodes{status="offline"}': 0,
        'localai_cluster_replicas{model="org/m:v1",state="loaded"}': 1,
        'localai_cluster_replicas{model="org/m:v1",state="loading"}': 1,
        'localai_cluster_in_flight_requests{model="org/m:v1"}': 3,
        'localai_cluster_node_vram_total_bytes{node="alpha"}': 24 * GiB,
        'localai_cluster_node_vram_reserved_bytes{node="alpha"}': 3 * GiB,
        "localai_cluster_vram_reserved_bytes": 3 * GiB,
        "localai_cluster_database_up": 1,
    }
    for name, value in expected.items():
        assert float(samples[name]) == value, name
    for name in (
        'localai_cluster_placements_total{model="org/m:v1"}',
        'localai_cluster_placement_failures_total{model="org/m:v1",reason="no_capacity"}',
        'localai_cluster_breaker_trips_total{model="org/m:v1"}',
        'localai_cluster_tick_duration_seconds_count{loop="reconcile"}',
        'localai_cluster_gateway_requests_total{endpoint="chat.completions",model="org/m:v1",status="200"}',
        'localai_cluster_gateway_request_duration_seconds_count{endpoint="chat.completions",model="org/m:v1"}',
    ):
        assert name in text, name
    assert Client().post("/metrics").status_code == 405


def test_cluster_status_prints_nodes_and_replicas():
    node = NodeFactory(
        name="gpu-1", total_vram=24 * GiB, available_vram=20 * GiB, reserved_vram=GiB, max_replicas_override=3
    )
    ReplicaFactory(node=node, model_name="org/m:v1", replica_index=1, in_flight=2)
    out = io.StringIO()
    call_command("cluster_status", stdout=out)
    text = out.getvalue()
    assert "Nodes (1)" in text and "Replicas (1)" in text
    node_line = next(line for line in text.splitlines() if line.startswith("gpu-1"))
    assert "healthy" in node_line and "3 (override)" in node_line
    assert "4.0 GiB" in node_line and "1.0 GiB" in node_line and "24.0 GiB" in node_line
    assert any(
        line.startswith("org/m:v1") and "gpu-1" in line and "loaded" in line for line in text.splitlines()
    )


def test_cluster_status_empty():
    out = io.StringIO()
    call_command("cluster_status", stdout=out)
    assert "Nodes (0)" in out.getvalue() and "(none)" in out.getvalue()
