from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from scheduling.choices import Outcome, RoutingPolicy, Trigger


def default_routing_policy() -> str:
    """`LOCALAI_ROUTING_POLICY`: the policy of a catalog entry that does not name one."""
    return str(settings.LOCALAI_ROUTING_POLICY)


class ModelConfig(models.Model):
    """A catalog entry: what the router and the reconciler load when a model has no replica yet."""

    name = models.CharField(max_length=255, unique=True)
    backend = models.CharField(max_length=64, default="echo")
    model = models.CharField(max_length=1024, blank=True, default="")
    options = models.JSONField(default=dict, blank=True)
    vram_bytes = models.BigIntegerField(default=0)
    context_size = models.IntegerField(null=True, blank=True)
    # Files staged to a worker before a load: [{"uri", "sha256", "size", "path"}] (scheduling.artifacts).
    files = models.JSONField(default=list, blank=True)
    routing = models.CharField(max_length=16, choices=RoutingPolicy.choices, default=default_routing_policy)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"
        constraints = [
            models.CheckConstraint(condition=Q(vram_bytes__gte=0), name="modelconfig_vram_gte_0"),
            models.CheckConstraint(
                condition=Q(context_size__isnull=True) | Q(context_size__gte=0),
                name="modelconfig_context_size_gte_0",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class SchedulingRule(models.Model):
    """Where a model may run (`node_selector`) and how many replicas it keeps (`min_replicas`,
    `max_replicas`, 0 = no limit), with the reconciler's circuit breaker, and its load-based autoscaling
    (`scheduling.autoscale`): `target_in_flight` per replica (0 = off: the all-busy burst), the delays in
    whole seconds (`downscale_delay` null = `LOCALAI_SCALE_DOWN_DELAY`), and `scale_to_zero_after`
    (0 = never: the last replica stays)."""

    model_name = models.CharField(max_length=255, unique=True)
    node_selector = models.JSONField(default=dict, blank=True)
    min_replicas = models.IntegerField(default=0)
    max_replicas = models.IntegerField(default=0)
    target_in_flight = models.IntegerField(default=0)
    upscale_delay = models.IntegerField(default=30)
    downscale_delay = models.IntegerField(null=True, blank=True)
    scale_to_zero_after = models.IntegerField(default=0)
    # The autoscaler's memory between ticks: since when the desired count has stayed above (below) the
    # current one, and the last scale-up (no scale-down within `downscale_delay` of it).
    scale_up_since = models.DateTimeField(null=True, blank=True)
    scale_down_since = models.DateTimeField(null=True, blank=True)
    scaled_up_at = models.DateTimeField(null=True, blank=True)
    # The reconciler asks matching nodes to stage the model's files ahead of any load.
    prefetch = models.BooleanField(default=False)
    unsatisfiable_until = models.DateTimeField(null=True, blank=True)
    unsatisfiable_ticks = models.IntegerField(default=0)
    unsatisfiable_reason = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_name"]
        constraints = [
            models.CheckConstraint(condition=Q(min_replicas__gte=0), name="rule_min_gte_0"),
            models.CheckConstraint(condition=Q(max_replicas__gte=0), name="rule_max_gte_0"),
            models.CheckConstraint(
                condition=Q(max_replicas=0) | Q(min_replicas__lte=F("max_replicas")),
                name="rule_min_lte_max",
            ),
            models.CheckConstraint(condition=Q(unsatisfiable_ticks__gte=0), name="rule_ticks_gte_0"),
            models.CheckConstraint(condition=Q(target_in_flight__gte=0), name="rule_target_gte_0"),
            models.CheckConstraint(condition=Q(upscale_delay__gte=0), name="rule_upscale_delay_gte_0"),
            models.CheckConstraint(
                condition=Q(downscale_delay__isnull=True) | Q(downscale_delay__gte=0),
                name="rule_downscale_delay_gte_0",
            ),
            models.CheckConstraint(condition=Q(scale_to_zero_after__gte=0), name="rule_zero_after_gte_0"),
        ]

    def __str__(self) -> str:
        return self.model_name


class InFlightSample(models.Model):
    """One model's in-flight requests (summed over its replicas) and live replica count at one instant:
    the autoscaler's input (`scheduling.autoscale`). Taken every `LOCALAI_AUTOSCALE_SAMPLE_INTERVAL` for
    every rule with `target_in_flight` > 0; rows older than `LOCALAI_AUTOSCALE_WINDOW` are deleted by the
    same task, so the table holds about window / interval rows per autoscaled model."""

    model_name = models.CharField(max_length=255)
    at = models.DateTimeField()
    in_flight = models.IntegerField()
    replicas = models.IntegerField()

    class Meta:
        ordering = ["model_name", "at"]
        indexes = [models.Index(fields=["model_name", "at"], name="inflight_sample_model_at")]

    def __str__(self) -> str:
        return f"{self.model_name} {self.at:%H:%M:%S} {self.in_flight}"


class LoadFailure(models.Model):
    """A catalog model whose last load failed, cluster-wide: no placement path (router, reconciler) starts
    another backend for it before `retry_at` (the cooldown doubles per failed attempt, see
    `scheduling.loadfailures`). A successful load, a catalog edit of the model, a cluster capacity change or
    an admin "retry now" deletes the row."""

    model_name = models.CharField(max_length=255, unique=True)
    failures = models.IntegerField(default=1)
    last_error = models.TextField(blank=True, default="")
    first_failed_at = models.DateTimeField()
    last_failed_at = models.DateTimeField()
    retry_at = models.DateTimeField()

    class Meta:
        ordering = ["model_name"]
        constraints = [
            models.CheckConstraint(condition=Q(failures__gte=1), name="loadfailure_failures_gte_1"),
        ]

    def __str__(self) -> str:
        return f"{self.model_name}: {self.failures} failed load(s)"


class PlacementDecision(models.Model):
    """One placement attempt, eviction, trim or breaker trip, with every node's verdict (scheduling.pipeline).
    Written off the warm path; pruned by the health loop (`LOCALAI_DECISION_RETENTION`,
    `LOCALAI_DECISION_MAX_ROWS`)."""

    created_at = models.DateTimeField(db_index=True)
    model_name = models.CharField(max_length=255)
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    node_name = models.CharField(max_length=255, blank=True, default="")
    replica_index = models.IntegerField(null=True, blank=True)
    duration = models.FloatField(default=0.0)  # seconds
    message = models.TextField(blank=True, default="")
    # [{"node": name, "verdict": Verdict, "detail": one line}, ...]: chosen and ranked_lower first, then the
    # refused nodes by name; at most `MAX_RECORDED_NODES` of them, the others counted in `omitted`.
    candidates = models.JSONField(default=list, blank=True)
    omitted = models.JSONField(default=dict, blank=True)  # {verdict: count} of nodes not listed

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["model_name", "-created_at"], name="decision_model_time"),
            models.Index(fields=["node_name", "model_name", "replica_index"], name="decision_replica"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.model_name} {self.outcome}"
