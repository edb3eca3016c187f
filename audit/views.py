"""The audit page (`/ui/audit/`): the trail newest first, filtered by actor, action, target and time. Thin:
the filters are the API's serializer, the rows `audit.selectors.audit_filtered`."""

from __future__ import annotations

from urllib.parse import urlencode

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from audit.api.serializers import TARGET_TYPES, AuditFilterSerializer
from audit.models import Action
from audit.presentation import entry_rows
from audit.selectors import audit_filtered
from localai_cluster.htmx import is_htmx, staff_required

PAGE = "audit/audit.html"
PER_PAGE = 50
FILTERS = ("actor", "action", "target_type", "target_id", "since", "until")


@require_GET
@staff_required
def audit_list(request: HttpRequest) -> HttpResponse:
    """Two queries whatever the number of entries (a count and one page). For HTMX only the table (the
    filters re-ask it as they change)."""
    params = {key: request.GET[key] for key in FILTERS if request.GET.get(key)}
    query = AuditFilterSerializer(data=params)
    errors = {} if query.is_valid() else query.errors
    filters = query.validated_data if not errors else {}
    page = Paginator(audit_filtered(**filters), PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "rows": entry_rows(page.object_list),
        "filters": params,
        "query": urlencode(params),
        "errors": errors,
        "actions": Action.choices,
        "target_types": TARGET_TYPES,
        "nav": "audit",
    }
    if is_htmx(request):
        return render(request, f"{PAGE}#table", context)
    return render(request, PAGE, context)
