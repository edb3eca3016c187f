"""Prefix-cache-aware routing against least in-flight (issue 14): 4 echo replicas that model a prefix (KV)
cache — `prefill_us_per_char` µs per prompt character not already cached in that replica, an LRU of
`prefix_cache_chars` distinct prefix characters per replica (a shared prefix stored once) — behind a control
plane with 2 uvicorn web processes.

Workloads, each `--requests` chat requests at concurrency `--concurrency`:
- shared: 8 system prompts of ~4,000 characters, each request one of them (at random) plus a short user turn;
- no sharing: every request a prompt of its own (~4,000 characters).
Per policy and workload: the prefix hit ratio (cached characters / prompt characters, from the replicas'
`prefix-cache: hit=… miss=…` log lines), the cold prefills (requests that missed most of their prompt), the
prefill skew (the busiest replica's missed characters over the mean replica's), mean and p99 latency.
Targets: hit ratio >= 0.8 with prefix_cache, mean latency at least 2x lower than least_in_flight on the
shared workload, p99 within 10 % on no sharing.

    .venv/bin/python bench/prefix_routing.py [--requests 400] [--concurrency 16] [--rounds 4]

Uses the embedded PostgreSQL and Redis unless DATABASE_URL / REDIS_URL are set, like the control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import shlex
import statistics
import sys
import time

from gateway_overhead import Cluster, _setup_django, percentile, pin_to_this_run

REPLICAS = 4
POLICIES = ("least_in_flight", "prefix_cache")
SYSTEM_PROMPTS = 8
SYSTEM_CHARS = 4000
_LINE = re.compile(r"prefix-cache: hit=(\d+) miss=(\d+)")


def system_prompt(seed: int) -> str:
    """~SYSTEM_CHARS characters of words, different from the first block on for each seed."""
    rng = random.Random(seed)
    words: list[str] = [f"[prompt {seed}]"]
    while sum(len(word) + 1 for word in words) < SYSTEM_CHARS:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)


def workload(kind: str, requests: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    systems = [system_prompt(1000 + n) for n in range(SYSTEM_PROMPTS)]
    bodies = []
    for n in range(requests):
        turn = f"question {n}: what about {rng.randint(0, 10**6)}?"
        system = rng.choice(systems) if kind == "shared" else system_prompt(seed * 100_000 + n)
        bodies.append([{"role": "system", "content": system}, {"role": "user", "content": turn}])
    return bodies


def prefix_lines(cluster: Cluster, model: str) -> dict[str, list[tuple[int, int]]]:
    """Per node, the (hit, miss) of every `prefix-cache:` line of `model`'s replica, oldest first."""
    from nodes.models import Node
    from nodes.tokens import node_token_for
    from worker_client.client import WorkerControlClient

    found: dict[str, list[tuple[int, int]]] = {}
    for node in Node.objects.filter(name__in=[name for name, _ in cluster.agents]):
        lines = WorkerControlClient(node.address, node_token_for(node), 30).get_logs(model)
        matches = (_LINE.search(line.text) for line in lines)
        found[node.name] = [(int(m.group(1)), int(m.group(2))) for m in matches if m]
    return found


def hit_ratio(before: dict[str, list], after: dict[str, list]) -> tuple[float, int, float, int]:
    """(cached characters / prompt characters, requests, prefill skew, cold prefills) of the lines logged
    between the two readings; the skew is the busiest replica's missed characters over the mean replica's
    (1.0 = even): a replica prefills one request at a time, so the busiest one's prefill work bounds the
    latency. A cold prefill is a request that missed more of its prompt than it hit (its system prompt was
    not in that replica's cache): on the shared workload, each beyond the 8 first ones is a hit lost."""
    per_node = {name: entries[len(before.get(name, [])) :] for name, entries in after.items()}
    new = [entry for entries in per_node.values() for entry in entries]
    hit, miss = sum(entry[0] for entry in new), sum(entry[1] for entry in new)
    misses = [sum(entry[1] for entry in entries) for entries in per_node.values()]
    skew = max(misses) / statistics.fmean(misses) if misses and sum(misses) else 1.0
    cold = sum(1 for entry in new if entry[1] > entry[0])
    return (hit / (hit + miss) if hit + miss else 0.0), len(new), skew, cold


async def run(cluster: Cluster, model: str, bodies: list, concurrency: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    queue = iter(bodies)
    async with httpx.AsyncClient(
        base_url=cluster.url, timeout=120, limits=httpx.Limits(max_connections=64)
    ) as http:

        async def worker() -> None:
            for messages in queue:
                started = time.perf_counter()
                response = await http.post(
                    "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4}
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def warm_up(cluster: Cluster, model: str) -> None:
    """A few requests with prompts of no workload's, so that each web process has seen the model's policy."""
    await run(cluster, model, workload("none", 16, seed=7), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="turns the two policies take, per workload")
    parser.add_argument("--prefill-us-per-char", type=int, default=50)
    parser.add_argument("--prefix-cache-chars", type=int, default=16_000)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn web processes")
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/prefix_routing.py " + shlex.join(sys.argv[1:]))
    _setup_django()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from scheduling.catalog import model_config_upsert
    from scheduling.models import ModelConfig, SchedulingRule
    from scheduling.services import replica_place

    suffix = os.getpid()
    options = {
        "options": [
            f"prefill_us_per_char:{args.prefill_us_per_char}",
            f"prefix_cache_chars:{args.prefix_cache_chars}",
        ]
    }
    runs = [(policy, kind) for kind in ("shared", "none") for policy in POLICIES]
    models = {run: f"bench-{run[0]}-{run[1]}-{suffix}" for run in runs}
    for (policy, _kind), model in models.items():
        model_config_upsert(name=model, backend="echo", options=options, routing=policy)
    cluster = Cluster(workers=args.workers)
    results = []
    try:
        for n in range(REPLICAS):
            cluster.add_agent(f"bench-prefix-{suffix}-{n}", slots=1, labels=f"bench={suffix}")
        pin_to_this_run(list(models.values()), suffix)
        cluster.wait_agents()
        for model in models.values():
            for _ in range(REPLICAS):
                replica_place(model_name=model)
        print(
            f"control plane {cluster.url} ({args.workers} uvicorn workers), {REPLICAS} agents with one echo replica "
            f"of each model (prefill_us_per_char:{args.prefill_us_per_char}, "
            f"prefix_cache_chars:{args.prefix_cache_chars}); {args.requests} requests at concurrency "
            f"{args.concurrency} per row, the policies taking turns in {args.rounds} rounds; logs in {cluster.log_dir}"
        )
        # The two policies take turns, a round of `--rounds` at a time, so a machine whose load changes during
        # the run weighs on both alike; each policy's models keep their replicas' caches across rounds.
        for kind in ("shared", "none"):
            bodies = workload(kind, args.requests, seed=42 if kind == "shared" else 43)
            befores, latencies = {}, {policy: [] for policy in POLICIES}
            for policy in POLICIES:
                asyncio.run(warm_up(cluster, models[(policy, kind)]))
                befores[policy] = prefix_lines(cluster, models[(policy, kind)])
            size = -(-len(bodies) // args.rounds)
            for start in range(0, len(bodies), size):
                for policy in POLICIES:
                    chunk = bodies[start : start + size]
                    latencies[policy] += asyncio.run(
                        run(cluster, models[(policy, kind)], chunk, args.concurrency)
                    )
            for policy in POLICIES:
                model = models[(policy, kind)]
                ratio, counted, skew, cold = hit_ratio(befores[policy], prefix_lines(cluster, model))
                if counted != len(bodies):
                    raise SystemExit(f"{model}: {counted} prefix-cache lines for {len(bodies)} requests")
                results.append((kind, policy, ratio, skew, cold, latencies[policy]))
        print(
            f"{'workload':<12}{'policy':<17}{'hit ratio':>10}{'cold':>6}{'prefill skew':>13}{'mean':>11}{'p99':>11}"
        )
        for kind, policy, ratio, skew, cold, latencies in results:
            mean, p99 = statistics.fmean(latencies) * 1000, percentile(latencies, 0.99) * 1000
            name = "shared" if kind == "shared" else "no sharing"
            print(f"{name:<12}{policy:<17}{ratio:>10.2f}{cold:>6}{skew:>13.2f}{mean:>9.1f}ms{p99:>9.1f}ms")
        by = {(kind, policy): latencies for kind, policy, _ratio, _skew, _cold, latencies in results}
        shared = statistics.fmean(by[("shared", "least_in_flight")]) / statistics.fmean(
            by[("shared", "prefix_cache")]
        )
        p99_change = (
            percentile(by[("none", "prefix_cache")], 0.99) / percentile(by[("none", "least_in_flight")], 0.99)
            - 1
        )
        print(
            f"shared: mean {shared:.1f}x lower with prefix_cache; no sharing: p99 {p99_change:+.1%} with prefix_cache"
        )
    finally:
        cluster.stop()
        ModelConfig.objects.filter(name__in=list(models.values())).delete()
        SchedulingRule.objects.filter(model_name__in=list(models.values())).delete()


if __name__ == "__main__":
    main()
