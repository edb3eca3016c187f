"""Shared pieces of the HTTP APIs: the `{"error", "details"}` error shape for every `/api/*` route, and the one
JSON parser every DRF view uses (bounded size, depth and strings: `localai_cluster.bounds`)."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, ValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, inline_serializer
from rest_framework import exceptions, parsers, serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from localai_cluster.bounds import UnsafeJSON, loads_checked

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is not in a state that allows this."
    default_code = "conflict"


def with_details(error: exceptions.APIException, details: dict[str, Any]) -> exceptions.APIException:
    """`error` answered with `details` in the error shape (`{"error": …, "details": details}`)."""
    error.error_details = details  # type: ignore[attr-defined]
    return error


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "payload_too_large"


def too_large_message(limit: int) -> str:
    return f"The request body is larger than {limit} bytes (LOCALAI_MAX_BODY_BYTES)."


class BoundedJSONParser(parsers.JSONParser):
    """DRF's JSON parser with the bounds of every `/api/*` body: at most `LOCALAI_MAX_BODY_BYTES` read (413
    beyond), JSON nested at most `bounds.MAX_JSON_DEPTH` deep, no NUL or lone surrogate in any string (400)."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.LOCALAI_MAX_BODY_BYTES
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            data = stream.read(limit + 1)
        except RequestDataTooBig:
            raise PayloadTooLarge(too_large_message(limit)) from None
        if len(data) > limit:
            raise PayloadTooLarge(too_large_message(limit))
        try:
            return loads_checked(data.decode(encoding))
        except UnsafeJSON as exc:
            if exc.field is not None:
                raise exceptions.ValidationError({exc.field: [str(exc)]}) from None
            raise exceptions.ParseError(str(exc)) from None
        except ValueError as exc:  # also UnicodeDecodeError
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None


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
        response.data = error_body(
            _first_message(detail) or response.status_text, getattr(exc, "error_details", None)
        )
    return response


class ListPagination(PageNumberPagination):
    """Pages of the admin lists (`GET /api/nodes`, `GET /api/models`): `{"count", "next", "previous",
    "results"}`, `?page=N` (from 1) and `?page_size=N` (default 100, at most 1000)."""

    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


PAGE_PARAMETERS = [
    OpenApiParameter("page", int, description="Page number, from 1."),
    OpenApiParameter("page_size", int, description="Items per page (default 100, at most 1000)."),
]


def paginated_schema(name: str, item: serializers.Serializer) -> serializers.Serializer:
    """The OpenAPI schema of a `ListPagination` page of `item`s."""
    return inline_serializer(
        name=name,
        fields={
            "count": serializers.IntegerField(),
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": item,
        },
    )


def paginated_response(request, view, queryset, serializer_class) -> Response:
    """One page of `queryset` (an ordered queryset) rendered with `serializer_class`; an unknown page is 404."""
    paginator = ListPagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer_class(page, many=True).data)
