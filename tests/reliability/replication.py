"""A PostgreSQL primary and a real streaming standby on this machine, for the failover test and drill.

The primary is `Engines`' server; the standby is cloned from it with `pg_basebackup -R` through a replication
slot, streams from it, and is made synchronous (`synchronous_standby_names`), as docs/reliability.md asks of a
production pair. Both listen on 127.0.0.1 on free ports; `database_url` names both hosts with
`target_session_attrs=read-write`, the URL a control plane uses in front of such a pair.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg

from tests.conftest import free_port, wait_until
from tests.reliability.conftest import Engines, _pg_bin

PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
SLOT = "failover_standby"


def replication_binaries() -> Path | None:
    """A folder holding every program a primary and a standby need: pgserver's (its wheel ships
    pg_basebackup), else the newest of the machine's /usr/lib/postgresql/*/bin; None when there is none."""
    folders = [Path(_pg_bin("initdb")).parent]
    folders += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in folders:
        if all(os.access(folder / name, os.X_OK) for name in PROGRAMS):
            return folder
    return None


@dataclass
class ReplicatedEngines(Engines):
    """`Engines` whose PostgreSQL has a streaming standby that can be promoted."""

    standby_port: int = field(default_factory=free_port)

    @property
    def standby_pgdata(self) -> Path:
        return self.root / "standby"

    @property
    def primary_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def standby_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.standby_port}/postgres"

    @property
    def database_url(self) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.pg_port},127.0.0.1:{self.standby_port}/postgres"
            "?target_session_attrs=read-write"
        )

    def start_standby(self) -> None:
        """Clones the primary through a replication slot, starts the clone as a streaming standby and makes
        it synchronous: a commit on the primary returns once the standby has it on disk."""
        self._pg(
            self._bin("pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres"),
            *("-D", str(self.standby_pgdata), "-R", "-X", "stream", "-C", "-S", SLOT),
            timeout=180,
        )
        options = f"-h 127.0.0.1 -p {self.standby_port} -k '' -c fsync=off -c max_connections=100"
        self._pg(
            self._bin("pg_ctl"),
            *("-D", str(self.standby_pgdata), "-w", "-t", "60", "-o", options),
            *("-l", str(self.root / "standby.log"), "start"),
        )
        with psycopg.connect(self.primary_url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
                    ).fetchall()
                    == [("sync",)]
                ),
                timeout=60,
                message="the standby to stream synchronously",
            )

    def replication_state(self) -> list[tuple]:
        with psycopg.connect(self.primary_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT application_name, state, sync_state FROM pg_stat_replication"
            ).fetchall()

    def crash_primary(self) -> None:
        """Every process of the primary killed with SIGKILL at once (a host or server crash: no shutdown
        checkpoint, sockets closed by the kernel)."""
        postmaster = psutil.Process(int((self.pgdata / "postmaster.pid").read_text().split()[0]))
        victims = [postmaster, *postmaster.children(recursive=True)]
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                os.kill(process.pid, signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def promote(self) -> float:
        """Promotes the standby (`pg_ctl promote -w`: returns once it accepts writes); answers how long that
        took."""
        started = time.monotonic()
        self._pg(self._bin("pg_ctl"), "-D", str(self.standby_pgdata), "-w", "-t", "60", "promote")
        return time.monotonic() - started

    def cleanup(self) -> None:
        if (self.standby_pgdata / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._pg(
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.standby_pgdata),
                    "-w",
                    "-t",
                    "60",
                    "-m",
                    "fast",
                    "stop",
                )
        super().cleanup()
