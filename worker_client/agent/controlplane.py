"""The control plane's worker self-service API (`/api/node/`, CONTRACT §3.1), as the agent uses it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

REQUEST_TIMEOUT = 10.0
TOKEN_REJECTED_STATUSES = frozenset({401, 403, 404})


class ControlPlaneError(Exception):
    """The control plane could not be reached or did not answer 2xx."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ControlPlaneUnreachable(ControlPlaneError):
    """No answer at all: connection refused or reset, DNS failure, timeout."""


class TokenRejected(ControlPlaneError):
    """401, 403 or 404 on a node call: the token was revoked or the node deleted; register again."""


@dataclass(frozen=True)
class Registration:
    """What registering answered."""

    id: str
    node_token: str
    backend_token: str  # given to backends as LOCALAI_GRPC_AUTH_TOKEN
    heartbeat_interval: float | None
    status: str

    @classmethod
    def from_answer(cls, answer: Any) -> Registration:
        try:
            interval = answer.get("heartbeat_interval")
            return cls(
                id=str(answer["id"]),
                node_token=str(answer["node_token"]),
                backend_token=str(answer.get("backend_token") or answer["node_token"]),
                heartbeat_interval=float(interval) if interval else None,
                status=str(answer.get("status", "")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ControlPlaneError(f"malformed registration answer: {error!r}") from error


class ControlPlane:
    """HTTP calls to `/api/node/`; every failure is a `ControlPlaneError`."""

    def __init__(self, base_url: str, registration_token: str, timeout: float = REQUEST_TIMEOUT) -> None:
        self._registration_token = registration_token
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        token: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._http.request(method, path, json=body, headers=headers, **extra)
        except httpx.HTTPError as error:
            raise ControlPlaneUnreachable(f"{method} {path}: {error!r}") from error
        if response.status_code in TOKEN_REJECTED_STATUSES and path != "/api/node/register":
            raise TokenRejected(f"{method} {path}: {response.status_code}", response.status_code)
        if not response.is_success:
            raise ControlPlaneError(
                f"{method} {path}: {response.status_code} {response.text[:200]}", response.status_code
            )
        try:
            return response.json() if response.content else {}
        except ValueError as error:
            raise ControlPlaneError(f"{method} {path}: answer is not JSON") from error

    async def register(self, body: dict[str, Any]) -> Registration:
        """POST /api/node/register with the registration token."""
        answer = await self._request("POST", "/api/node/register", self._registration_token, body)
        return Registration.from_answer(answer)

    async def heartbeat(self, node: Registration, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/node/{id}/heartbeat; the answer's `orphans` are keys the control plane has no row for."""
        answer = await self._request("POST", f"/api/node/{node.id}/heartbeat", node.node_token, body)
        return answer if isinstance(answer, dict) else {}

    async def downloads(self, node: Registration, body: dict[str, Any]) -> None:
        """POST /api/node/{id}/downloads: staging progress of the node's replicas."""
        await self._request("POST", f"/api/node/{node.id}/downloads", node.node_token, body, timeout=5.0)

    async def drain(self, node: Registration, timeout: float | None = None) -> None:
        await self._request("POST", f"/api/node/{node.id}/drain", node.node_token, timeout=timeout)

    async def in_flight(self, node: Registration, timeout: float | None = None) -> int:
        """The sum of `in_flight` over the node's replicas (GET /api/node/{id}/models)."""
        answer = await self._request("GET", f"/api/node/{node.id}/models", node.node_token, timeout=timeout)
        replicas = answer.get("results", []) if isinstance(answer, dict) else answer
        try:
            return sum(int(replica.get("in_flight") or 0) for replica in replicas)
        except (AttributeError, TypeError, ValueError) as error:
            raise ControlPlaneError(f"malformed models answer: {error!r}") from error

    async def deregister(self, node: Registration, timeout: float | None = None) -> None:
        await self._request("POST", f"/api/node/{node.id}/deregister", node.node_token, timeout=timeout)
