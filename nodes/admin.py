"""Django admin for the registry. Actions go through the registry services, like the API and the pages."""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from nodes import services
from nodes.models import ApiKey, ModelReplica, Node, NodeLabel

RESOURCE_FIELDS = (
    "total_vram",
    "available_vram",
    "reserved_vram",
    "total_ram",
    "available_ram",
    "gpu_vendor",
    "worker_max_replicas_per_model",
    "last_heartbeat",
    "approved_at",
    "created_at",
    "updated_at",
)


class NodeLabelInline(admin.TabularInline):
    model = NodeLabel
    extra = 0


class ModelReplicaInline(admin.TabularInline):
    model = ModelReplica
    extra = 0
    can_delete = False
    fields = ("model_name", "replica_index", "state", "address", "in_flight", "last_used", "loaded_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


def _node_action(verb: str, service: Callable[..., Node]) -> Callable:
    def action(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        from nodes.exceptions import NodeError

        done = []
        for node in queryset:
            try:
                service(node=node)
                done.append(node.name)
            except NodeError as exc:
                modeladmin.message_user(request, str(exc), messages.WARNING)
        if done:
            modeladmin.message_user(request, f"{verb}: {', '.join(done)}", messages.SUCCESS)

    action.__name__ = service.__name__
    action.short_description = f"{verb} selected nodes"  # type: ignore[attr-defined]
    return action


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "status",
        "node_type",
        "address",
        "effective_cap",
        "max_replicas_override",
        "vram",
        "last_heartbeat",
        "approved_at",
    )
    list_filter = ("status", "node_type")
    search_fields = ("name", "address")
    readonly_fields = ("id", *RESOURCE_FIELDS)
    fields = ("id", "name", "node_type", "address", "status", "max_replicas_override", *RESOURCE_FIELDS)
    inlines = (NodeLabelInline, ModelReplicaInline)
    actions = (
        _node_action("Approved", services.node_approve),
        _node_action("Draining", services.node_drain),
        _node_action("Resumed", services.node_resume),
    )

    @admin.display(description="slots")
    def effective_cap(self, node: Node) -> int:
        return node.effective_max_replicas

    @admin.display(description="VRAM free / total (reserved)")
    def vram(self, node: Node) -> str:
        gib = 1024**3
        return f"{node.available_vram / gib:.1f} / {node.total_vram / gib:.1f} GiB ({node.reserved_vram / gib:.1f})"


@admin.register(ModelReplica)
class ModelReplicaAdmin(admin.ModelAdmin):
    list_display = ("model_name", "replica_index", "node", "state", "in_flight", "address", "last_used")
    list_filter = ("state", "model_name")
    search_fields = ("model_name", "node__name")
    list_select_related = ("node",)
    readonly_fields = ("in_flight", "last_used", "load_started_at", "loaded_at", "last_seen_at")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created with `manage.py create_api_key` (the key is shown once); here they are listed and
    revoked, never deleted."""

    list_display = ("name", "prefix", "is_admin", "created_at", "last_used_at", "revoked_at")
    list_filter = ("is_admin",)
    readonly_fields = ("name", "prefix", "is_admin", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        # Revoke only: the gateway is open while no key was ever made, so deleting keys must not reopen it.
        return False

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)
