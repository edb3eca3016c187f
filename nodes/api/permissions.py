"""Who may call the admin API (`/api/nodes/*`, `/api/models/*`).

Two ways in: a staff user's Django session (CSRF-checked for unsafe methods), or `Authorization: Bearer <key>`
with an admin API key. An inference-only key, a node token or a non-staff user is authenticated but not allowed
(403); no credentials or an unknown/revoked bearer value is 401 with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView

from nodes.apikeys import api_key_authenticate, api_key_hash, api_key_lookup
from nodes.models import ApiKey, Node


@dataclass(frozen=True)
class ApiKeyUser:
    """`request.user` for a request authenticated by an API key (`request.auth` is the `ApiKey`)."""

    api_key: ApiKey
    is_authenticated: bool = field(default=True, init=False)
    is_active: bool = field(default=True, init=False)

    @property
    def is_staff(self) -> bool:
        return self.api_key.is_admin

    def __str__(self) -> str:
        return f"api-key:{self.api_key.prefix}"


@dataclass(frozen=True)
class NodeUser:
    """`request.user` for a request that presented a node's own token (`request.auth` is the `Node`). Node
    tokens are for `/api/node/{id}/*` only; the admin API refuses them with 403."""

    node: Node
    is_authenticated: bool = field(default=True, init=False)
    is_active: bool = field(default=True, init=False)
    is_staff: bool = field(default=False, init=False)

    def __str__(self) -> str:
        return f"node:{self.node.name}"


def bearer_token(request: Request) -> str | None:
    """The value of `Authorization: Bearer <value>`, or None without such a header."""
    header = authentication.get_authorization_header(request).split()
    if not header or header[0].lower() != b"bearer":
        return None
    if len(header) != 2:
        raise exceptions.AuthenticationFailed("Invalid Authorization header: expected 'Bearer <key>'.")
    try:
        return header[1].decode("ascii")
    except UnicodeDecodeError:
        raise exceptions.AuthenticationFailed("Invalid Authorization header: the key is not ASCII.") from None


class BearerAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <API key>`; a node token is recognised too (so the admin API can answer 403)."""

    keyword = "Bearer"

    def authenticate(self, request: Request):
        raw = bearer_token(request)
        if raw is None:
            return None
        api_key = api_key_authenticate(raw)
        if api_key is not None:
            return ApiKeyUser(api_key), api_key
        if (revoked := api_key_lookup(raw)) is not None and revoked.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API key has been revoked.")
        node = Node.objects.filter(token_hash=api_key_hash(raw)).exclude(token_hash="").first()
        if node is not None:
            return NodeUser(node), node
        raise exceptions.AuthenticationFailed("Invalid API key.")

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="api"'


class IsClusterAdmin(permissions.BasePermission):
    """An admin API key, or an active staff user's session."""

    message = "This route needs an admin API key or a staff user's session."

    def has_permission(self, request: Request, view: APIView) -> bool:
        if isinstance(request.auth, ApiKey):
            return request.auth.is_admin
        if isinstance(request.auth, Node):
            return False
        user = request.user
        return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


class AdminAPIView(APIView):
    """Base of every admin API view: bearer keys first (so a missing credential answers 401), then the
    session with CSRF enforced for unsafe methods."""

    authentication_classes = [BearerAuthentication, authentication.SessionAuthentication]
    permission_classes = [IsClusterAdmin]


class BearerAuthenticationScheme(OpenApiAuthenticationExtension):
    """OpenAPI security scheme of `BearerAuthentication`."""

    target_class = "nodes.api.permissions.BearerAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An admin API key (`python manage.py create_api_key --name NAME --admin`).",
        }
