"""Reads that may lag go to the read replica (`DATABASE_REPLICA_URL`); everything else stays on the primary.

Only code that asks for it reads from the replica: the pages' GET views (`replica_page`), the `/api/nodes`
lists and the `/metrics` gauges enter `replica_reads()`. Inside it, reads of the project's own models go to
the `replica` alias — unless the primary is inside a transaction (a read there must see that transaction's
writes) or the code entered `primary_reads()`, as the claim and the reconciler tick do so that no decision
is ever taken on lagging data. Writes always go to the primary. Without `DATABASE_REPLICA_URL`, there is no
`replica` alias and every read is the primary's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

REPLICA = "replica"
# The apps whose reads may lag; authentication, sessions and the admin's own tables always read the primary.
REPLICA_APPS = frozenset({"nodes", "scheduling", "console"})

_replica_reads: ContextVar[bool] = ContextVar("replica_reads", default=False)


def replica_configured() -> bool:
    return REPLICA in settings.DATABASES


@contextmanager
def replica_reads() -> Iterator[None]:
    """Reads inside may come from the read replica (they may lag behind the primary by its replication)."""
    token = _replica_reads.set(True)
    try:
        yield
    finally:
        _replica_reads.reset(token)


@contextmanager
def primary_reads() -> Iterator[None]:
    """Reads inside come from the primary, even within `replica_reads()` (decisions and claims)."""
    token = _replica_reads.set(False)
    try:
        yield
    finally:
        _replica_reads.reset(token)


def replica_page(view: Callable[..., Any]) -> Callable[..., Any]:
    """A page view whose GET (and HEAD) reads from the replica, template rendering included; its other
    methods (the forms' writes and the page they answer) read the primary."""

    @functools.wraps(view)
    def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method not in ("GET", "HEAD"):
            return view(request, *args, **kwargs)
        with replica_reads():
            response = view(request, *args, **kwargs)
            render = getattr(response, "render", None)
            if render is not None and not getattr(response, "is_rendered", True):
                response = render()
        return response

    return wrapper


class ReplicaRouter:
    """`DATABASE_ROUTERS` entry: sends the reads allowed to lag to `replica`, nothing else."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        if not _replica_reads.get() or not replica_configured():
            return None
        if model._meta.app_label not in REPLICA_APPS:
            return None
        if connections[DEFAULT_DB_ALIAS].in_atomic_block:
            return None
        return REPLICA

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        # The replica holds the primary's rows: objects read from either may be related.
        databases = {DEFAULT_DB_ALIAS, REPLICA}
        if obj1._state.db in databases and obj2._state.db in databases:
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        # A streaming replica follows the primary's schema: migrations run on the primary only.
        return False if db == REPLICA else None
