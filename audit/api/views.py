"""`GET /api/audit`: the audit trail, newest first (admin only)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from audit.api.serializers import TARGET_TYPES, AuditEntrySerializer, AuditFilterSerializer
from audit.models import Action
from audit.selectors import audit_filtered
from localai_cluster.api import PAGE_PARAMETERS, paginated_response, paginated_schema
from nodes.api.admin_serializers import AUTH_ERRORS, error_responses
from nodes.api.permissions import AdminAPIView


class AuditListView(AdminAPIView):
    @extend_schema(
        operation_id="audit_list",
        parameters=[
            OpenApiParameter(
                "actor", OpenApiTypes.STR, description="Only this actor (user, API key or command name)."
            ),
            OpenApiParameter("action", OpenApiTypes.STR, enum=Action.values, description="Only this action."),
            OpenApiParameter(
                "target_type",
                OpenApiTypes.STR,
                enum=list(TARGET_TYPES),
                description="Only this kind of target.",
            ),
            OpenApiParameter("target_id", OpenApiTypes.STR, description="Only this target (its id or name)."),
            OpenApiParameter(
                "since", OpenApiTypes.DATETIME, description="Only entries at or after this time."
            ),
            OpenApiParameter("until", OpenApiTypes.DATETIME, description="Only entries before this time."),
            *PAGE_PARAMETERS,
        ],
        responses={
            200: paginated_schema("PaginatedAuditEntryList", AuditEntrySerializer(many=True)),
            **error_responses(400, 404, *AUTH_ERRORS),
        },
        description="The audit trail, newest first: every admin action through the API, the pages, the "
        "Django admin or a management command — who, when, what, and the target before → after.",
        tags=["audit"],
    )
    def get(self, request: Request) -> Response:
        query = AuditFilterSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return paginated_response(request, self, audit_filtered(**query.validated_data), AuditEntrySerializer)
