"""Heartbeats at fleet scale: simulated agents POST heartbeats over HTTP at rising rates to a control plane with
2 uvicorn web processes, and the bench prints, per rate, the heartbeats per second sustained, the p50 and p99
latency, the CPU each heartbeat costs the web processes and PostgreSQL, and PostgreSQL's share of that CPU.

Two kinds of heartbeat, side by side in one run:
- `unchanged`: the agent's replica set is the one the control plane holds; the agent sends its digest alone
  (what this project's agent sends once its set was accepted) — one UPDATE;
- `full`: the set differs every time (here: one process the control plane has no row for), so the control
  plane authenticates, locks the node and reconciles the replica rows — what every heartbeat cost before.

    .venv/bin/python bench/heartbeat_scale.py [--nodes 2000] [--rates 100,200,400,800] [--seconds 8]

Uses its own database `bench_heartbeat` on the embedded PostgreSQL (or on DATABASE_URL's server). CPU is read
from /proc for the uvicorn tree and the PostgreSQL server (every process of it); the load generator runs in
this process and its CPU is not counted, but it shares the machine's cores with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
DATABASE = "bench_heartbeat"
REPLICAS_PER_NODE = 3
GiB = 1024**3

from bench.benchdb import use_fresh_database  # noqa: E402
from bench.gateway_overhead import _free_port, stop_process, wait_http  # noqa: E402
from bench.pgcpu import postmaster_pid, process_cpu_seconds, tree_cpu_seconds  # noqa: E402


def _populate(count: int) -> list[tuple[str, str, list[str]]]:
    """Approved nodes, each with its replica rows already heard from; answers (id, node token, keys)."""
    from datetime import timedelta

    from django.utils import timezone

    from nodes.choices import NodeStatus, ReplicaState
    from nodes.models import ModelReplica, Node
    from nodes.tokens import new_token_salt, node_token_for, token_hash

    now = timezone.now()
    nodes = []
    for i in range(count):
        node = Node(
            name=f"hb-{i:05d}",
            address=f"127.0.0.1:{20000 + i % 40000}",
            status=NodeStatus.HEALTHY,
            approved_at=now,
            last_heartbeat=now,
            total_vram=80 * GiB,
            available_vram=80 * GiB,
            gpu_vendor="nvidia",
            token_salt=new_token_salt(),
        )
        node.token_hash = token_hash(node_token_for(node))
        nodes.append(node)
    Node.objects.bulk_create(nodes, batch_size=2000)
    ModelReplica.objects.bulk_create(
        (
            ModelReplica(
                node=node,
                model_name=f"model-{(i + r) % 50:02d}",
                replica_index=0,
                state=ReplicaState.LOADED,
                address="127.0.0.1:1",
                loaded_at=now - timedelta(hours=1),
                last_seen_at=now,
            )
            for i, node in enumerate(nodes)
            for r in range(REPLICAS_PER_NODE)
        ),
        batch_size=5000,
    )
    return [
        (
            str(node.id),
            node_token_for(node),
            [f"model-{(i + r) % 50:02d}#0" for r in range(REPLICAS_PER_NODE)],
        )
        for i, node in enumerate(nodes)
    ]


class Web:
    """uvicorn with N worker processes on loopback."""

    def __init__(self, workers: int, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "uvicorn", "localai_cluster.asgi:application", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        command += ["--no-access-log"]
        self._log = log.open("wb")
        env = {**os.environ, "LOCALAI_HEARTBEAT_INTERVAL": "5"}
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.log = log

    def wait(self, timeout: float = 90) -> None:
        wait_http(
            f"{self.url}/healthz", what="the control plane", log=self.log, timeout=timeout, interval=0.3
        )

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def _body(keys: list[str], kind: str) -> dict:
    from worker_client.agent.keys import replica_digest

    body = {
        "available_vram": 40 * GiB,
        "total_vram": 80 * GiB,
        "available_ram": 100 * GiB,
        "total_ram": 128 * GiB,
        "gpu_vendor": "nvidia",
        "replica_digest": replica_digest(keys),
    }
    if kind == "full":
        listed = [*keys, "not-placed-here#0"]  # a process without a row: the sets differ every time
        body["replicas"] = [{"key": key, "address": "127.0.0.1:1", "state": "running"} for key in listed]
    return body


async def _stage(url: str, nodes, kind: str, rate: int, seconds: float, cap: int) -> dict:
    """Heartbeats sent at `rate` per second for `seconds` (at most `cap` waiting at once: beyond it the
    sender waits, so the rate sustained falls below the rate asked)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        gate = asyncio.Semaphore(cap)
        bodies = [(node_id, token, _body(keys, kind)) for node_id, token, keys in nodes]

        async def one(node_id: str, token: str, body: dict) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                answer = await client.post(
                    f"{url}/api/node/{node_id}/heartbeat",
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                )
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            finally:
                gate.release()

        tasks = []
        total = int(rate * seconds)
        began = time.perf_counter()
        for i in range(total):
            due = began + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            node_id, token, body = bodies[i % len(bodies)]
            tasks.append(asyncio.create_task(one(node_id, token, body)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    return {"latencies": latencies, "errors": errors, "wall": wall}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rates", default="100,200,400,800", help="heartbeats per second, one stage each")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each stage")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn web processes")
    parser.add_argument("--concurrency", type=int, default=128, help="heartbeats waiting at once, at most")
    args = parser.parse_args()
    print("reproduce:", shlex.join([sys.executable, *sys.argv]), flush=True)

    use_fresh_database(DATABASE)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    nodes = _populate(args.nodes)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        postmaster = postmaster_pid(cursor.fetchone()[0])
    connection.close()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-heartbeat-{os.getpid()}.log"
    web = Web(args.workers, log)
    rates = [int(rate) for rate in args.rates.split(",")]
    rows = []
    try:
        web.wait()
        asyncio.run(_stage(web.url, nodes[:50], "unchanged", 50, 1.0, 16))  # warm-up: connections, pools
        for kind in ("unchanged", "full"):
            for rate in rates:
                web_before, pg_before = tree_cpu_seconds(web.process.pid), tree_cpu_seconds(postmaster)
                gen_before = process_cpu_seconds()
                outcome = asyncio.run(_stage(web.url, nodes, kind, rate, args.seconds, args.concurrency))
                web_cpu = tree_cpu_seconds(web.process.pid) - web_before
                pg_cpu = tree_cpu_seconds(postmaster) - pg_before
                gen_cpu = process_cpu_seconds() - gen_before
                done = len(outcome["latencies"])
                rows.append(
                    (
                        kind,
                        rate,
                        done / outcome["wall"],
                        statistics.median(outcome["latencies"]) * 1000 if done else float("nan"),
                        _percentile(outcome["latencies"], 0.99) * 1000,
                        web_cpu * 1000 / max(done, 1),
                        pg_cpu * 1000 / max(done, 1),
                        pg_cpu / (web_cpu + pg_cpu) * 100 if web_cpu + pg_cpu else float("nan"),
                        gen_cpu * 1000 / max(done, 1),
                        outcome["errors"],
                    )
                )
                print(f"  {kind} at {rate}/s done", file=sys.stderr, flush=True)
    finally:
        web.stop()

    print(
        f"control plane: {args.workers} uvicorn web processes; {args.nodes} nodes with {REPLICAS_PER_NODE} "
        f"replicas each; {args.seconds:g} s per stage; at most {args.concurrency} heartbeats waiting"
    )
    print(
        "| heartbeat | asked /s | sustained /s | p50 ms | p99 ms | web CPU ms/hb | PG CPU ms/hb | PG share "
        "| load-gen CPU ms/hb | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, rate, sustained, p50, p99, web_ms, pg_ms, share, gen_ms, errors in rows:
        print(
            f"| {kind} | {rate} | {sustained:.0f} | {p50:.1f} | {p99:.1f} | {web_ms:.2f} | {pg_ms:.2f} | "
            f"{share:.0f} % | {gen_ms:.2f} | {errors} |"
        )
    for kind in ("unchanged", "full"):
        mine = [row for row in rows if row[0] == kind]
        web_ms = statistics.median(row[5] for row in mine)
        pg_ms = statistics.median(row[6] for row in mine)
        print(
            f"{kind}: median {web_ms:.2f} ms web CPU + {pg_ms:.2f} ms PostgreSQL CPU per heartbeat → one web "
            f"core carries {1000 / web_ms:.0f} heartbeats/s = {5000 / web_ms:.0f} nodes at a 5 s interval"
        )


if __name__ == "__main__":
    main()
