"""Load-based autoscaling end to end: real agents with echo backends, real requests held open through the
gateway, the real sampler and reconciler ticks. The clock of the samples and ticks is given (seconds after a
start), so the delays are exact and nothing waits for them in real time; in-flight is the real one."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.autoscale import inflight_sample_take
from scheduling.choices import Outcome, Trigger
from scheduling.models import PlacementDecision
from scheduling.reconciler import reconcile_tick
from scheduling.services import rule_upsert
from tests.conftest import wait_until
from tests.e2e.gateway_support import in_flight, start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MODEL = "auto-e2e"


def live() -> list[ModelReplica]:
    return list(
        ModelReplica.objects.filter(model_name=MODEL, state__in=[ReplicaState.LOADING, ReplicaState.LOADED])
    )


class Clock:
    """Seconds after the start: sample every 5 s, reconcile when asked."""

    def __init__(self) -> None:
        self.start = timezone.now()
        self.t = 0.0

    @property
    def now(self):
        return self.start + timedelta(seconds=self.t)

    def run(self, seconds: float, *, tick_every: float = 5.0) -> list:
        """Samples every 5 s for `seconds`, with a reconciler tick after each `tick_every` seconds."""
        reports = []
        end = self.t + seconds
        next_tick = self.t + tick_every
        while self.t < end:
            self.t += 5
            inflight_sample_take(now=self.now)
            if self.t >= next_tick:
                reports.append(reconcile_tick(now=self.now))
                next_tick += tick_every
        return reports


def decisions(outcome: str) -> list[PlacementDecision]:
    return list(
        PlacementDecision.objects.filter(
            model_name=MODEL, trigger=Trigger.AUTOSCALE, outcome=outcome
        ).order_by("id")
    )


def test_scale_up_down_to_zero_and_the_cold_request_after(cp_server, start_agents):
    agents = start_agents(2, slots=4)
    # Every token waits 1 s: a 400-word answer streams for minutes, so a request stays in flight until its
    # client goes away.
    ModelConfigFactory(name=MODEL, options={"options": ["delay_ms:1000"]})
    rule_upsert(
        model_name=MODEL,
        node_selector={},
        min_replicas=1,
        max_replicas=4,
        target_in_flight=2,
        upscale_delay=10,
        downscale_delay=20,
    )
    clock = Clock()
    reconcile_tick(now=clock.now)
    assert len(live()) == 1  # the minimum, placed by the reconciler

    # --- scale up: 6 requests held open on one replica, target 2 → desired 3 after 10 s of demand ---
    held = contextlib.ExitStack()
    client = held.enter_context(httpx.Client(timeout=60))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": " ".join(["w"] * 400)}],
        "max_tokens": 400,
        "stream": True,
    }
    for _ in range(6):
        held.enter_context(client.stream("POST", f"{cp_server.url}/v1/chat/completions", json=body))
    wait_until(
        lambda: sum(in_flight(MODEL)) == 6, timeout=60, message=f"6 in flight (now {in_flight(MODEL)})"
    )

    clock.run(5)  # the window's average: 6 (one sample); desired 3; the upscale timer starts
    assert len(live()) == 1
    clock.run(5)  # 5 s of demand: still waiting
    assert len(live()) == 1
    assert decisions(Outcome.PLACED) == []
    clock.run(5)  # 10 s of demand: placed
    replicas = live()
    assert len(replicas) == 3
    assert all(r.state == ReplicaState.LOADED for r in replicas)
    placed = decisions(Outcome.PLACED)
    assert len(placed) == 2
    for record in placed:
        assert "avg in-flight 6.0 over 30 s / target 2 → desired 3" in record.message, record.message
    # The new replicas take new requests (least in-flight): the held ones stay where they are.
    assert sum(in_flight(MODEL)) == 6

    # --- scale down: the clients go away; no scale-down within 20 s of the scale-up; then the idle go ---
    held.close()
    wait_in_flight_zero(MODEL, timeout=60)
    clock.run(15)  # the average falls but the scale-up was 15 s ago
    assert len(live()) == 3
    assert decisions(Outcome.TRIMMED) == []
    clock.run(30)  # the window is all 0 and the timers have run out
    assert len(live()) == 1
    trimmed = decisions(Outcome.TRIMMED)
    assert len(trimmed) == 2
    for record in trimmed:
        assert "→ desired 1; below 3 for" in record.message, record.message

    # --- scale to zero: min 0 and scale_to_zero_after 30 s ---
    rule_upsert(
        model_name=MODEL,
        node_selector={},
        min_replicas=0,
        max_replicas=4,
        target_in_flight=2,
        upscale_delay=10,
        downscale_delay=20,
        scale_to_zero_after=30,
    )
    (last,) = live()
    # The last request used the replica at real time: the clock goes on from real time at least, so
    # "30 s without a request" is counted from then.
    clock.t = max(clock.t, (timezone.now() - clock.start).total_seconds())
    clock.run(30)
    assert live() == []
    (zero,) = [r for r in decisions(Outcome.TRIMMED) if "scale to zero" in r.message]
    assert "no request for 30 s" in zero.message
    host = next(a for a in agents if a.name == zero.node_name)
    wait_until(
        lambda: last.process_key not in {p.process_key for p in host.processes()},
        timeout=30,
        message=f"{last.process_key} stopped on {host.name}",
    )

    # --- the next request loads a replica and is held until it answers, as a cold request ---
    answer = httpx.post(
        f"{cp_server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.text)["choices"][0]["message"]["content"]
    assert len(live()) == 1
    cold = PlacementDecision.objects.filter(model_name=MODEL, trigger=Trigger.REQUEST).latest("id")
    assert cold.outcome == Outcome.PLACED
