"""The audit trail: one row per admin action, written in the transaction of the change it describes."""

from __future__ import annotations

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class ActorKind(models.TextChoices):
    USER = "user", "user"
    API_KEY = "api_key", "API key"
    COMMAND = "command", "command"
    SYSTEM = "system", "system"


class Door(models.TextChoices):
    """Where the action came in."""

    API = "api", "API"
    PAGE = "page", "page"
    ADMIN = "admin", "Django admin"
    COMMAND = "command", "command"
    SYSTEM = "system", "system"


class Action(models.TextChoices):
    """Every action the trail records (`<target type>.<verb>`)."""

    NODE_APPROVE = "node.approve", "node approved"
    NODE_DRAIN = "node.drain", "node drained"
    NODE_RESUME = "node.resume", "node resumed"
    NODE_DELETE = "node.delete", "node deleted"
    NODE_UPDATE = "node.update", "node edited"
    NODE_OVERRIDE_SET = "node.override_set", "capacity override set"
    NODE_OVERRIDE_RESET = "node.override_reset", "capacity override reset"
    NODE_LABELS = "node.labels", "labels changed"
    NODE_UNLOAD = "node.unload", "replicas unloaded"
    RULE_CREATE = "rule.create", "rule created"
    RULE_UPDATE = "rule.update", "rule updated"
    RULE_DELETE = "rule.delete", "rule deleted"
    RULE_BREAKER_RESET = "rule.breaker_reset", "breaker reset"
    MODEL_CREATE = "model.create", "model added"
    MODEL_UPDATE = "model.update", "model edited"
    MODEL_DELETE = "model.delete", "model deleted"
    MODEL_RETRY_LOAD = "model.retry_load", "load retried"
    MODEL_LOAD_NOW = "model.load_now", "replica loaded now"
    MODEL_UNLOAD_ALL = "model.unload_all", "replicas unloaded (all)"
    MODEL_PREFETCH = "model.prefetch", "files prefetched"
    API_KEY_CREATE = "api_key.create", "API key created"
    API_KEY_REVOKE = "api_key.revoke", "API key revoked"


class AuditEntryQuerySet(models.QuerySet):
    def update(self, **kwargs):  # type: ignore[override]
        raise AuditEntryImmutable

    def delete(self):  # type: ignore[override]
        raise AuditEntryImmutable


class AuditEntryImmutable(Exception):
    """Audit entries are append-only: never updated, never deleted (a database trigger refuses it too)."""

    def __str__(self) -> str:
        return "audit entries are append-only"


class AuditEntry(models.Model):
    """Who (`actor_kind`, `actor_name`, `actor_id`) did what (`action`) to which target (`target_type`,
    `target_id`, `target_name`) when (`at`), through which door (`via`), with the target's state before and
    after (JSON; null for a creation's before or a deletion's after)."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices)
    actor_name = models.CharField(max_length=255, blank=True, default="")
    actor_id = models.CharField(max_length=64, blank=True, default="")
    via = models.CharField(max_length=16, choices=Door.choices)
    action = models.CharField(max_length=64, choices=Action.choices)
    target_type = models.CharField(max_length=32)
    target_id = models.CharField(max_length=255, blank=True, default="")
    target_name = models.CharField(max_length=255, blank=True, default="")
    before = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    after = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)

    objects = AuditEntryQuerySet.as_manager()

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit entries"
        indexes = [
            models.Index(fields=["target_type", "target_id", "-at"], name="auditentry_target_at"),
            models.Index(fields=["action", "-at"], name="auditentry_action_at"),
            models.Index(fields=["actor_name", "-at"], name="auditentry_actor_at"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_kind}:{self.actor_name} {self.action} {self.target_name}"

    def save(self, *args, **kwargs):  # type: ignore[override]
        if self.pk is not None and not self._state.adding:
            raise AuditEntryImmutable
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):  # type: ignore[override]
        raise AuditEntryImmutable
