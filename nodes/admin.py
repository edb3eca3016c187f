"""Django admin for the registry. Actions go through the registry services, like the API and the pages, and
are audited there; a node's edit form and its labels inline are audited as `node.update` / `node.labels`;
deleting a node or a replica row goes through `node_delete` / `replica_unload` (the agent stops them)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from audit import services as audit
from audit.admin import AuditedModelAdmin
from audit.models import Action
from nodes import services
from nodes.apikeys import api_key_revoke
from nodes.models import ApiKey, ModelReplica, Node, NodeLabel
from nodes.selectors import node_admin_labels

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
class NodeAdmin(AuditedModelAdmin):
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
    audit_target_type = "node"

    def audit_state(self, obj: Node) -> dict[str, Any] | None:  # type: ignore[override]
        return {
            field: getattr(obj, field)
            for field in ("name", "node_type", "address", "status", "max_replicas_override")
        }

    def audit_target(self, obj: Node) -> tuple[str, str]:  # type: ignore[override]
        return str(obj.pk), obj.name

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """The labels inline: one `node.labels` entry with the labels before and after."""
        node = form.instance
        with transaction.atomic():
            before = node_admin_labels(node=node) if change else {}
            super().save_related(request, form, formsets, change)
            audit.record(
                action=Action.NODE_LABELS,
                target_type="node",
                target_id=node.pk,
                target_name=node.name,
                before={"labels": before},
                after={"labels": node_admin_labels(node=node)},
            )

    def delete_model(self, request: HttpRequest, obj: Node) -> None:
        services.node_delete(node=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        with transaction.atomic():
            for node in queryset:
                services.node_delete(node=node)

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

    def has_change_permission(self, request: HttpRequest, obj: ModelReplica | None = None) -> bool:
        # Rows mirror what agents run: they are unloaded (below), never edited by hand.
        return False

    def delete_model(self, request: HttpRequest, obj: ModelReplica) -> None:
        services.replica_unload(node=obj.node, replicas=[obj])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ModelReplica]) -> None:
        rows = list(queryset.select_related("node").order_by("node_id"))
        with transaction.atomic():
            for _, group in groupby(rows, key=lambda row: row.node_id):
                replicas = list(group)
                services.replica_unload(node=replicas[0].node, replicas=replicas)


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
        with transaction.atomic():
            keys = list(queryset.filter(revoked_at__isnull=True))
            for api_key in keys:
                api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)
