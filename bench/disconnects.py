"""Client disconnects leave no in-flight unit (issue 12 item 1): `wrk` runs against one replica (every run's
end closes connections with requests in flight), then requests cut by a TCP reset (SO_LINGER 0) at random
moments; after each phase, how many in-flight units the replica still holds, and how long it took to get back
to 0.

    .venv/bin/python bench/disconnects.py [--runs 4] [--duration 10s] [--connections 16] [--resets 100]

Needs `wrk` on PATH (Debian: `apt-get install wrk`) for the first phase; without it, only the resets run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from gateway_overhead import Cluster, _setup_django, pin_to_this_run

SETTLE_TIMEOUT = 60.0


def in_flight(model: str) -> int:
    from nodes.models import ModelReplica

    return sum(ModelReplica.objects.filter(model_name=model).values_list("in_flight", flat=True))


def settle(model: str) -> tuple[int, float]:
    """Waits (at most `SETTLE_TIMEOUT`) for the model's in-flight to reach 0: (units left, seconds waited)."""
    started = time.monotonic()
    while in_flight(model) and time.monotonic() - started < SETTLE_TIMEOUT:
        time.sleep(0.05)
    return in_flight(model), time.monotonic() - started


def wrk_run(url: str, model: str, duration: str, connections: int) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello cluster"}]})
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    command = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{duration}",
        "-s",
        script.name,
        f"{url}/v1/chat/completions",
    ]
    try:
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    return next((line.strip() for line in output.splitlines() if "Requests/sec" in line), output.strip())


def reset_requests(port: int, model: str, count: int, threads: int, seed: int) -> None:
    """`count` chat requests (half streaming), each reset at a random moment of its ~100 ms life."""
    chooser = random.Random(seed)
    plans = [(chooser.random() < 0.5, chooser.uniform(0, 0.15)) for _ in range(count)]

    def client(share: list[tuple[bool, float]]) -> None:
        for stream, after in share:
            payload = json.dumps(
                {"model": model, "stream": stream, "messages": [{"role": "user", "content": "one two three"}]}
            ).encode()
            sock = socket.create_connection(("127.0.0.1", port))
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            sock.sendall(head.encode() + payload)
            sock.settimeout(after)
            try:
                sock.recv(1)
            except TimeoutError:
                pass
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    workers = [threading.Thread(target=client, args=(plans[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="wrk runs")
    parser.add_argument("--duration", default="10s", help="each wrk run's -d")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--resets", type=int, default=100, help="requests cut by a TCP reset")
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/disconnects.py " + shlex.join(sys.argv[1:]))
    _setup_django()
    from scheduling.catalog import model_config_upsert

    suffix = os.getpid()
    cluster = Cluster(workers=1)
    fast, slow = f"bench-cut-{suffix}", f"bench-cut-slow-{suffix}"
    try:
        cluster.add_agent(f"bench-cut-{suffix}", labels=f"bench={suffix}")
        cluster.wait_agents()
        model_config_upsert(name=fast, backend="echo")
        model_config_upsert(name=slow, backend="echo", options={"options": ["delay_ms:25"]})
        pin_to_this_run([fast, slow], suffix)
        import httpx

        for model in (fast, slow):  # place one replica of each
            body = {"model": model, "messages": [{"role": "user", "content": "warm up"}]}
            assert httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=600).status_code == 200

        if shutil.which("wrk"):
            for run in range(args.runs):
                summary = wrk_run(cluster.url, fast, args.duration, args.connections)
                right_after = in_flight(fast)
                left, waited = settle(fast)
                print(
                    f"wrk run {run + 1}: {summary}; in-flight right after: {right_after}, "
                    f"left after {waited:.2f} s: {left}"
                )
        else:
            print("wrk not found: skipping the wrk runs")
        reset_requests(cluster.port, slow, args.resets, threads=8, seed=suffix)
        right_after = in_flight(slow)
        left, waited = settle(slow)
        print(
            f"{args.resets} requests reset at random moments: in-flight right after: {right_after}, "
            f"left after {waited:.2f} s: {left}"
        )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
