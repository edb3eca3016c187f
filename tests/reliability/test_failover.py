"""PostgreSQL failover survived (issue 16 item 4): a real primary and a real synchronous streaming standby,
`DATABASE_URL` naming both with `target_session_attrs=read-write`; under steady traffic every process of the
primary is killed and the standby promoted. The scenario lives in `tests/reliability/failover.py` (the drill,
`bench/failover_drill.py`, prints its timeline). Times are printed, never asserted.

The test skips only when no PostgreSQL programs with `pg_basebackup` exist (pgserver's wheel ships them, and
so does the machine's /usr/lib/postgresql); CI sets LOCALAI_REQUIRE_FAILOVER=1, which turns that skip into a
failure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.reliability.conftest import prepared
from tests.reliability.failover import SLOW_MODEL, STREAMS, run_failover, timeline
from tests.reliability.replication import ReplicatedEngines, replication_binaries

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def pair():
    folder = replication_binaries()
    if folder is None:
        reason = "no PostgreSQL programs with pg_basebackup (pgserver's, or /usr/lib/postgresql/*/bin)"
        if os.environ.get("LOCALAI_REQUIRE_FAILOVER"):
            pytest.fail(f"LOCALAI_REQUIRE_FAILOVER is set but there are {reason}")
        pytest.skip(reason)
    engines = ReplicatedEngines(Path(tempfile.mkdtemp(prefix="lac-failover-")), bin_dir=folder)
    with prepared(engines) as ready:
        ready.start_standby()
        yield ready


def test_primary_killed_standby_promoted_gateway_503_then_serves_nothing_committed_lost(
    pair, processes, tmp_path
):
    outcome = run_failover(pair, processes, tmp_path, note=print)
    print("\n".join(timeline(outcome)))

    # The standby was synchronous: every control change committed before the crash is on the new primary.
    assert outcome.replication == [("walreceiver", "streaming", "sync")] or all(
        state[1:] == ("streaming", "sync") for state in outcome.replication
    ), outcome.replication
    assert outcome.found == {"catalog": (2048,), "rule": (2,), "label": ("survived",), "key": (1,)}

    # From the kill to the first 200 after the promotion, every answer is a 200 (served before the kill
    # took effect, or right after the promotion) or a 503 control_plane_unavailable: never a 500, never a
    # hang (no client timeout).
    assert outcome.answers, "no request was answered during the switch"
    unexpected = [a for a in outcome.answers if a.status not in (200, 503)]
    assert not unexpected, unexpected
    assert {a.code for a in outcome.answers if a.status == 503} == {"control_plane_unavailable"}

    # In-flight counters are right one health tick after the switch: exactly the streams still open (the web
    # process moved its held units to a new owner id, the tick reclaimed the old id's claims).
    counted, open_streams = outcome.in_flight_during
    assert open_streams == STREAMS, "the long streams must outlive the switch"
    assert counted == open_streams, f"{SLOW_MODEL}: in_flight {counted}, {open_streams} streams open"
    assert outcome.in_flight_after == 0
    assert outcome.overcommits == []
