"""HTMX helpers for the operator pages (NetBox's `utilities/htmx.py` habit): one view answers the full page,
or just the fragment for an HTMX request; outcomes travel as an `HX-Trigger` toast event."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden


def is_htmx(request: HttpRequest) -> bool:
    """An HTMX request that wants a fragment (a history restore wants the full page)."""
    return (
        request.headers.get("HX-Request") == "true"
        and request.headers.get("HX-History-Restore-Request") != "true"
    )


def toast(response: HttpResponse, message: str, *, level: str = "success") -> HttpResponse:
    """Adds a `toast` event to the response's `HX-Trigger` header; the page shows it in its status region."""
    events: dict[str, Any] = {}
    if response.has_header("HX-Trigger"):
        events = json.loads(response["HX-Trigger"])
    events["toast"] = {"message": message, "level": level}
    # Non-ASCII is escaped: header values must be latin-1.
    response["HX-Trigger"] = json.dumps(events)
    return response


def outcome(
    request: HttpRequest, response: HttpResponse, message: str, *, level: str = "success"
) -> HttpResponse:
    """Reports an action's outcome: a toast for HTMX requests, a flash message (shown as a toast on the next
    page) otherwise."""
    if is_htmx(request):
        return toast(response, message, level=level)
    (messages.success if level == "success" else messages.error)(request, message)
    return response


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Only active staff users. Anonymous users go to the login page (an HTMX request is told to navigate
    there with `HX-Redirect`); a signed-in non-staff user gets 403."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if user.is_authenticated and user.is_active and user.is_staff:
            return view(request, *args, **kwargs)
        if user.is_authenticated:
            return HttpResponseForbidden("Staff only.")
        if is_htmx(request):
            response = HttpResponse(status=401)
            response["HX-Redirect"] = (
                f"{settings.LOGIN_URL}?next={request.headers.get('HX-Current-URL', '/')}"
            )
            return response
        return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)

    return wrapper
