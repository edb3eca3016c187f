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

from gateway_overhead import Cluster, _setup_django, percentile


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
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/cold_burst.py " + shlex.join(sys.argv[1:]))
    _setup_django()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from nodes.models import ModelReplica
    from scheduling.catalog import model_config_upsert
    from scheduling.models import ModelConfig

    suffix = os.getpid()
    model = f"bench-cold-{suffix}"
    model_config_upsert(name=model, backend="echo", options={"options": [f"load_ms:{args.load_ms}"]})
    cluster = Cluster(workers=args.workers)
    try:
        for index in range(args.agents):
            cluster.add_agent(f"bench-cold-{suffix}-{index}")
        cluster.wait_agents()
        print(
            f"control plane {cluster.url} ({args.workers} uvicorn workers), {args.agents} agents; logs in {cluster.log_dir}"
        )
        latencies, statuses = asyncio.run(burst(cluster.url, model, args.requests))
        rows = ModelReplica.objects.filter(model_name=model).count()
        loads = cluster.load_count(model)
        ok = statuses.count(200)
        print(
            f"{args.requests} concurrent requests: {ok} answered 200 (others: "
            f"{sorted({s for s in statuses if s != 200}) or 'none'}); LoadReplica calls: {loads} "
            f"(replica rows: {rows})"
        )
        print(
            f"latency median {statistics.median(latencies) * 1000:.0f} ms, p99 {percentile(latencies, 0.99) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms; load time {args.load_ms} ms "
            f"(target p99 <= {args.load_ms + 200} ms)"
        )
    finally:
        cluster.stop()
        ModelConfig.objects.filter(name=model).delete()


if __name__ == "__main__":
    main()
