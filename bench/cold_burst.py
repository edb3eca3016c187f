"""Cold-load burst: N concurrent chat requests for a catalog model with no replica, over several agents
(QUALITY.md target: exactly 1 LoadReplica; all answered; p99 <= load time + 200 ms).

    .venv/bin/python bench/cold_burst.py [--requests 200] [--agents 20] [--load-ms 1000] [--workers 2]

LoadReplica calls are counted twice: the replica rows of the model, and the `LoadModel` lines in every
agent's backend logs of that model.

The load comes from bare sockets by default (`--client socket`: the N connections opened first, then the N
requests written one after the other, and the answers read as they come), whose own cost per request is a few
microseconds, as wrk's is for `bench/gateway_overhead.py`; `--client httpx` sends them from an httpx client, as
the first version of this bench did, which at this concurrency spends most of the time itself. Each round also
prints its timeline on the database's clock: the first request written, the load started and ended (the replica
row's `load_started_at` and `loaded_at`), the last answer read.
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

from gateway_overhead import Cluster, _setup_django, chat_request_bytes, percentile, pin_to_this_run


def _body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "cold start"}]}


def socket_burst(url: str, model: str, requests: int) -> tuple[list[float], list[int], float, float]:
    """(latencies, statuses, wall clock of the first request written, of the last answer read): `requests`
    keep-alive connections opened first, then one request written on each, the answers read as they come."""
    import selectors
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    request = chat_request_bytes(url, _body(model))
    sockets = [socket.create_connection((parts.hostname, parts.port), timeout=600) for _ in range(requests)]
    selector = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    answers: dict[socket.socket, bytes] = {}
    latencies: list[float] = []
    statuses: list[int] = []
    try:
        first_sent = time.time()
        for sock in sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started[sock] = time.perf_counter()
            sock.sendall(request)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            answers[sock] = b""
        while len(latencies) < requests:
            for key, _ in selector.select(timeout=600):
                sock = key.fileobj
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit(f"the gateway closed a connection: {answers[sock][:200]!r}")
                answers[sock] += chunk
                head, separator, body = answers[sock].partition(b"\r\n\r\n")
                if not separator:
                    continue
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(body) >= length:
                    latencies.append(time.perf_counter() - started[sock])
                    statuses.append(int(head.split(b" ", 2)[1]))
                    selector.unregister(sock)
        last_read = time.time()
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return latencies, statuses, first_sent, last_read


async def burst(url: str, model: str, requests: int) -> tuple[list[float], list[int]]:
    import httpx

    body = _body(model)
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
    parser.add_argument(
        "--client", choices=("socket", "httpx"), default="socket", help="what sends the burst"
    )
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
            first_sent = last_read = None
            if args.client == "socket":
                latencies, statuses, first_sent, last_read = socket_burst(cluster.url, model, args.requests)
            else:
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
            if replica and first_sent is not None and last_read is not None:
                began = replica.load_started_at.timestamp() - first_sent
                ended = replica.loaded_at.timestamp() - first_sent
                print(
                    f"  timeline from the first request written: load started +{began * 1000:.0f} ms, loaded "
                    f"+{ended * 1000:.0f} ms, last answer read +{(last_read - first_sent) * 1000:.0f} ms"
                )
    finally:
        cluster.stop()
        ModelConfig.objects.filter(name__in=models).delete()
        SchedulingRule.objects.filter(model_name__in=models).delete()


if __name__ == "__main__":
    main()
