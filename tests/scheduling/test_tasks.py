"""The Celery tasks are thin: a fault in a tick is logged and the next tick runs."""

from __future__ import annotations

import logging

import pytest

from scheduling import tasks


@pytest.mark.parametrize(
    ("task", "target"),
    [
        (tasks.reconcile_tick, "scheduling.reconciler.reconcile_tick"),
        (tasks.health_tick, "scheduling.health.health_tick"),
    ],
)
def test_a_failing_tick_is_logged_not_raised(task, target, monkeypatch, caplog):
    def explode():
        raise ConnectionError("database went away")

    monkeypatch.setattr(target, explode)
    with caplog.at_level(logging.ERROR, logger="scheduling.tasks"):
        assert task.run() == ["error"]
    assert "next tick will try again" in caplog.text and "database went away" in caplog.text


@pytest.mark.django_db
def test_ticks_report_what_they_did():
    assert tasks.reconcile_tick.run()[0].startswith("placed:")
    assert tasks.health_tick.run()[0].startswith("offline:")
