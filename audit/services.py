"""The one way to write the audit trail: `record(...)`, called by the services that change what an admin can
change (nodes, labels, capacity, replicas, rules, catalog, keys, load retries), inside their transaction.

Who acted comes from `audit.context.current_actor()` (the request's user or API key, the command, or an
explicit `acting_as`), so a door never has to pass it along and cannot forget it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

from audit.context import Actor, current_actor
from audit.models import AuditEntry

MAX_NAME = 255


class NotInTransaction(RuntimeError):
    """`record` outside a transaction: the entry and the change it describes must commit together."""


def _jsonable(value: Any) -> Any:
    """A JSON document of `value` (datetimes, UUIDs and decimals as strings), so `before`/`after` read back
    exactly as they were written."""
    if value is None:
        return None
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder, sort_keys=True))


def record(
    *,
    action: str,
    target_type: str,
    target_id: Any = "",
    target_name: str = "",
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    actor: Actor | None = None,
    skip_unchanged: bool = True,
) -> AuditEntry | None:
    """Writes one audit entry in the current transaction (raises `NotInTransaction` outside one: the entry
    commits or rolls back with the change). `action` is `<target type>.<verb>` (e.g. `node.drain`); `before`
    and `after` are the target's state (None: it did not exist / no longer exists). With `skip_unchanged`
    (the default) an action that changed nothing (`before == after`) writes nothing and answers None.
    The actor is `current_actor()` unless given."""
    if not transaction.get_connection().in_atomic_block:
        raise NotInTransaction(f"audit.record({action!r}) must run inside the change's transaction")
    before_doc, after_doc = _jsonable(before), _jsonable(after)
    if skip_unchanged and before_doc == after_doc and before_doc is not None:
        return None
    who = actor or current_actor()
    return AuditEntry.objects.create(
        actor_kind=who.kind,
        actor_name=who.name[:MAX_NAME],
        actor_id=who.id[:64],
        via=who.via,
        action=action,
        target_type=target_type,
        target_id=str(target_id)[:MAX_NAME],
        target_name=str(target_name)[:MAX_NAME],
        before=before_doc,
        after=after_doc,
    )
