"""The overview's request counts come from the real gateway (issue 17 item 3): answers of the live control
plane are tallied in its process, flushed to Redis by its event loop, and taken by the health tick into one
sample, errors (5xx) apart; nothing is counted twice."""

from __future__ import annotations

import httpx
import pytest
import redis
from django.conf import settings

from console import usage
from console.models import MetricSample
from scheduling.health import health_tick
from tests.conftest import wait_until
from tests.e2e.gateway_support import start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def flushed_requests() -> int:
    value = redis.Redis.from_url(settings.REDIS_URL).hget(usage.usage_key(), "requests")
    return int(value or 0)


def test_gateway_answers_become_one_sample(cp_server, start_agents) -> None:
    usage.usage_flush()
    usage.usage_take_window()
    start_agents(1)
    ModelConfigFactory(name="echo-count")
    ModelConfigFactory(name="too-big", vram_bytes=10**15)  # no node can hold it: 503 no_capacity
    body = {"model": "echo-count", "messages": [{"role": "user", "content": "count me"}]}
    with httpx.Client(base_url=cp_server.url, timeout=60) as client:
        for _ in range(5):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        stream = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
        too_big = client.post("/v1/chat/completions", json={**body, "model": "too-big"})
        assert too_big.status_code == 503
        assert client.post("/v1/chat/completions", json={**body, "model": "missing"}).status_code == 404
    wait_in_flight_zero("echo-count")
    wait_until(lambda: flushed_requests() == 8, timeout=30, message="the gateway's tally in Redis")
    health_tick()
    sample = MetricSample.objects.order_by("-at").first()
    assert sample is not None
    assert (sample.requests, sample.errors) == (8, 1)
    assert sample.latency_p50_ms is not None and sample.latency_p50_ms <= sample.latency_p99_ms
    assert sample.loaded_replicas == 1 and sample.in_flight == 0
    assert len(sample.nodes) == 1
    health_tick()
    assert MetricSample.objects.order_by("-at").first().requests == 0
