"""Who is acting, for every door, without passing it through every service.

- HTTP (API, pages, Django admin): `AuditActorMiddleware` puts the request in a context variable for the
  time of the request. The actor is read from it only when an entry is written, so DRF's authentication
  (which runs inside the view and sets `request.user` to the API key's user) is already done: an admin API
  key is recorded as `api_key` with the key's name, a session as `user` with the username. The door comes
  from the path: `/api/` → `api`, `/admin/` → `admin`, anything else (`/ui/…`) → `page`.
- Management commands: `AuditedCommand` (a `BaseCommand`) acts as `command` named after the command.
  A command started by `manage.py <name>` that does not use it is still recorded as that command
  (from `sys.argv`).
- Anything else (a script, a test, a loop): `acting_as(Actor(...))`, else the `system` actor.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.management.base import BaseCommand

from audit.models import ActorKind, Door


@dataclass(frozen=True)
class Actor:
    """Who acts: `kind` (user, api_key, command, system), a `name`, an optional `id` (user or key id), and
    the door (`via`) the action came through."""

    kind: str
    name: str
    via: str
    id: str = ""

    @classmethod
    def command(cls, name: str) -> Actor:
        return cls(kind=ActorKind.COMMAND, name=name, via=Door.COMMAND)

    @classmethod
    def system(cls, name: str = "system") -> Actor:
        return cls(kind=ActorKind.SYSTEM, name=name, via=Door.SYSTEM)


_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("audit_actor", default=None)
_request: contextvars.ContextVar[Any] = contextvars.ContextVar("audit_request", default=None)


@contextlib.contextmanager
def acting_as(actor: Actor) -> Iterator[Actor]:
    """Every entry written inside the block names `actor` (it wins over the current request)."""
    token = _actor.set(actor)
    try:
        yield actor
    finally:
        _actor.reset(token)


def door_of(path: str) -> str:
    if path.startswith("/api/"):
        return Door.API
    if path.startswith("/admin/"):
        return Door.ADMIN
    return Door.PAGE


def actor_of_request(request: Any) -> Actor:
    """The actor of an HTTP request, read after authentication (DRF's `request.user` reaches the Django
    request): an API key user (`.api_key`), else the session user."""
    via = door_of(getattr(request, "path", "") or "")
    user = getattr(request, "user", None)
    api_key = getattr(user, "api_key", None)
    if api_key is not None:
        return Actor(kind=ActorKind.API_KEY, name=api_key.name, id=str(api_key.pk), via=via)
    if user is not None and getattr(user, "is_authenticated", False):
        return Actor(kind=ActorKind.USER, name=user.get_username(), id=str(user.pk), via=via)
    return Actor(kind=ActorKind.SYSTEM, name="anonymous", via=via)


def _process_actor() -> Actor:
    argv = sys.argv
    if len(argv) >= 2 and Path(argv[0]).name == "manage.py" and not argv[1].startswith("-"):
        return Actor.command(argv[1])
    return Actor.system()


def current_actor() -> Actor:
    """Who is acting now: `acting_as`, else the current HTTP request's user or key, else the command
    started by `manage.py`, else `system`."""
    actor = _actor.get()
    if actor is not None:
        return actor
    request = _request.get()
    if request is not None:
        return actor_of_request(request)
    return _process_actor()


class AuditActorMiddleware:
    """Puts the request in context for the audit trail (sync and async)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        token = _request.set(request)
        try:
            return self.get_response(request)
        finally:
            _request.reset(token)

    async def __acall__(self, request: Any) -> Any:
        token = _request.set(request)
        try:
            return await self.get_response(request)
        finally:
            _request.reset(token)


class AuditedCommand(BaseCommand):
    """Base of management commands that change something: entries they write name the command."""

    def execute(self, *args: Any, **options: Any) -> Any:
        name = self.__module__.rsplit(".", 1)[-1]
        with acting_as(Actor.command(name)):
            return super().execute(*args, **options)
