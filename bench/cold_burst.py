"""Cold-load burst: N concurrent chat requests for a catalog model with no replica, over several agents
(QUALITY.md target: exactly 1 LoadReplica; all answered; p99 <= load time + 200 ms).

    .venv/bin/python bench/cold_burst.py [--requests 200] [--agents 20] [--load-ms 1000] [--workers 2]

LoadReplica calls are counted twice: the replica rows of the model, and the `LoadModel` lines in every
agent's backend logs of that model.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import statistics
import sys
import time

from gateway_overhead import Cluster, _setup_django, percentile, pin_to_this_run


async def burst(url: str, model: str, requests: int) -> tuple[list[float], list[int]]:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "cold start"}]}
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one() -> tuple[float, int]:
            started = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body)
            return time.perf_counter() - started, response.status_code

        results = await asyncio.gather(*(one() for _ in range(requests)))
    return [latency for latency, _ in results], [status for _, status in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--load-ms", type=int, default=1000, help="the echo backend's LoadModel delay")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn web processes")
    parser.add_argument("--rounds", type=int, default=3, help="bursts, each for a new cold model")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the agents register")
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/cold_burst.py " + shlex.join(sys.argv[1:]))
    _setup_django()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from nodes.models import ModelReplica
    from scheduling.catalog import model_config_upsert
    from scheduling.models import ModelConfig, SchedulingRule

    suffix = os.getpid()
    cluster = Cluster(workers=args.workers)
    models = []
    try:
        for index in range(args.agents):
            cluster.add_agent(f"bench-cold-{suffix}-{index}", labels=f"bench={suffix}")
        cluster.wait_agents()
        print(
            f"control plane {cluster.url} ({args.workers} uvicorn workers), {args.agents} agents; "
            f"logs in {cluster.log_dir}"
        )
        time.sleep(args.settle)  # let the agents finish starting (their imports compete for the 2 cores)
        for round_ in range(args.rounds):
            model = f"bench-cold-{suffix}-r{round_}"
            models.append(model)
            model_config_upsert(name=model, backend="echo", options={"options": [f"load_ms:{args.load_ms}"]})
            pin_to_this_run([model], suffix)
            latencies, statuses = asyncio.run(burst(cluster.url, model, args.requests))
            replica = ModelReplica.objects.filter(model_name=model).first()
            rows = ModelReplica.objects.filter(model_name=model).count()
            loads = cluster.load_count(model)
            ok = statuses.count(200)
            load = (replica.loaded_at - replica.load_started_at).total_seconds() * 1000 if replica else 0
            p99 = percentile(latencies, 0.99) * 1000
            print(
                f"round {round_ + 1}: {args.requests} concurrent requests, {ok} answered 200 (others: "
                f"{sorted({s for s in statuses if s != 200}) or 'none'}); LoadReplica calls: {loads} "
                f"(replica rows: {rows})"
            )
            print(
                f"  latency median {statistics.median(latencies) * 1000:.0f} ms, p99 {p99:.0f} ms, "
                f"max {max(latencies) * 1000:.0f} ms; the load itself (backend start + LoadModel "
                f"{args.load_ms} ms) took {load:.0f} ms, so p99 - load = {p99 - load:.0f} ms (target <= 200 ms)"
            )
    finally:
        cluster.stop()
        ModelConfig.objects.filter(name__in=models).delete()
        SchedulingRule.objects.filter(model_name__in=models).delete()


if __name__ == "__main__":
    main()
