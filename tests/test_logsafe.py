"""Node names cannot forge log lines (issue 11, item 10): the control plane's log formatter escapes control
characters in messages. Checked in a real process with the real logging configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from localai_cluster.logsafe import single_line

ROOT = Path(__file__).resolve().parent.parent
FORGED = "2026-01-01 00:00:00,000 INFO nodes.services: node trusted approved"

SCRIPT = """
import logging, os
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
django.setup()
name = "evil\\n" + {forged!r} + "\\r\\n" + {forged!r} + "\\u2028\\x1b[2J"
logging.getLogger("nodes.services").warning("node %s registered", name)
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("nodes.services").exception("node %s failed", name)
"""


def test_a_newline_in_a_node_name_cannot_start_a_log_line():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(forged=FORGED)],
        cwd=ROOT,
        env={**os.environ, "DJANGO_DEBUG": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if line.startswith(FORGED)], lines
    registered = [line for line in lines if line.endswith(" registered")]
    assert len(registered) == 1 and "evil\\n2026-01-01" in registered[0] and "\\x1b[2J" in registered[0]
    # A traceback keeps its own lines after the (escaped) message.
    assert any(line.startswith("Traceback") for line in lines) and "ValueError: boom" in lines


def test_single_line_keeps_printable_text():
    assert single_line("node gpu-01 · 24 GiB\tok") == "node gpu-01 · 24 GiB\tok"
    assert single_line("a\rb\x00c\x85d") == "a\\rb\\x00c\\x85d"
