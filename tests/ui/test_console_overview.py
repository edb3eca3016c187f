"""The overview `/ui/` (issue 17 item 3): one sample per health tick in a bounded table
(`LOCALAI_METRICS_RETENTION`), gateway counts and latency summed over every web process through Redis, the last
hour as chart columns; queries fixed whatever the number of nodes and samples."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.test import Client
from django.utils import timezone

from console import usage
from console.models import MetricSample
from console.samples import metric_sample_take
from nodes.choices import NodeStatus, ReplicaState
from scheduling.health import health_tick
from tests.factories import NodeFactory, ReplicaFactory

pytestmark = pytest.mark.django_db

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_usage() -> None:
    """Nothing left from other tests of this process: the tally is flushed and the hash emptied."""
    usage.usage_flush()
    usage.usage_take_window()


def hash_now() -> dict[str, int]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    return {name.decode(): int(count) for name, count in client.hgetall(usage.usage_key()).items()}


def test_a_sample_sums_every_process_and_reads_the_cluster() -> None:
    for _ in range(96):
        usage.usage_record(200, 0.010)
    usage.usage_record(503, 0.020)
    usage.usage_record(404, 0.002)
    usage.usage_record(200, 2.0)
    usage.usage_record(502, 3.0)
    usage.usage_flush()
    # Another web process's flush lands in the same hash: 100 more answers at 10 ms.
    redis.Redis.from_url(settings.REDIS_URL).hincrby(usage.usage_key(), "requests", 100)
    index = next(i for i, bound in enumerate(usage.BOUNDS) if bound >= 0.010)
    redis.Redis.from_url(settings.REDIS_URL).hincrby(usage.usage_key(), f"b{index}", 100)
    assert hash_now()["requests"] == 200

    gpu = NodeFactory(name="gpu-a", total_vram=24 * GIB, available_vram=20 * GIB, reserved_vram=2 * GIB)
    NodeFactory(name="gpu-b", total_vram=48 * GIB, available_vram=48 * GIB)
    NodeFactory(name="gone", status=NodeStatus.OFFLINE, total_vram=8 * GIB)
    ReplicaFactory(node=gpu, model_name="m", replica_index=0, in_flight=3)
    ReplicaFactory(node=gpu, model_name="m", replica_index=1, in_flight=1)
    ReplicaFactory(node=gpu, model_name="n", replica_index=0, state=ReplicaState.LOADING)
    now = timezone.now()
    MetricSample.objects.create(at=now - timedelta(seconds=20), interval_seconds=15)

    sample = metric_sample_take(now=now)
    assert sample is not None
    assert sample.interval_seconds == pytest.approx(20)
    assert (sample.requests, sample.errors) == (200, 2)
    # 196 answers at 10 ms, one each at 2 ms, 20 ms, 2 s and 3 s: p50 in the 10 ms bucket (an estimate
    # within the buckets' 15 %), p99 (the 198th) at 20 ms.
    assert 10 <= sample.latency_p50_ms <= 11.5
    assert 20 <= sample.latency_p99_ms <= 23
    assert (sample.in_flight, sample.loaded_replicas) == (4, 2)
    assert sample.nodes == {
        "gpu-a": {"used": 4 * GIB, "reserved": 2 * GIB, "total": 24 * GIB},
        "gpu-b": {"used": 0, "reserved": 0, "total": 48 * GIB},
    }
    assert hash_now() == {}  # taken: the next sample counts only what came after
    quiet = metric_sample_take(now=now + timedelta(seconds=15))
    assert (quiet.requests, quiet.errors, quiet.latency_p50_ms, quiet.latency_p99_ms) == (0, 0, None, None)


def test_the_health_tick_stores_one_sample_and_prunes_by_retention(settings) -> None:
    settings.LOCALAI_METRICS_RETENTION = 3600
    now = timezone.now()
    old = MetricSample.objects.create(at=now - timedelta(hours=1, seconds=1), interval_seconds=15)
    kept = MetricSample.objects.create(at=now - timedelta(minutes=59), interval_seconds=15)
    usage.usage_record(200, 0.005)
    usage.usage_flush()
    report = health_tick(now=now)
    assert not report.skipped
    assert not MetricSample.objects.filter(pk=old.pk).exists()
    assert MetricSample.objects.filter(pk=kept.pk).exists()
    new = MetricSample.objects.get(at=now)
    assert new.requests == 1


def test_a_redis_outage_costs_samples_not_the_tick_nor_the_counts(settings) -> None:
    usage.usage_record(200, 0.005)
    good_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    usage.usage_flush()  # fails: the tally is kept
    assert usage._tally.requests == 1
    report = health_tick(now=timezone.now())
    assert not report.skipped and not MetricSample.objects.exists()
    settings.REDIS_URL = good_url
    usage.usage_flush()
    assert hash_now()["requests"] == 1


def test_overview_page_and_samples_with_fixed_queries(
    staff_client: Client, django_assert_max_num_queries
) -> None:
    now = timezone.now()

    def populate(nodes: int, samples: int) -> None:
        names = [NodeFactory(total_vram=8 * GIB, available_vram=6 * GIB).name for _ in range(nodes)]
        for index in range(samples):
            MetricSample.objects.create(
                at=now - timedelta(seconds=15 * (index + 1)),
                interval_seconds=15,
                requests=30,
                errors=3,
                latency_p50_ms=12.5,
                latency_p99_ms=80,
                in_flight=2,
                loaded_replicas=len(names),
                nodes={name: {"used": 2 * GIB, "reserved": GIB, "total": 8 * GIB} for name in names},
            )

    populate(1, 2)
    # session, user, two for the stat cards
    with django_assert_max_num_queries(4):
        html = staff_client.get("/ui/").content.decode()
    assert 'data-chart="rps"' in html and 'data-chart="vram"' in html
    assert 'href="/ui/nodes/"' in html  # the nodes page, one click away
    with django_assert_max_num_queries(3):  # session, user, the samples
        staff_client.get("/ui/overview/samples")
    populate(20, 230)
    with django_assert_max_num_queries(4):
        staff_client.get("/ui/")
    with django_assert_max_num_queries(3):
        data = staff_client.get("/ui/overview/samples").json()
    assert len(data["t"]) == 232 and data["t"] == sorted(data["t"])
    assert data["rps"][-1] == 2.0 and data["error_rate"][-1] == 10.0
    assert data["p50_ms"][-1] == 12.5 and data["p99_ms"][-1] == 80
    assert len(data["nodes"]) == 21
    first = sorted(data["nodes"])[0]
    assert data["nodes"][first]["used"][-1] in (2 * GIB, None)


def test_samples_older_than_an_hour_are_not_charted(staff_client: Client) -> None:
    now = timezone.now()
    MetricSample.objects.create(at=now - timedelta(minutes=61), interval_seconds=15, requests=1)
    MetricSample.objects.create(at=now - timedelta(minutes=1), interval_seconds=15, requests=0)
    data = staff_client.get("/ui/overview/samples").json()
    assert len(data["t"]) == 1 and data["error_rate"] == [None]


def test_staff_only(client: Client, plain_client: Client) -> None:
    assert client.get("/ui/").status_code == 302
    assert client.get("/ui/overview/samples").status_code == 302
    assert plain_client.get("/ui/").status_code == 403
    assert plain_client.get("/ui/overview/samples").status_code == 403


@pytest.mark.parametrize(("value", "ok"), [("2h", "7200.0"), ("a day", None), ("30s", None)])
def test_retention_setting(value: str, ok: str | None) -> None:
    code = "from django.conf import settings; import localai_cluster.settings as s; print(s.LOCALAI_METRICS_RETENTION)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "LOCALAI_METRICS_RETENTION": value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-1] == ok
    else:
        assert result.returncode != 0 and "LOCALAI_METRICS_RETENTION" in result.stderr
