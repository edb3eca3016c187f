"""The Django admin door of the audit trail.

- `AuditEntryAdmin`: the trail, read-only (entries are append-only).
- `AuditedModelAdmin`: a `ModelAdmin` whose add / change / delete (one object, or the bulk delete action)
  write an audit entry in the same transaction. Subclasses name the target type and how to describe an
  object (`audit_state`, `audit_target`). Admin actions that have a service (approve, drain, revoke, …) call
  the service, which records its own entry.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import transaction
from django.db.models import QuerySet
from django.forms.models import model_to_dict
from django.http import HttpRequest

from audit import services as audit
from audit.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("at", "actor_kind", "actor_name", "via", "action", "target_type", "target_name")
    list_filter = ("action", "actor_kind", "via", "target_type")
    search_fields = ("actor_name", "target_name", "target_id")
    date_hierarchy = "at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False


class AuditedModelAdmin(admin.ModelAdmin):
    """Add, change and delete through this admin are audited as `<audit_target_type>.create|update|delete`."""

    audit_target_type = ""

    def audit_state(self, obj: Any) -> dict[str, Any] | None:
        """What the entry records of `obj` (default: its editable fields)."""
        return model_to_dict(obj)

    def audit_target(self, obj: Any) -> tuple[str, str]:
        """(id, name) of the target."""
        return str(obj.pk), str(obj)

    def _record(self, verb: str, obj: Any, *, before: Any, after: Any) -> None:
        target_id, target_name = self.audit_target(obj)
        audit.record(
            action=f"{self.audit_target_type}.{verb}",
            target_type=self.audit_target_type,
            target_id=target_id,
            target_name=target_name,
            before=before,
            after=after,
        )

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        with transaction.atomic():
            before = None
            if change:
                stored = type(obj)._default_manager.select_for_update().filter(pk=obj.pk).first()
                before = self.audit_state(stored) if stored is not None else None
            super().save_model(request, obj, form, change)
            self._record("update" if change else "create", obj, before=before, after=self.audit_state(obj))

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with transaction.atomic():
            self._record("delete", obj, before=self.audit_state(obj), after=None)
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        with transaction.atomic():
            for obj in queryset.select_for_update():
                self._record("delete", obj, before=self.audit_state(obj), after=None)
            super().delete_queryset(request, queryset)
