"""Django admin for the catalog and the scheduling rules (with their circuit breaker state)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from scheduling.models import ModelConfig, SchedulingRule


@admin.register(ModelConfig)
class ModelConfigAdmin(admin.ModelAdmin):
    list_display = ("name", "backend", "model", "vram_bytes", "context_size", "updated_at")
    search_fields = ("name", "model")
    list_filter = ("backend",)


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
