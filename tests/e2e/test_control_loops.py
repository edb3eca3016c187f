"""The control loops end to end: real control plane, real agents and echo backends on loopback, and a real
Celery worker on Redis (BEHAVIOUR §5–6, the seed's flap scenario, QUALITY faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from localai_cluster.celery import app as celery_app
from nodes.choices import NodeStatus, ReplicaState
from nodes.models import ModelReplica
from scheduling.health import health_tick
from scheduling.models import SchedulingRule
from scheduling.reconciler import reconcile_tick
from tests.conftest import test_database_url, wait_until
from tests.e2e.gateway_support import REPO_ROOT, start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory, RuleFactory
from tests.scheduling.fake_agent import FakeAgent, FakeAgentServer
from worker_client.client import backend_health

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def live(model: str):
    return ModelReplica.objects.filter(
        model_name=model, state__in=[ReplicaState.LOADING, ReplicaState.LOADED]
    )


def test_flap_scenario_breaker_trips_then_a_new_node_clears_it(cp_server, start_agents):
    (first,) = start_agents(1, slots=1)
    ModelConfigFactory(name="flap")
    rule = RuleFactory(model_name="flap", min_replicas=2)

    assert len(reconcile_tick().placed) == 1  # capped at the cluster's capacity
    for _ in range(3):
        reconcile_tick()
    rule.refresh_from_db()
    assert rule.unsatisfiable_ticks == 3
    assert abs(rule.unsatisfiable_until - (timezone.now() + timedelta(minutes=5))) < timedelta(seconds=30)
    for _ in range(2):  # the cooldown: nothing happens
        report = reconcile_tick()
        assert report.placed == report.tripped == []
    assert [p.process_key for p in first.processes()] == ["flap#0"]

    (second,) = start_agents(1, slots=1)  # registering clears every breaker at once
    rule.refresh_from_db()
    assert rule.unsatisfiable_until is None and rule.unsatisfiable_ticks == 0
    report = reconcile_tick()
    assert report.placed == [f"flap#0 on {second.name}"]
    assert [p.process_key for p in second.processes()] == ["flap#0"]


def test_a_stale_node_goes_offline_and_its_replicas_are_placed_elsewhere(cp_server, start_agents, settings):
    settings.LOCALAI_STALE_NODE_THRESHOLD = 3
    a, b = start_agents(2)
    ModelConfigFactory(name="stale-m")
    RuleFactory(model_name="stale-m", min_replicas=1)
    (placed,) = reconcile_tick().placed
    victim, survivor = (a, b) if placed.endswith(a.name) else (b, a)

    victim.process.kill()  # kill -9: no drain, no deregister; its backends die with it
    victim.process.wait()
    wait_until(lambda: victim.name in health_tick().offline, timeout=30, message="the node to go offline")
    assert victim.node().status == NodeStatus.OFFLINE
    assert not live("stale-m").filter(node__name=victim.name).exists()

    assert reconcile_tick().placed == [f"stale-m#0 on {survivor.name}"]


def test_a_killed_backend_is_probed_out_alone_and_the_count_restored(cp_server, start_agents, settings):
    settings.LOCALAI_PROBE_STALE_AFTER = 0
    (agent,) = start_agents(1, slots=2)
    ModelConfigFactory(name="probe-m")
    RuleFactory(model_name="probe-m", min_replicas=2)
    assert len(reconcile_tick().placed) == 2
    pids = {p.process_key: p.pid for p in agent.processes()}
    os.kill(pids["probe-m#1"], signal.SIGKILL)

    health_tick()
    wait_until(
        lambda: not live("probe-m").filter(replica_index=1).exists(), timeout=20, message="m#1 removed"
    )
    survivor = live("probe-m").get(replica_index=0)
    from nodes.tokens import backend_token_for

    assert backend_health(survivor.address, backend_token_for(survivor.node), timeout=5)
    assert {p.process_key: p.pid for p in agent.processes()}.get("probe-m#0") == pids["probe-m#0"]

    assert reconcile_tick().placed == [f"probe-m#1 on {agent.name}"]
    assert live("probe-m").filter(state=ReplicaState.LOADED).count() == 2


def test_beat_schedule_runs_both_loops_at_the_configured_intervals():
    schedule = celery_app.conf.beat_schedule
    assert schedule["reconcile"]["task"] == "scheduling.tasks.reconcile_tick"
    assert schedule["reconcile"]["schedule"] == django_settings.LOCALAI_RECONCILE_INTERVAL
    assert schedule["health"]["task"] == "scheduling.tasks.health_tick"
    assert schedule["health"]["schedule"] == django_settings.LOCALAI_HEALTH_CHECK_INTERVAL
    # A tick that could not run in its interval expires instead of piling up behind the next one.
    assert schedule["reconcile"]["options"]["expires"] == django_settings.LOCALAI_RECONCILE_INTERVAL


def test_reconcile_task_runs_through_a_real_celery_worker_on_redis(tmp_path):
    agent = FakeAgent()
    with FakeAgentServer(agent) as server:
        from tests.factories import NodeFactory

        NodeFactory(address=server.address)
        ModelConfigFactory(name="celery-m")
        RuleFactory(model_name="celery-m", min_replicas=1)
        queue = f"test-{uuid.uuid4().hex[:8]}"
        log = (tmp_path / "celery.log").open("wb")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "localai_cluster",
                "worker",
                "-Q",
                queue,
                "--pool",
                "solo",
                "--loglevel",
                "info",
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "DATABASE_URL": test_database_url(), "LOCALAI_DB_POOL": "false"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            celery_app.send_task("scheduling.tasks.reconcile_tick", queue=queue)
            wait_until(
                lambda: live("celery-m").filter(state=ReplicaState.LOADED).exists(),
                timeout=60,
                message="the Celery worker to run the reconciler tick",
            )
        finally:
            worker.terminate()
            worker.wait(timeout=20)
            log.close()
    assert [request.model_name for request in agent.loads] == ["celery-m"]
    assert SchedulingRule.objects.get(model_name="celery-m").unsatisfiable_ticks == 0
    assert "succeeded" in (tmp_path / "celery.log").read_text()
