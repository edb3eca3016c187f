"""How an entry's before → after reads on the pages: the fields that changed, each `before → after`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from audit.models import AuditEntry

MAX_VALUE = 160


@dataclass(frozen=True)
class Change:
    field: str
    before: str | None  # None: the field was absent (a creation)
    after: str | None  # None: the field is gone (a deletion)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def changes(entry: AuditEntry) -> list[Change]:
    """The fields whose values differ between `before` and `after` (every field of a creation or a
    deletion), in the order they were recorded."""
    before = entry.before if isinstance(entry.before, dict) else {}
    after = entry.after if isinstance(entry.after, dict) else {}
    fields = list(before) + [key for key in after if key not in before]
    found = []
    for field in fields:
        old, new = before.get(field), after.get(field)
        if entry.before is not None and entry.after is not None and old == new:
            continue
        found.append(
            Change(
                field=field,
                before=_text(old) if entry.before is not None else None,
                after=_text(new) if entry.after is not None else None,
            )
        )
    return found


@dataclass(frozen=True)
class EntryRow:
    entry: AuditEntry
    changes: list[Change]


def entry_rows(entries: Any) -> list[EntryRow]:
    return [EntryRow(entry=entry, changes=changes(entry)) for entry in entries]
