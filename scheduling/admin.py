"""Django admin for the catalog and the scheduling rules (with their circuit breaker state). Every change is
audited (`audit.admin.AuditedModelAdmin`); the breaker reset and "retry now" go through the services."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from audit.admin import AuditedModelAdmin
from scheduling.catalog import model_retry_load, model_state
from scheduling.loadfailures import load_failure_clear
from scheduling.models import LoadFailure, ModelConfig, SchedulingRule
from scheduling.services import rule_state, rules_breaker_reset


@admin.register(ModelConfig)
class ModelConfigAdmin(AuditedModelAdmin):
    list_display = ("name", "backend", "model", "vram_bytes", "context_size", "routing", "updated_at")
    search_fields = ("name", "model")
    list_filter = ("backend",)
    audit_target_type = "model"

    def audit_state(self, obj: ModelConfig) -> dict[str, Any] | None:  # type: ignore[override]
        return model_state(obj)

    def audit_target(self, obj: ModelConfig) -> tuple[str, str]:  # type: ignore[override]
        return obj.name, obj.name

    def save_model(self, request: HttpRequest, obj: ModelConfig, form: Any, change: bool) -> None:
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            load_failure_clear(model_name=obj.name, reason="catalog entry edited in the admin")

    def delete_model(self, request: HttpRequest, obj: ModelConfig) -> None:
        with transaction.atomic():
            super().delete_model(request, obj)
            load_failure_clear(model_name=obj.name, reason="catalog entry deleted in the admin")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ModelConfig]) -> None:
        with transaction.atomic():
            names = list(queryset.values_list("name", flat=True))
            super().delete_queryset(request, queryset)
            LoadFailure.objects.filter(model_name__in=names).delete()


@admin.register(LoadFailure)
class LoadFailureAdmin(admin.ModelAdmin):
    """Models whose loads fail (read-only); deleting a row is "retry now" (audited as `model.retry_load`)."""

    list_display = ("model_name", "failures", "first_failed_at", "retry_at", "last_error")
    search_fields = ("model_name",)
    readonly_fields = (
        "model_name",
        "failures",
        "last_error",
        "first_failed_at",
        "last_failed_at",
        "retry_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: LoadFailure) -> None:
        model_retry_load(name=obj.model_name)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[LoadFailure]) -> None:
        with transaction.atomic():
            for name in list(queryset.values_list("model_name", flat=True)):
                model_retry_load(name=name)


@admin.register(SchedulingRule)
class SchedulingRuleAdmin(AuditedModelAdmin):
    list_display = (
        "model_name",
        "min_replicas",
        "max_replicas",
        "node_selector",
        "unsatisfiable_until",
        "unsatisfiable_ticks",
        "unsatisfiable_reason",
    )
    search_fields = ("model_name",)
    readonly_fields = ("unsatisfiable_until", "unsatisfiable_ticks", "unsatisfiable_reason")
    actions = ("reset_breaker",)
    audit_target_type = "rule"

    def audit_state(self, obj: SchedulingRule) -> dict[str, Any] | None:  # type: ignore[override]
        return rule_state(obj)

    def audit_target(self, obj: SchedulingRule) -> tuple[str, str]:  # type: ignore[override]
        return obj.model_name, obj.model_name

    @admin.action(description="Reset the circuit breaker")
    def reset_breaker(self, request: HttpRequest, queryset: QuerySet[SchedulingRule]) -> None:
        count = rules_breaker_reset(model_names=list(queryset.values_list("model_name", flat=True)))
        self.message_user(request, f"Reset {count} rule(s).", messages.SUCCESS)
