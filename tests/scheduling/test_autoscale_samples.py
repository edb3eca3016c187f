"""The autoscaler's in-flight samples in PostgreSQL: what one sample holds, the window's average, and the
bound on the table (README "Autoscaling")."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from localai_cluster import locks
from nodes.choices import ReplicaState
from scheduling.autoscale import AUTOSCALE_SAMPLER, inflight_averages, inflight_sample_take
from scheduling.models import InFlightSample
from tests.conftest import another_session_holding
from tests.factories import ReplicaFactory, RuleFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_one_sample_per_autoscaled_model_sums_in_flight_of_loaded_replicas():
    RuleFactory(model_name="auto", target_in_flight=4)
    RuleFactory(model_name="zero", scale_to_zero_after=60)
    RuleFactory(model_name="plain", min_replicas=1)  # not autoscaled: no sample
    ReplicaFactory(model_name="auto", replica_index=0, in_flight=3)
    ReplicaFactory(model_name="auto", replica_index=1, in_flight=2)
    ReplicaFactory(model_name="auto", replica_index=2, state=ReplicaState.LOADING)
    ReplicaFactory(model_name="auto", replica_index=3, state=ReplicaState.FAILED, in_flight=7)
    ReplicaFactory(model_name="plain", replica_index=0, in_flight=9)
    now = timezone.now()
    assert inflight_sample_take(now=now) == 2
    rows = {s.model_name: (s.in_flight, s.replicas) for s in InFlightSample.objects.all()}
    assert rows == {"auto": (5, 3), "zero": (0, 0)}  # live replicas: loading + loaded


def test_the_average_is_over_the_window_and_the_table_stays_bounded(settings):
    settings.LOCALAI_AUTOSCALE_WINDOW = 30
    RuleFactory(model_name="auto", target_in_flight=4)
    replica = ReplicaFactory(model_name="auto", replica_index=0, in_flight=0)
    start = timezone.now()
    # Two simulated minutes, a sample every 5 s; in-flight 10 for the last 30 s only.
    for step in range(25):
        now = start + timedelta(seconds=5 * step)
        in_flight = 10 if step >= 19 else 0
        type(replica).objects.filter(pk=replica.pk).update(in_flight=in_flight)
        inflight_sample_take(now=now)
        # Never more than the window's worth of rows (window / interval + the one at the edge).
        assert InFlightSample.objects.count() <= 7
    loads = inflight_averages(model_names=["auto", "other"], now=now)
    assert set(loads) == {"auto"}
    assert loads["auto"].samples == 6  # (now - 30 s, now]
    assert loads["auto"].average == pytest.approx(10.0)
    # 15 s earlier the window held the samples at -30 s (0) and -25, -20, -15 s (10); older ones are gone.
    earlier = inflight_averages(model_names=["auto"], now=now - timedelta(seconds=15))
    assert earlier["auto"].samples == 4
    assert earlier["auto"].average == pytest.approx(7.5)


def test_samples_of_a_model_no_longer_autoscaled_are_deleted():
    rule = RuleFactory(model_name="auto", target_in_flight=4)
    now = timezone.now()
    inflight_sample_take(now=now)
    assert InFlightSample.objects.filter(model_name="auto").exists()
    rule.target_in_flight = 0
    rule.save()
    inflight_sample_take(now=now + timedelta(seconds=5))
    assert not InFlightSample.objects.exists()


def test_a_second_sampler_at_the_same_time_skips():
    RuleFactory(model_name="auto", target_in_flight=4)
    with another_session_holding(locks.NAMESPACE_LOOPS, AUTOSCALE_SAMPLER):
        assert inflight_sample_take(now=timezone.now()) == 0
    assert not InFlightSample.objects.exists()


def test_a_fault_is_logged_and_the_sampler_goes_on(monkeypatch, caplog):
    import scheduling.autoscale as autoscale

    def broken(now):
        raise RuntimeError("disk full")

    monkeypatch.setattr(autoscale, "_take", broken)
    assert inflight_sample_take(now=timezone.now()) == 0
    assert "in-flight samples not taken" in caplog.text


def test_the_beat_runs_the_sampler_at_most_every_5_seconds():
    from django.conf import settings

    from localai_cluster.celery import app

    entry = app.conf.beat_schedule["autoscale-sample"]
    assert entry["task"] == "scheduling.tasks.autoscale_sample_tick"
    assert entry["schedule"] == settings.LOCALAI_AUTOSCALE_SAMPLE_INTERVAL <= 5
