"""Heartbeats at fleet scale with a real agent (issue 16): once the control plane accepted its replica set, the
agent sends only the set's digest and each heartbeat is the one-UPDATE path (the replica rows are left alone);
a change of the rows makes the agent list its replicas again and the full reconciliation runs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from nodes.models import ModelReplica, Node
from scheduling.models import SchedulingRule
from scheduling.reconciler import reconcile_tick
from tests.conftest import wait_until
from tests.e2e.gateway_support import start_agents_fixture  # noqa: F401
from tests.factories import ModelConfigFactory, RuleFactory
from worker_client.agent.keys import replica_digest

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def last_seen(model: str) -> dict[str, object]:
    return {
        replica.process_key: replica.last_seen_at for replica in ModelReplica.objects.filter(model_name=model)
    }


def test_an_unchanged_agent_sends_its_digest_and_a_changed_one_is_reconciled(cp_server, start_agents):
    (agent,) = start_agents(1, slots=2, heartbeat_interval="0.3s")
    ModelConfigFactory(name="hb")
    rule = RuleFactory(model_name="hb", min_replicas=1)
    assert reconcile_tick().placed == [f"hb#0 on {agent.name}"]

    # A full heartbeat lists the new replica once...
    heard = wait_until(lambda: last_seen("hb")["hb#0"], timeout=30, message="a heartbeat listing hb#0")
    # ...then the agent sends only the digest: heartbeats go on, the row is not written again.
    wait_until(
        lambda: Node.objects.get(name=agent.name).last_heartbeat > heard + timedelta(seconds=2),
        timeout=30,
        message="heartbeats after the replica was listed",
    )
    assert last_seen("hb")["hb#0"] == heard

    # A new row: the digest no longer matches, the agent lists its replicas, the new one is heard of.
    SchedulingRule.objects.filter(pk=rule.pk).update(min_replicas=2)
    assert reconcile_tick().placed == [f"hb#1 on {agent.name}"]
    wait_until(lambda: last_seen("hb")["hb#1"] is not None, timeout=30, message="a full heartbeat")
    assert last_seen("hb")["hb#0"] > heard
    assert sorted(p.process_key for p in agent.processes()) == ["hb#0", "hb#1"]
    assert "heartbeat failed" not in agent.log()


def test_the_agent_sends_the_digest_alone_once_accepted_and_the_list_at_once_when_asked(control_plane, agent):
    from tests.e2e.conftest import FakeControlPlane

    fake: FakeControlPlane = control_plane
    empty = replica_digest([])
    # An older control plane (no `send_replicas` in its answer): every heartbeat lists the replicas.
    wait_until(lambda: len(fake.calls_to("/heartbeat")) >= 2, timeout=30, message="two heartbeats")
    assert all("replicas" in call.body for call in fake.calls_to("/heartbeat"))
    assert all(call.body["replica_digest"] == empty for call in fake.calls_to("/heartbeat"))

    fake.send_replicas = False  # the set is accepted: from the next heartbeat on, the digest alone
    seen = len(fake.calls_to("/heartbeat"))
    wait_until(lambda: len(fake.calls_to("/heartbeat")) >= seen + 3, timeout=30, message="more heartbeats")
    later = fake.calls_to("/heartbeat")[seen + 1 :]
    assert later and all(
        "replicas" not in call.body and call.body["replica_digest"] == empty for call in later
    )

    fake.send_replicas = True  # the rows differ: a digest-only heartbeat is answered by the list
    seen = len(fake.calls_to("/heartbeat"))
    wait_until(lambda: len(fake.calls_to("/heartbeat")) >= seen + 3, timeout=30, message="more heartbeats")
    calls = fake.calls_to("/heartbeat")[seen:]
    digest_only = [i for i, call in enumerate(calls[:-1]) if "replicas" not in call.body]
    assert len(digest_only) <= 1  # at most the one built before the answer changed
    assert all("replicas" in calls[i + 1].body for i in digest_only)
    assert all("replicas" in call.body for call in calls[max(digest_only, default=0) + 1 :])
