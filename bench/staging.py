"""Model file staging (issue 15): the agent's download throughput over loopback against a plain `curl` of the same
file (a `python -m http.server`, and the control plane's own `cp://` route), side by side in one run; and the time
to first token of a cold model whose files are not staged yet against the same model with its files staged.

    .venv/bin/python bench/staging.py [--size-mib 200] [--rounds 3]

Throughput: each round deletes the agent's copy, asks it to stage the file (`StageFiles`) and times until the
file is in place (downloaded, sha256 verified, renamed); curl fetches the same URL to /dev/null. Medians of the
rounds. Time to first token: a streamed chat request for the cold model (no replica), files absent vs present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway_overhead import Cluster, _free_port, _setup_django

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> tuple[str, int]:
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // (4 * MiB)):
            block = os.urandom(4 * MiB)
            out.write(block)
            hasher.update(block)
    return hasher.hexdigest(), path.stat().st_size


def curl_seconds(url: str, token: str = "") -> float:
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", url]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def wait_for(condition, timeout: float = 600, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(step)


def ttft(url: str, model: str) -> tuple[float, int]:
    import httpx

    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "cold start now"}]}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                return time.perf_counter() - started, response.status_code
    return time.perf_counter() - started, response.status_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("reproduce: .venv/bin/python bench/staging.py " + shlex.join(sys.argv[1:]))
    if not shutil.which("curl"):
        raise SystemExit("curl is needed")
    work = Path(tempfile.mkdtemp(prefix="bench-staging-"))
    artifacts, served, models = work / "artifacts", work / "served", work / "models"
    for path in (artifacts, served, models):
        path.mkdir()
    sha256, size = make_file(artifacts / "weights.bin", args.size_mib * MiB)
    os.link(artifacts / "weights.bin", served / "weights.bin")
    os.environ["LOCALAI_ARTIFACTS_PATH"] = str(artifacts)
    _setup_django()
    from nodes.models import ModelReplica, Node
    from nodes.services import replica_unload
    from nodes.tokens import node_token_for
    from scheduling.catalog import model_config_upsert
    from scheduling.models import SchedulingRule
    from worker_client.client import WorkerControlClient

    http_port = _free_port()
    http_server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(http_port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(served),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    suffix = os.getpid()
    name = f"bench-staging-{suffix}"
    cluster = Cluster(workers=1)
    try:
        cluster.add_agent(name, labels=f"bench={suffix}", extra=("--models-path", str(models)))
        cluster.wait_agents()
        node = Node.objects.get(name=name)
        token = node_token_for(node)
        agent = WorkerControlClient(node.address, token, 30)
        sources = {
            "http.server": f"http://127.0.0.1:{http_port}/weights.bin",
            "cp:// route": "cp://weights.bin",
        }
        curl_urls = {
            "http.server": sources["http.server"],
            "cp:// route": f"{cluster.url}/api/node/{node.id}/artifacts/weights.bin",
        }
        rows = []
        for label, uri in sources.items():
            agent_times, curl_times = [], []
            for round_index in range(args.rounds):
                target = models / f"r{round_index}" / "weights.bin"
                files = [{"uri": uri, "sha256": sha256, "size": size, "path": f"r{round_index}/weights.bin"}]
                started = time.perf_counter()
                agent.stage_files("bench", files)
                wait_for(target.exists)
                agent_times.append(time.perf_counter() - started)
                target.unlink()
                curl_times.append(curl_seconds(curl_urls[label], token if label.startswith("cp") else ""))
            agent_rate = size / MiB / statistics.median(agent_times)
            curl_rate = size / MiB / statistics.median(curl_times)
            rows.append((label, agent_rate, curl_rate))

        # Time to first token of a cold model, its files absent, then present.
        model = f"staged-{suffix}"
        model_config_upsert(
            name=model,
            backend="echo",
            files=[{"uri": "cp://weights.bin", "sha256": sha256, "size": size, "path": "ttft/weights.bin"}],
        )
        SchedulingRule.objects.update_or_create(
            model_name=model, defaults={"node_selector": {"bench": str(suffix)}}
        )
        cold, warm_files = [], []
        for _ in range(args.rounds):
            for staged, into in ((False, cold), (True, warm_files)):
                if not staged:
                    (models / "ttft" / "weights.bin").unlink(missing_ok=True)
                seconds, status = ttft(cluster.url, model)
                if status != 200:
                    raise SystemExit(f"chat answered {status}")
                into.append(seconds)
                replica_unload(node=node, replicas=list(ModelReplica.objects.filter(model_name=model)))
                wait_for(lambda: not agent.list_replicas(), timeout=60)
        print()
        print(f"file: {size / MiB:.0f} MiB, {args.rounds} rounds, medians; loopback, one agent")
        print()
        print("| source | agent download (MiB/s, verified) | curl (MiB/s) | agent / curl |")
        print("|---|---|---|---|")
        for label, agent_rate, curl_rate in rows:
            print(f"| {label} | {agent_rate:.0f} | {curl_rate:.0f} | {agent_rate / curl_rate:.2f} |")
        print()
        print("| cold model, time to first token | median (s) | runs (s) |")
        print("|---|---|---|")
        for label, values in (
            ("files not staged (download + load)", cold),
            ("files staged (load only)", warm_files),
        ):
            print(
                f"| {label} | {statistics.median(values):.2f} | {json.dumps([round(v, 2) for v in values])} |"
            )
    finally:
        cluster.stop()
        http_server.terminate()
        http_server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
