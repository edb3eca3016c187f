"""The cluster-wide backoff after a failed load (issue 12 item 3): the arithmetic, the state in PostgreSQL, the
placement paths that respect it (router's `replica_place`, the reconciler) and what clears it."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections
from django.db.models import F

from nodes.models import ModelReplica
from scheduling.catalog import model_config_delete, model_config_upsert, models_import_yaml
from scheduling.loadfailures import (
    LoadAttempt,
    LoadBackingOff,
    backoff_seconds,
    load_attempt_begin,
    load_failure_record,
    retry_after_seconds,
)
from scheduling.models import LoadFailure
from scheduling.placement import LoadFailed
from scheduling.reconciler import reconcile_tick
from scheduling.services import replica_place
from tests.factories import GiB, ModelConfigFactory, NodeFactory, RuleFactory
from tests.test_settings import _import_settings

# --- arithmetic (pure) ----------------------------------------------------------------------------------


def test_cooldown_doubles_from_the_base_up_to_five_minutes():
    assert [backoff_seconds(n, base=10) for n in range(1, 9)] == [10, 20, 40, 80, 160, 300, 300, 300]
    assert backoff_seconds(0, base=10) == 0
    assert backoff_seconds(3, base=0.5) == 2.0


def test_a_base_above_the_cap_is_kept_and_zero_turns_backoff_off():
    assert backoff_seconds(1, base=600) == 600
    assert backoff_seconds(5, base=600) == 600
    assert backoff_seconds(4, base=0) == 0


def test_many_failures_never_overflow():
    assert backoff_seconds(10**6, base=10) == 300


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one():
    assert retry_after_seconds(9.2) == 10
    assert retry_after_seconds(0.01) == 1
    assert retry_after_seconds(20) == 20


@pytest.mark.parametrize("value", ["ten", "-1", "10 seconds"])
def test_a_bad_backoff_setting_stops_startup_naming_the_variable(value):
    result = _import_settings(LOCALAI_LOAD_FAILURE_BACKOFF=value)
    assert result.returncode != 0
    assert "LOCALAI_LOAD_FAILURE_BACKOFF" in result.stderr


def test_the_backoff_setting_takes_durations():
    result = _import_settings(LOCALAI_LOAD_FAILURE_BACKOFF="1m")
    assert result.returncode == 0, result.stderr


# --- state in PostgreSQL ----------------------------------------------------------------------------------

pytestmark = pytest.mark.django_db(transaction=True)


def expire(model_name: str) -> None:
    """Moves the cooldown into the past (as time passing would), by the database's clock."""
    LoadFailure.objects.filter(model_name=model_name).update(
        retry_at=F("retry_at") - timedelta(hours=1), last_failed_at=F("last_failed_at") - timedelta(hours=1)
    )


def cooldown(model_name: str) -> float:
    row = LoadFailure.objects.get(model_name=model_name)
    return (row.retry_at - row.last_failed_at).total_seconds()


def test_each_failed_attempt_doubles_the_cooldown_up_to_the_cap(settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    seen, since = [], []
    for _ in range(7):
        attempt = load_attempt_begin(model_name="m")
        load_failure_record(attempt=attempt, error="LoadModel failed: no such file")
        seen.append(cooldown("m"))
        since.append(LoadFailure.objects.get(model_name="m").first_failed_at)
        with pytest.raises(LoadBackingOff) as backing_off:
            load_attempt_begin(model_name="m")
        assert "LoadModel failed: no such file" in backing_off.value.reason
        assert 1 <= backing_off.value.retry_after <= seen[-1]
        expire("m")
    assert seen == [10, 20, 40, 80, 160, 300, 300]
    row = LoadFailure.objects.get(model_name="m")
    assert row.failures == 7
    assert len(set(since)) == 1  # "failing since" is the first failure of the run


def test_concurrent_failures_of_one_attempt_count_once(settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    first = load_attempt_begin(model_name="m")
    load_failure_record(attempt=first, error="first")
    expire("m")
    attempt = load_attempt_begin(model_name="m")  # every parallel load of this attempt saw the same row
    barrier = threading.Barrier(6)
    errors = []

    def fail(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            load_failure_record(attempt=attempt, error=f"failure {i}")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=fail, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    row = LoadFailure.objects.get(model_name="m")
    assert row.failures == 2
    assert (row.retry_at - row.last_failed_at).total_seconds() <= 20


def test_first_failures_racing_to_create_the_row_count_once(settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    attempt = LoadAttempt("fresh")
    barrier = threading.Barrier(4)

    def fail() -> None:
        try:
            barrier.wait(timeout=30)
            load_failure_record(attempt=attempt, error="boom")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=fail) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert LoadFailure.objects.get(model_name="fresh").failures == 1


# --- placement paths ---------------------------------------------------------------------------------------


def gpu_node(agent, name="n1", cap=1):
    return NodeFactory(
        name=name, address=agent.address, total_vram=10 * GiB, available_vram=10 * GiB,
        worker_max_replicas_per_model=cap,
    )  # fmt: skip


def test_replica_place_starts_no_load_while_the_cooldown_runs(agent, settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    ModelConfigFactory(name="broken", vram_bytes=GiB)
    gpu_node(agent)
    agent.fail = "LoadModel failed: could not load model: no such file"
    with pytest.raises(LoadFailed) as first:
        replica_place(model_name="broken")
    assert first.value.retry_after == 10
    for _ in range(5):
        with pytest.raises(LoadBackingOff) as again:
            replica_place(model_name="broken")
        assert "no such file" in again.value.reason
    assert len(agent.loads) == 1
    assert LoadFailure.objects.get(model_name="broken").failures == 1

    expire("broken")  # the cooldown is over: one more attempt, and the next cooldown is twice as long
    with pytest.raises(LoadFailed) as second:
        replica_place(model_name="broken")
    assert not isinstance(second.value, LoadBackingOff)
    assert second.value.retry_after == 20
    assert len(agent.loads) == 2

    expire("broken")
    agent.fail = ""
    replica_place(model_name="broken")  # a successful load clears it
    assert not LoadFailure.objects.filter(model_name="broken").exists()


def test_an_unreachable_agent_is_not_the_models_fault(settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    ModelConfigFactory(name="m", vram_bytes=GiB)
    NodeFactory(name="gone", address="127.0.0.1:1")
    with pytest.raises(LoadFailed):
        replica_place(model_name="m")
    assert not LoadFailure.objects.exists()


def test_zero_backoff_records_nothing(agent, settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 0
    ModelConfigFactory(name="m", vram_bytes=GiB)
    gpu_node(agent)
    agent.fail = "nope"
    for _ in range(2):
        with pytest.raises(LoadFailed):
            replica_place(model_name="m")
    assert len(agent.loads) == 2
    assert not LoadFailure.objects.exists()


def test_reconciler_respects_the_backoff_and_probes_with_one_load(agent, settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    ModelConfigFactory(name="broken", vram_bytes=GiB)
    gpu_node(agent, "a", cap=2)
    gpu_node(agent, "b", cap=2)
    RuleFactory(model_name="broken", min_replicas=3)
    agent.fail = "LoadModel failed: no such file"
    report = reconcile_tick()
    assert len(agent.loads) == 3  # a first attempt places what the rule needs, in parallel
    assert len(report.failed) == 3
    row = LoadFailure.objects.get(model_name="broken")
    assert row.failures == 1  # ... and counts once
    for _ in range(3):
        report = reconcile_tick()
        assert report.failed == [f"broken: load failing, next attempt after {row.retry_at:%H:%M:%S} UTC"]
    assert len(agent.loads) == 3
    assert not ModelReplica.objects.filter(model_name="broken").exists()

    expire("broken")
    reconcile_tick()  # one probe, not three
    assert len(agent.loads) == 4
    assert LoadFailure.objects.get(model_name="broken").failures == 2

    expire("broken")
    agent.fail = ""
    reconcile_tick()
    assert len(agent.loads) == 5
    assert not LoadFailure.objects.exists()
    reconcile_tick()  # back to normal: the rest of the minimum
    assert ModelReplica.objects.filter(model_name="broken", state="loaded").count() == 3


def test_the_breaker_stays_closed_while_a_model_fails_to_load(agent, settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    settings.LOCALAI_UNSATISFIABLE_TICKS = 2
    ModelConfigFactory(name="broken", vram_bytes=GiB)
    gpu_node(agent)
    rule = RuleFactory(model_name="broken", min_replicas=1)
    agent.fail = "nope"
    for _ in range(4):
        reconcile_tick()
    rule.refresh_from_db()
    assert rule.unsatisfiable_ticks == 0 and rule.unsatisfiable_until is None
    assert len(agent.loads) == 1


# --- what clears it ----------------------------------------------------------------------------------------


def failing(model_name: str) -> None:
    load_failure_record(attempt=LoadAttempt(model_name), error="boom")


def test_a_catalog_edit_clears_it():
    ModelConfigFactory(name="m")
    failing("m")
    model_config_upsert(name="m", backend="echo", model="fixed.gguf")
    assert not LoadFailure.objects.exists()
    failing("m")
    model_config_delete(name="m")
    assert not LoadFailure.objects.exists()


def test_import_models_clears_it(tmp_path):
    failing("imported")
    path = tmp_path / "m.yaml"
    path.write_text("name: imported\nbackend: echo\nparameters:\n  model: m.gguf\n")
    models_import_yaml(paths=[path])
    assert not LoadFailure.objects.exists()


def test_a_node_registering_or_being_approved_clears_every_model():
    from nodes.services import node_approve, node_register

    failing("a")
    failing("b")
    node = node_register(name="new-node", address="127.0.0.1:45000").node
    assert not LoadFailure.objects.exists()
    failing("a")
    node_approve(node=node)
    assert not LoadFailure.objects.exists()


def test_the_admin_change_form_clears_it(admin_client):
    config = ModelConfigFactory(name="m", backend="echo")
    failing("m")
    answer = admin_client.post(
        f"/admin/scheduling/modelconfig/{config.pk}/change/",
        {"name": "m", "backend": "echo", "model": "fixed.bin", "options": "{}", "vram_bytes": "0",
         "context_size": "", "files": "[]", "routing": "least_in_flight"},
    )  # fmt: skip
    assert answer.status_code == 302, answer.content[:2000]
    assert not LoadFailure.objects.exists()
