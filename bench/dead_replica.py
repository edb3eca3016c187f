"""A dead replica costs no request (issue 12 item 2): kill -9 of a real echo backend, then a request at once;
and a kill in the middle of a stream. Prints each request's status and latency, and how long the dead
replica's row outlived the kill.

    .venv/bin/python bench/dead_replica.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time

from gateway_overhead import Cluster, _setup_django, pin_to_this_run


def processes(node_name: str) -> dict[str, int]:
    """process key → pid of the backends the node's agent runs."""
    from nodes.models import Node
    from nodes.tokens import node_token_for
    from worker_client.client import WorkerControlClient

    node = Node.objects.get(name=node_name)
    client = WorkerControlClient(node.address, node_token_for(node), 30)
    return {process.process_key: process.pid for process in client.list_replicas()}


def next_pick(model: str):
    from django.db.models import F

    from nodes.models import ModelReplica

    return (
        ModelReplica.objects.filter(model_name=model, state="loaded")
        .order_by(F("last_used").asc(nulls_first=True), "id")
        .first()
    )


def row_gone_after(replica_id: int, killed_at: float, timeout: float = 60) -> float:
    from nodes.models import ModelReplica

    while ModelReplica.objects.filter(pk=replica_id).exists():
        if time.monotonic() - killed_at > timeout:
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - killed_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/dead_replica.py " + shlex.join(sys.argv[1:]))
    _setup_django()
    import httpx

    from scheduling.catalog import model_config_upsert
    from scheduling.services import replica_place

    suffix = os.getpid()
    cluster = Cluster(workers=1)
    node_name = f"bench-dead-{suffix}"
    model, slow = f"bench-dead-{suffix}", f"bench-dead-stream-{suffix}"
    url = f"{cluster.url}/v1/chat/completions"
    try:
        cluster.add_agent(node_name, slots=2, labels=f"bench={suffix}")
        cluster.wait_agents()
        model_config_upsert(name=model, backend="echo")
        model_config_upsert(name=slow, backend="echo", options={"options": ["delay_ms:100"]})
        pin_to_this_run([model, slow], suffix)
        replica_place(model_name=model)
        replica_place(model_name=model)
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        for round_ in range(args.rounds):
            victim = next_pick(model)
            os.kill(processes(node_name)[victim.process_key], signal.SIGKILL)
            killed_at = time.monotonic()
            answer = httpx.post(url, json=body, timeout=120)
            latency = time.monotonic() - killed_at
            print(
                f"round {round_ + 1}: kill -9 of {victim.process_key}, then a request: {answer.status_code} "
                f"in {latency * 1000:.0f} ms; dead row removed {row_gone_after(victim.pk, killed_at) * 1000:.0f} "
                "ms after the kill"
            )
        replica_place(model_name=slow)
        victim = next_pick(slow)
        stream_body = {"model": slow, "stream": True, "messages": [{"role": "user", "content": "w " * 100}]}
        with httpx.stream("POST", url, json=stream_body, timeout=120) as answer:
            lines = answer.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(processes(node_name)[victim.process_key], signal.SIGKILL)
            killed_at = time.monotonic()
            last = [line for line in lines if line.startswith("data: ")][-1]
            ended = time.monotonic() - killed_at
        print(
            f"kill -9 mid-stream: stream ended {ended * 1000:.0f} ms after the kill with {last[:80]}...; dead row "
            f"removed {row_gone_after(victim.pk, killed_at) * 1000:.0f} ms after the kill"
        )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
