"""Django admin for the catalog and the scheduling rules (with their circuit breaker state)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from scheduling.loadfailures import load_failure_clear
from scheduling.models import LoadFailure, ModelConfig, SchedulingRule


@admin.register(ModelConfig)
class ModelConfigAdmin(admin.ModelAdmin):
    list_display = ("name", "backend", "model", "vram_bytes", "context_size", "updated_at")
    search_fields = ("name", "model")
    list_filter = ("backend",)

    def save_model(self, request: HttpRequest, obj: ModelConfig, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        load_failure_clear(model_name=obj.name, reason="catalog entry edited in the admin")

    def delete_model(self, request: HttpRequest, obj: ModelConfig) -> None:
        super().delete_model(request, obj)
        load_failure_clear(model_name=obj.name, reason="catalog entry deleted in the admin")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ModelConfig]) -> None:
        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        LoadFailure.objects.filter(model_name__in=names).delete()


@admin.register(LoadFailure)
class LoadFailureAdmin(admin.ModelAdmin):
    """Models whose loads fail (read-only); deleting a row is "retry now"."""

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


@admin.register(SchedulingRule)
class SchedulingRuleAdmin(admin.ModelAdmin):
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

    @admin.action(description="Reset the circuit breaker")
    def reset_breaker(self, request: HttpRequest, queryset: QuerySet[SchedulingRule]) -> None:
        count = queryset.update(unsatisfiable_ticks=0, unsatisfiable_until=None, unsatisfiable_reason="")
        self.message_user(request, f"Reset {count} rule(s).", messages.SUCCESS)
