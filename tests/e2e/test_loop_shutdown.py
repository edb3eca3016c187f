"""`manage.py reconcile` / `healthcheck` without `--once` stop on SIGTERM: the tick under way finishes, the wait
between ticks ends at once, the command prints that it stopped and exits 0 (issue 12 item 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from django.utils import timezone

from nodes.choices import NodeStatus
from nodes.inflight import plain_connection_params
from nodes.models import Node
from tests.conftest import test_database_url, wait_until
from tests.factories import NodeFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]


def start_loop(command: str, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", command],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": test_database_url(),
            "LOCALAI_DB_POOL": "false",
            "PYTHONUNBUFFERED": "1",
            "DJANGO_DEBUG": "true",
            **env,
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_between_ticks_exits_at_once_and_says_so(tmp_path, signum):
    log = tmp_path / "reconcile.log"
    # An hour between ticks: the loop can only end in time if the wait between ticks is interruptible.
    loop = start_loop("reconcile", log, LOCALAI_RECONCILE_INTERVAL="1h")
    try:
        wait_until(
            lambda: "took" in log.read_text() or loop.poll() is not None,
            timeout=60,
            message="the first reconcile tick",
        )
        assert loop.poll() is None, log.read_text()
        loop.send_signal(signum)
        assert loop.wait(timeout=60) == 0
        output = log.read_text()
        assert f"{signum.name} received: stopping after this tick" in output
        assert output.rstrip().endswith("stopped")
        assert output.count("took") == 1
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()


def test_sigterm_during_a_tick_lets_the_tick_finish(tmp_path):
    """A health tick held up by a row lock on a node it marks unhealthy: SIGTERM arrives mid-tick, the tick still
    completes its UPDATE once the lock goes, then the loop exits 0."""
    late = NodeFactory(name="late-node", last_heartbeat=timezone.now() - timedelta(seconds=45))
    log = tmp_path / "healthcheck.log"
    with psycopg.connect(**plain_connection_params()) as holder:
        holder.execute(f"SELECT 1 FROM {Node._meta.db_table} WHERE id = %s FOR UPDATE", [late.pk])
        loop = start_loop(
            "healthcheck", log, LOCALAI_STALE_NODE_THRESHOLD="60s", LOCALAI_HEALTH_CHECK_INTERVAL="1h"
        )
        try:

            def tick_waits_on_the_lock() -> bool:
                with psycopg.connect(**plain_connection_params(), autocommit=True) as probe:
                    row = probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query ILIKE 'UPDATE%%' AND query ILIKE %s",
                        [f"%{Node._meta.db_table}%"],
                    ).fetchone()
                return bool(row and row[0])

            wait_until(
                lambda: tick_waits_on_the_lock() or loop.poll() is not None,
                timeout=60,
                message="the health tick to wait on the row lock",
            )
            assert loop.poll() is None, log.read_text()
            loop.send_signal(signal.SIGTERM)
            wait_until(
                lambda: "SIGTERM received" in log.read_text(), timeout=30, message="the signal to be noted"
            )
            assert loop.poll() is None  # still in its tick
            assert "took" not in log.read_text()
            holder.commit()  # the lock goes; the tick goes on
            assert loop.wait(timeout=60) == 0
        finally:
            if loop.poll() is None:
                loop.kill()
                loop.wait()
    output = log.read_text()
    assert "unhealthy: late-node" in output and "took" in output
    assert output.rstrip().endswith("stopped")
    late.refresh_from_db()
    assert late.status == NodeStatus.UNHEALTHY
