"""PostgreSQL failover drill (issue 16 item 4): a primary and a synchronous streaming standby on this machine,
a web process, an echo agent, a Celery worker and beat, steady traffic and long streams; every process of the
primary killed with SIGKILL, the standby promoted with `pg_ctl promote`. Prints the timeline, in seconds after
the kill, of each run (the scenario is `tests/reliability/failover.py`, which `test_failover.py` asserts on).

    .venv/bin/python bench/failover_drill.py [--runs 1] [--outage SECONDS]

`--outage`: promote no sooner than this long after the kill (a failover manager's detection time; default: as
soon as the gateway answers 503). The gateway's recovery after the promotion should not depend on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")


def one_run(number: int, outage: float) -> list[str]:
    from tests.reliability.conftest import ManagedProcess, prepared
    from tests.reliability.failover import run_failover, timeline
    from tests.reliability.replication import ReplicatedEngines, replication_binaries

    folder = replication_binaries()
    if folder is None:
        sys.exit("no PostgreSQL programs with pg_basebackup (pgserver's, or /usr/lib/postgresql/*/bin)")
    work = Path(tempfile.mkdtemp(prefix="lac-drill-"))
    started: list[ManagedProcess] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        env = {"LOCALAI_AGENT_STATE_DIR": str(work / f"{name}-state"), **env}
        process = ManagedProcess(name, argv, work / f"{name}.log", env)
        started.append(process)
        return process

    engines = ReplicatedEngines(Path(tempfile.mkdtemp(prefix="lac-failover-")), bin_dir=folder)
    try:
        with prepared(engines) as pair:
            pair.start_standby()
            _setup_django(pair)
            outcome = run_failover(
                pair, start, work, note=lambda text: print(f"  run {number}: {text}"), outage=outage
            )
            for process in reversed(started):
                process.stop()
            return [f"PostgreSQL programs: {folder}", *timeline(outcome)]
    finally:
        for process in reversed(started):
            process.stop()


def _setup_django(pair) -> None:
    """Django set up in this process (the invariant checks name the models' tables), pointed at the pair:
    no embedded engine is started."""
    import django
    from django.apps import apps

    if not apps.ready:
        os.environ.update(DATABASE_URL=pair.database_url, REDIS_URL=pair.redis_url)
        django.setup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--outage", type=float, default=0.0)
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/failover_drill.py " + shlex.join(sys.argv[1:]))
    logging.basicConfig(level=logging.WARNING)
    reports = [one_run(number, args.outage) for number in range(1, args.runs + 1)]
    for number, lines in enumerate(reports, 1):
        print(f"\n== run {number} ==")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
