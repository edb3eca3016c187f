"""Reads of the audit trail."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Q, QuerySet

from audit.models import AuditEntry


def audit_filtered(
    *,
    actor: str = "",
    action: str = "",
    target_type: str = "",
    target_id: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEntry]:
    """Entries newest first, filtered: `actor` (the actor's name), `action`, `target_type`, `target_id` (the
    target's id or its name), each exactly; `since` (at or after), `until` (before)."""
    queryset = AuditEntry.objects.order_by("-at", "-id")
    if actor:
        queryset = queryset.filter(actor_name=actor)
    if action:
        queryset = queryset.filter(action=action)
    if target_type:
        queryset = queryset.filter(target_type=target_type)
    if target_id:
        queryset = queryset.filter(Q(target_id=target_id) | Q(target_name=target_id))
    if since is not None:
        queryset = queryset.filter(at__gte=since)
    if until is not None:
        queryset = queryset.filter(at__lt=until)
    return queryset


def audit_for_target(*, target_type: str, target_id: str, limit: int = 10) -> list[AuditEntry]:
    """The target's latest entries (a node's drawer): one query."""
    return list(
        AuditEntry.objects.filter(target_type=target_type, target_id=str(target_id)).order_by("-at", "-id")[
            :limit
        ]
    )
