"""Two web processes and two Celery workers side by side on one database (QUALITY.md, "Faults"; issue 8):
concurrent cold requests through both web processes start exactly one load, and reconciler ticks that race
each other from both workers act once (the others skip on the cluster-wide lock)."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from localai_cluster.celery import app as celery_app
from nodes.models import ModelReplica
from tests.conftest import free_port, test_database_url, wait_until
from tests.e2e.gateway_support import start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory, NodeFactory, RuleFactory
from tests.reliability.conftest import celery_worker_argv, wait_http_ok, web_argv
from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This test run's database (and the shared Redis, secret key and settings) for a subprocess."""
    return {**os.environ, "DATABASE_URL": test_database_url(), "PYTHONUNBUFFERED": "1", **extra}


def chat(url: str, model: str, text: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_cold_burst_through_two_web_processes_loads_exactly_once(cp_server, start_agents, processes):
    agents = start_agents(2)  # registered with the in-process control plane; traffic goes to the two below
    ModelConfigFactory(name="two-webs", options={"options": ["load_ms:500"]})
    urls = []
    for name in ("web-1", "web-2"):
        port = free_port()
        processes(name, web_argv(port), subprocess_env())
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http_ok(f"{url}/readyz", message=f"the web process at {url}")

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: chat(urls[i % 2], "two-webs", f"r{i}"), range(24)))

    assert [answer.status_code for answer in answers] == [200] * 24, [
        a.text for a in answers if a.status_code != 200
    ]
    assert sum(agent.load_count("two-webs") for agent in agents) == 1
    assert ModelReplica.objects.filter(model_name="two-webs").count() == 1
    wait_in_flight_zero("two-webs")


def test_racing_reconciler_ticks_from_two_celery_workers_act_once(processes):
    agent = FakeAgent(load_seconds=0.5)  # slow loads: ticks overlap
    with FakeAgentServer(agent) as server:
        for _ in range(2):
            NodeFactory(address=server.address, worker_max_replicas_per_model=2)
        ModelConfigFactory(name="two-workers")
        RuleFactory(model_name="two-workers", min_replicas=3)
        queue = f"reliability-{uuid.uuid4().hex[:8]}"
        env = subprocess_env(LOCALAI_DB_POOL="false")
        workers = [
            processes(f"celery-{n}", celery_worker_argv(queue, f"{queue}-{n}@%h"), env) for n in (1, 2)
        ]
        for worker in workers:
            wait_until(lambda worker=worker: "ready." in worker.log(), timeout=90, message=f"{worker.name}")

        def succeeded() -> int:
            return sum(
                line.count("scheduling.tasks.reconcile_tick")
                for w in workers
                for line in w.log().splitlines()
                if "succeeded" in line
            )

        sends = 8
        for _ in range(sends):
            celery_app.send_task("scheduling.tasks.reconcile_tick", queue=queue)
        wait_until(lambda: succeeded() >= sends, timeout=90, message="every tick to run")
        # And a second burst once the cluster is at its minimum: nothing more to do.
        for _ in range(sends):
            celery_app.send_task("scheduling.tasks.reconcile_tick", queue=queue)
        wait_until(lambda: succeeded() >= 2 * sends, timeout=90, message="the second burst to run")

    assert len(agent.loads) == 3, [f"{r.model_name}#{r.replica_index}" for r in agent.loads]
    assert agent.stops == []
    assert ModelReplica.objects.filter(model_name="two-workers", state="loaded").count() == 3
    logs = "".join(worker.log() for worker in workers)
    assert "skipped: another reconciler tick holds the lock" in logs  # they did race
    assert "reconciler tick failed" not in logs
