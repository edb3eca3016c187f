"""CPU time of process trees for the benches, read from /proc: the local PostgreSQL server (its backends,
including the ones that ended, and its background workers), or uvicorn and its workers. Linux only; the server
must run on this machine (the embedded one does)."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _fields(pid: int) -> list[str]:
    # After the command name (which may hold spaces): state is field 3, ppid 4, utime 14 ... cstime 17.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _own(fields: list[str]) -> int:
    return int(fields[11]) + int(fields[12])


def postmaster_pid(backend_pid: int) -> int:
    """The server's main process, parent of the backend `SELECT pg_backend_pid()` answers."""
    return int(_fields(backend_pid)[1])


def server_cpu_seconds(postmaster: int) -> float:
    """CPU seconds used so far by the server: the postmaster, its children alive now, and those it reaped."""
    return tree_cpu_seconds(postmaster)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by a process, its children alive now, and the children it reaped (e.g. the
    PostgreSQL server, or uvicorn with its worker processes)."""
    postmaster = root
    main = _fields(postmaster)
    total = _own(main) + int(main[13]) + int(main[14])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _fields(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(fields[1]) == postmaster:
            total += _own(fields)
    return total / _TICK


def process_cpu_seconds() -> float:
    """CPU seconds of this process, every thread included."""
    times = os.times()
    return times.user + times.system
