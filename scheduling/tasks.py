"""Celery tasks: thin wrappers that run one tick of a control loop. A fault is logged and the next tick runs."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="scheduling.tasks.reconcile_tick", ignore_result=True)
def reconcile_tick() -> list[str]:
    from scheduling.reconciler import reconcile_tick as tick

    try:
        report = tick()
    except Exception:
        logger.exception("reconciler tick failed; the next tick will try again")
        return ["error"]
    return report.lines()


@shared_task(name="scheduling.tasks.health_tick", ignore_result=True)
def health_tick() -> list[str]:
    from scheduling.health import health_tick as tick

    try:
        report = tick()
    except Exception:
        logger.exception("health tick failed; the next tick will try again")
        return ["error"]
    return report.lines()


@shared_task(name="scheduling.tasks.autoscale_sample_tick", ignore_result=True)
def autoscale_sample_tick() -> int:
    """One in-flight sample per autoscaled model (scheduling.autoscale); faults are logged there."""
    from django.utils import timezone

    from scheduling.autoscale import inflight_sample_take

    return inflight_sample_take(now=timezone.now())
