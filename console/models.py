"""The overview's history: one row per health tick (`console.samples`), kept for `LOCALAI_METRICS_RETENTION`."""

from __future__ import annotations

from django.db import models


class MetricSample(models.Model):
    """The cluster as one health tick saw it. `requests`, `errors` and the latency percentiles cover the
    `interval_seconds` since the previous sample (every web process's answers, `console.usage`); the rest is
    the state at `at`. `nodes` maps a node's name to `{"used", "reserved", "total"}` VRAM bytes, so a sample
    is one row whatever the number of nodes."""

    at = models.DateTimeField(db_index=True)
    interval_seconds = models.FloatField()
    requests = models.IntegerField(default=0)
    errors = models.IntegerField(default=0)
    latency_p50_ms = models.FloatField(null=True, blank=True)
    latency_p99_ms = models.FloatField(null=True, blank=True)
    in_flight = models.IntegerField(default=0)
    loaded_replicas = models.IntegerField(default=0)
    nodes = models.JSONField(default=dict)

    class Meta:
        ordering = ["at"]

    def __str__(self) -> str:
        return f"sample at {self.at:%Y-%m-%d %H:%M:%S}"
