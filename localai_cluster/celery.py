"""The Celery app. Its beat schedule is `CELERY_BEAT_SCHEDULE` in the settings, built from the intervals."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")

app = Celery("localai_cluster")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
