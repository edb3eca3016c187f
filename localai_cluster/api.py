"""Shared pieces of the HTTP APIs: the `{"error", "details"}` error shape for every `/api/*` route."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is not in a state that allows this."
    default_code = "conflict"


def _first_message(detail: Any) -> str:
    if isinstance(detail, dict):
        for value in detail.values():
            return _first_message(value)
        return ""
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else ""
    return str(detail)


def error_body(message: str, details: dict | None = None) -> dict[str, Any]:
    return {"error": message, "details": details or {}}


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """Render every API error as `{"error": "<one sentence>", "details": {...}}`."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        # The database is down or out of connections: a clean, retryable answer instead of an HTML 500.
        logger.warning("API: the database is unavailable: %s", exc)
        response = Response(
            error_body("The control plane's database is unavailable; retry shortly."),
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
        response["Retry-After"] = "5"
        return response
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    elif isinstance(exc, ValidationError):
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        )
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        details = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        message = "Invalid input."
        first = _first_message(details)
        if first:
            field = next(iter(details), "")
            message = f"Invalid input: {field}: {first}" if field != "non_field_errors" else first
        response.data = error_body(message, details)
    else:
        detail = getattr(exc, "detail", "")
        response.data = error_body(_first_message(detail) or response.status_text)
    return response
