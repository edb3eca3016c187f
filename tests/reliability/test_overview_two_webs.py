"""The overview's request counts are the whole cluster's (issue 17 item 3): answers given by two separate web
processes land in one sample taken by the health tick, each counted once."""

from __future__ import annotations

import os

import httpx
import pytest
import redis
from django.conf import settings

from console import usage
from console.models import MetricSample
from scheduling.health import health_tick
from tests.conftest import free_port, test_database_url, wait_until
from tests.e2e.gateway_support import start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory
from tests.reliability.conftest import wait_http_ok, web_argv

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_two_web_processes_one_sample(cp_server, start_agents, processes) -> None:
    start_agents(1)
    ModelConfigFactory(name="counted")
    env = {**os.environ, "DATABASE_URL": test_database_url(), "PYTHONUNBUFFERED": "1"}
    urls = []
    for name in ("web-a", "web-b"):
        port = free_port()
        processes(name, web_argv(port), env)
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http_ok(f"{url}/readyz", message=f"the web process at {url}")
    usage.usage_flush()
    usage.usage_take_window()

    body = {"model": "counted", "messages": [{"role": "user", "content": "hi"}]}
    sent = {urls[0]: 7, urls[1]: 5}
    for url, count in sent.items():
        for _ in range(count):
            assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    wait_in_flight_zero("counted")

    hash_ = redis.Redis.from_url(settings.REDIS_URL)
    wait_until(
        lambda: int(hash_.hget(usage.usage_key(), "requests") or 0) == 12,
        timeout=30,
        message="both web processes' tallies in Redis",
    )
    health_tick()
    sample = MetricSample.objects.order_by("-at").first()
    assert sample is not None and sample.requests == 12 and sample.errors == 0
