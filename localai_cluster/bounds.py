"""Bounded request input, shared by both HTTP paths: the DRF parser of `/api/*` (`localai_cluster.api`) and the
gateway's body reader on the lean `/v1` path (`scheduling.gateway`). The body size itself is bounded before
the body is read, by `localai_cluster.lean_asgi.body_limit` in front of every HTTP route.

A parsed JSON document is accepted only when it is nested at most `MAX_JSON_DEPTH` deep and none of its strings
(keys or values) holds a NUL character or a lone UTF-16 surrogate (`"\\ud800"`): PostgreSQL refuses NUL in
text and both PostgreSQL and protobuf refuse strings that are not valid Unicode, which used to surface as 500s
(or as a retryable 503) long after parsing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MAX_JSON_DEPTH = 64


class UnsafeJSON(ValueError):
    """A JSON document that parsed but is refused; the message names where (`messages[0].content`) and
    `field` is the top-level key it is under (None for the depth or a top-level problem)."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.field = str(path[0]) if path else None


def _where(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        if isinstance(part, str) and len(part) > 64:
            part = part[:64] + "…"
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "the body"


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone UTF-16 surrogate (not valid Unicode)"
    return None


def _clean(value: str) -> bool:
    return (value.isascii() or _string_problem(value) is None) and "\x00" not in value


def _locate(document: Any, max_depth: int) -> UnsafeJSON:
    """The error for the first refused string or nesting of `document` (the slow path, with its location)."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(document, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            problem = _string_problem(value)
            if problem:
                return UnsafeJSON(f"{_where(path)} {problem}.", path)
        elif isinstance(value, dict | list):
            if depth >= max_depth:
                return UnsafeJSON(f"The JSON body is nested more than {max_depth} levels deep.")
            if isinstance(value, dict):
                for key, item in value.items():
                    problem = _string_problem(key)
                    if problem:
                        return UnsafeJSON(f"A key of {_where(path)} {problem}.", (*path, key))
                    stack.append((item, depth + 1, (*path, key)))
            else:
                stack.extend((item, depth + 1, (*path, index)) for index, item in enumerate(value))
    raise AssertionError("check_json found a problem _locate does not")  # pragma: no cover


def check_json(document: Any, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raises `UnsafeJSON` when `document` (as `json.loads` returns it) is nested deeper than `max_depth` or
    holds a string with a NUL or a lone surrogate. Iterative: no recursion however deep the input. (The fast
    pass keeps no paths; `_locate` finds where only once something is refused.)"""
    if type(document) is str:
        if not _clean(document):
            raise _locate(document, max_depth)
        return
    if type(document) not in (dict, list):
        return
    stack: list[tuple[dict | list, int]] = [(document, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > max_depth:
            raise _locate(document, max_depth)
        if type(container) is dict:
            for key in container:
                if not _clean(key):
                    raise _locate(document, max_depth)
            items: Iterable[Any] = container.values()
        else:
            items = container
        for item in items:
            kind = type(item)
            if kind is str:
                if not _clean(item):
                    raise _locate(document, max_depth)
            elif kind is dict or kind is list:
                stack.append((item, depth + 1))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_checked(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` (strict: no NaN/Infinity) followed by `check_json`. Raises `UnsafeJSON` for a refused
    document and `ValueError` (incl. `UnicodeDecodeError`) for one that is not JSON."""
    try:
        document = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise UnsafeJSON(f"The JSON body is nested more than {max_depth} levels deep.") from None
    check_json(document, max_depth=max_depth)
    return document
