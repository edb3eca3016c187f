"""The Celery app. The beat schedule lives in code, built from the interval settings."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")

app = Celery("localai_cluster")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _install_beat_schedule(sender: Celery, **kwargs) -> None:
    from django.conf import settings

    sender.conf.beat_schedule = beat_schedule(
        reconcile_interval=settings.LOCALAI_RECONCILE_INTERVAL,
        health_interval=settings.LOCALAI_HEALTH_CHECK_INTERVAL,
    )


def beat_schedule(*, reconcile_interval: float, health_interval: float) -> dict:
    """Periodic control loops. Each task expires after one interval so a backlog never piles up."""
    return {
        "reconcile": {
            "task": "scheduling.tasks.reconcile_tick",
            "schedule": reconcile_interval,
            "options": {"expires": reconcile_interval},
        },
        "health": {
            "task": "scheduling.tasks.health_tick",
            "schedule": health_interval,
            "options": {"expires": health_interval},
        },
    }
