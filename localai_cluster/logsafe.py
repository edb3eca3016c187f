"""Log lines that cannot be forged: the control plane's formatter escapes control characters in each message.

Node names, model names and label keys come from workers and API clients and end up in log messages
(`"node %s registered"`). A name holding a newline could start a line of its own that looks like any other log
entry (`evil\\n2026-01-01 00:00:00,000 INFO nodes.services: node trusted approved`). `SingleLineFormatter`
writes every message on its own line: CR and LF become `\\r` and `\\n`, other control and line-separator
characters `\\xNN` / `\\uNNNN`. A traceback appended after the message keeps its lines (it is not user data).
"""

from __future__ import annotations

import logging

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\t"}


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def single_line(text: str) -> str:
    """`text` with every control character (and U+0085, U+2028, U+2029) escaped; tabs stay."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or char == "\t" else _escape_char(char) for char in text)


class SingleLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = single_line(record.message)
        return super().formatMessage(record)
