"""The hot path's statements one at a time: what a claim and a release cost on one connection, against a bare
round trip, and what one statement that claims and gives back the previous unit (a release carried by the next
claim) would cost instead of the two.

    .venv/bin/python bench/claim_statements.py [--statements 2000]

One connection with the router's hot-pool session (autocommit, asynchronous commit, generic plans), every
statement prepared before timing, a model with 2 loaded replicas on 2 healthy nodes (as
`bench/inflight_options.py`). Rows, each `--statements` times after a warm-up:

- round trip: `SELECT 1`, the floor of any statement on this connection;
- claim: the gateway's single claim (`router._CLAIM_SQL`), then its release, timed apart;
- release: the single release (`router._RELEASE_SQL`) of the unit just claimed;
- claim + release: both, back to back, as a request at concurrency 1 sends them;
- carrying claim: one statement that gives back the previous request's unit and claims the next
  (`CARRYING_CLAIM_SQL` below: the claim's pick and lock, then the released replica locked without waiting, the
  owner's claim row checked, and one write per row). It was measured as a way to take the release's round trip
  off concurrency 1 and not adopted: see docs/performance.md, "Concurrency 1, looked at again".

Columns: statements per row's step, the median wall time of a step on this client, and PostgreSQL's CPU per
step (every process of the server, from /proc; not shown for the claim and release rows, whose steps also run
the other statement untimed). Runs in its own database `bench_claim_statements`, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
DATABASE = "bench_claim_statements"

from bench.benchdb import drop_database, use_fresh_database  # noqa: E402
from bench.inflight_options import MODEL, populate  # noqa: E402
from bench.pgcpu import postmaster_pid, server_cpu_seconds  # noqa: E402


def carrying_claim_sql() -> str:
    """A single claim that also gives back one unit (`%(release_owner)s` on `%(release_replica)s`), never
    waiting while it holds a lock: the claimed row is locked first (waiting, holding nothing), the released one
    with SKIP LOCKED; each row written once, so the same replica may be claimed and released."""
    from nodes.models import InFlightClaim, ModelReplica, Node
    from scheduling.router import _CLAIM_ORDER, _ROUTABLE, _ROUTE_CTE

    replicas, claims = ModelReplica._meta.db_table, InFlightClaim._meta.db_table
    return f"""
WITH {_ROUTE_CTE}, pick AS (
  SELECT r.id {_ROUTABLE}{_CLAIM_ORDER}  LIMIT 1
  FOR UPDATE OF r
), gone AS (
  SELECT id FROM {replicas} WHERE id = %(release_replica)s AND (SELECT count(*) FROM pick) >= 0
  FOR UPDATE SKIP LOCKED
), held AS (
  SELECT c.replica_id FROM {claims} c
  WHERE c.owner = %(release_owner)s AND c.replica_id IN (SELECT id FROM gone) AND c.count > 0
  FOR UPDATE
), claimed AS (
  UPDATE {replicas} AS claimed
  SET in_flight = GREATEST(
        claimed.in_flight + (claimed.id IN (SELECT id FROM pick))::integer
        - (claimed.id IN (SELECT replica_id FROM held))::integer, 0),
      last_used = CASE WHEN claimed.id IN (SELECT id FROM pick) THEN now() ELSE claimed.last_used END
  FROM {Node._meta.db_table} AS node
  WHERE claimed.id = ANY(ARRAY(SELECT id FROM pick UNION ALL SELECT replica_id FROM held))
    AND node.id = claimed.node_id
  RETURNING claimed.id, claimed.id IN (SELECT id FROM pick) AS picked
), recorded AS (
  INSERT INTO {claims} (owner, replica_id, count)
  SELECT %(owner)s, id, 1 FROM pick
  WHERE NOT (%(owner)s = %(release_owner)s AND id IN (SELECT replica_id FROM held))
  ON CONFLICT (owner, replica_id) DO UPDATE SET count = {claims}.count + 1
), returned AS (
  UPDATE {claims} SET count = count - 1
  WHERE owner = %(release_owner)s AND replica_id IN (SELECT replica_id FROM held)
    AND NOT (%(owner)s = %(release_owner)s AND replica_id IN (SELECT id FROM pick))
)
SELECT route.policy, picked.id, EXISTS (SELECT 1 FROM gone)
FROM route LEFT JOIN (SELECT id FROM claimed WHERE picked) AS picked ON true
"""


def bench(args: argparse.Namespace) -> None:
    import psycopg

    from nodes.inflight import plain_connection_params
    from scheduling import router

    params = plain_connection_params()
    options = f"{params.pop('options', '')} -c synchronous_commit=off -c plan_cache_mode=force_generic_plan"
    conn = psycopg.connect(**params, autocommit=True, options=options.strip(), prepare_threshold=0)
    postmaster = postmaster_pid(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    owner = uuid.uuid4()
    claim = {
        "model": MODEL,
        "exclude": [],
        "owner": owner,
        "default_policy": "least_in_flight",
        "prefer": [],
        "threshold": 0,
        "session": "",
        "home": "",
    }
    carrying = carrying_claim_sql()

    def claimed() -> int:
        row = conn.execute(router._CLAIM_SQL, claim).fetchone()
        assert row is not None and row[1] is not None, "the claim found no replica"
        return row[1]

    def release(replica: int) -> None:
        conn.execute(router._RELEASE_SQL, {"owner": owner, "replica": replica})

    held: list[int] = []  # the unit the carrying claim gives back next

    def carry() -> None:
        row = conn.execute(carrying, {**claim, "release_owner": owner, "release_replica": held[0]}).fetchone()
        assert row is not None and row[1] is not None and row[2], f"the carrying claim failed: {row}"
        held[0] = row[1]

    def timed(name: str, statements: int, step: Callable[[], float | None], *, cpu: bool = True) -> None:
        """`step` run `--statements` times: the median of its wall time (or of the part it answers), and
        PostgreSQL's CPU per step (not shown for a step whose statements are timed apart)."""
        for _ in range(100):
            step()
        walls: list[float] = []
        pg_before = server_cpu_seconds(postmaster)
        for _ in range(args.statements):
            began = time.perf_counter()
            part = step()
            walls.append(part if part is not None else time.perf_counter() - began)
        pg = (server_cpu_seconds(postmaster) - pg_before) / args.statements
        median = statistics.median(walls) * 1e6
        print(f"{name:<18}{statements:>11}{median:>14.0f}{f'{pg * 1e6:.0f}' if cpu else '-':>16}", flush=True)

    def claim_only() -> float:
        began = time.perf_counter()
        replica = claimed()
        wall = time.perf_counter() - began
        release(replica)
        return wall

    def release_only() -> float:
        replica = claimed()
        began = time.perf_counter()
        release(replica)
        return time.perf_counter() - began

    print(f"{'row':<18}{'statements':>11}{'median µs':>14}{'pg CPU µs':>16}")
    timed("round trip", 1, lambda: conn.execute("SELECT 1").fetchone() and None)
    timed("claim", 1, claim_only, cpu=False)
    timed("release", 1, release_only, cpu=False)
    timed("claim + release", 2, lambda: release(claimed()))
    held.append(claimed())
    timed("carrying claim", 1, carry)
    release(held[0])
    (left,) = conn.execute(
        f"SELECT coalesce(sum(in_flight), 0) FROM {router.ModelReplica._meta.db_table}"
    ).fetchone()
    assert left == 0, f"units left claimed: {left}"
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000, help="timed statements (or pairs) per row")
    args = parser.parse_args()
    print(
        "reproduce:", shlex.join([".venv/bin/python", "bench/claim_statements.py", *sys.argv[1:]]), flush=True
    )
    server_url = use_fresh_database(DATABASE)
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        populate()
        bench(args)
    finally:
        from django.db import connections

        connections.close_all()
        drop_database(server_url, DATABASE)


if __name__ == "__main__":
    main()
