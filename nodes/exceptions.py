"""Errors the registry services raise; the API layers map them to HTTP statuses."""

from __future__ import annotations

from typing import Any


class NodeError(Exception):
    """Base class of the registry's errors."""


class InvalidTransition(NodeError):
    """The node is not in a state that allows this action (HTTP 409)."""

    def __init__(self, *, node: Any, action: str, status: str) -> None:
        self.node = node
        self.action = action
        self.status = status
        super().__init__(f"Cannot {action} node {node.name}: it is {status}.")


class InvalidValue(NodeError, ValueError):
    """An argument the service refuses (HTTP 400); `details` is `{field: [message]}`."""

    def __init__(self, message: str, *, field: str = "non_field_errors") -> None:
        self.field = field
        self.details = {field: [message]}
        super().__init__(message)


class NameTaken(NodeError):
    """A registration of a known name that proved neither the node's credential nor its current node token
    (HTTP 409); nothing was changed."""

    def __init__(self, *, name: str) -> None:
        self.name = name
        super().__init__(
            f"node {name} is registered by another agent; delete it first or present its credential"
        )
