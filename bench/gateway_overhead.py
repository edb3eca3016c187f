"""Gateway overhead: the same chat request sent directly to an echo replica over gRPC and through
`/v1/chat/completions` on a control plane with 2 uvicorn web processes (QUALITY.md targets: median added
latency <= 2 ms at concurrency 1; gateway throughput >= 50 % of direct at concurrency 32; streaming first token
<= 3 ms added and per-token gap within 10 %).

    .venv/bin/python bench/gateway_overhead.py [--requests 2000] [--stream-requests 200] [--workers 2]
        [--system-chars N]

`--system-chars N` adds a system prompt of N characters; with `LOCALAI_ROUTING_POLICY=prefix_cache` in the
environment the bench's models route by prefix (one Redis lookup per request once the prompt has a block).
`LOCALAI_OPTIMISTIC_DISPATCH=false` in the environment turns optimistic dispatch off in the web processes (a
completion's backend call, or a stream's opening, then always waits for its claim; README, "Optimistic
dispatch").

Uses the embedded PostgreSQL and Redis unless DATABASE_URL / REDIS_URL are set, like the control plane.
Streaming first tokens are measured twice: with httpx, and with a bare socket reading the chunked answer
(`socket_first_tokens`), whose own cost is small, as wrk's is for the non-streaming rows.
HTTP requests reuse keep-alive connections (one pool per run, as an OpenAI SDK client does). Every gateway row
also prints the web processes' CPU per request (user + system time of uvicorn and its workers over the row,
divided by its requests): on a loaded machine it moves less than latency and throughput do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(
    url: str,
    *,
    what: str,
    log: Path | str,
    timeout: float,
    interval: float,
    process: subprocess.Popen | None = None,
) -> None:
    """Polls `GET url` until it answers 200. Ends the bench, naming `what` and its log, when it does not within
    `timeout` seconds, or when `process` (the one serving it) exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{what} exited; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise SystemExit(f"{what} did not start; see {log}")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s; returns once the process is gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _setup_django() -> None:
    import django

    django.setup()  # starts the embedded engines when no URLs are set, and exports their URLs
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


class Cluster:
    """A control plane (uvicorn with N workers) and agents with echo backends, all on loopback."""

    def __init__(self, *, workers: int = 2, log_dir: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "LOCALAI_AUTO_APPROVE_NODES": "true", "LOG_LEVEL": "WARNING"}
        self.processes: list[subprocess.Popen] = []
        self.agents: list[tuple[str, str]] = []  # (node name, WorkerControl address)
        command = [sys.executable, "-m", "uvicorn", "localai_cluster.asgi:application", "--host", "127.0.0.1"]
        command += [
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
            # uvicorn kills a web process that does not answer its health check within 5 s (the default),
            # resetting its connections; on a loaded machine that ends a bench run, not a real fault.
            "--timeout-worker-healthcheck",
            "60",
        ]
        self._spawn(command, "web.log")
        self._wait_http()

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen:
        log = (self.log_dir / log_name).open("wb")
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.processes.append(process)
        return process

    def _wait_http(self, timeout: float = 60) -> None:
        wait_http(
            f"{self.url}/healthz",
            what="the control plane",
            log=self.log_dir / "web.log",
            timeout=timeout,
            interval=0.2,
        )

    def web_cpu(self) -> float:
        """CPU seconds (user + system) used so far by the uvicorn process and its worker processes."""
        master = self.processes[0].pid
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(stat.parent.name) == master or int(fields[1]) == master:  # fields[1]: the parent's pid
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def add_agent(
        self, name: str, *, slots: int = 1, vram: str = "24GiB", labels: str = "", extra: tuple[str, ...] = ()
    ) -> None:
        address = f"127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "worker_client.agent", "--register-to", self.url, "--addr", address]
        command += ["--node-name", name, "--max-replicas-per-model", str(slots), "--vram", vram]
        if labels:
            command += ["--node-labels", labels]
        command += ["--drain-timeout", "2s", "--state-dir", str(self.log_dir / "agent-state" / name), *extra]
        self._spawn(command, f"{name}.log")
        self.agents.append((name, address))

    def wait_agents(self, timeout: float = 120) -> None:
        from nodes.models import Node

        names = [name for name, _ in self.agents]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if Node.objects.filter(name__in=names, status="healthy").count() == len(names):
                return
            time.sleep(0.2)
        raise SystemExit(f"agents did not register; see {self.log_dir}")

    def load_count(self, model: str) -> int:
        """LoadModel lines in every agent's logs of `model` (one per LoadReplica that reached a backend)."""
        from nodes.models import Node
        from nodes.tokens import node_token_for
        from worker_client.client import WorkerControlClient

        total = 0
        for node in Node.objects.filter(name__in=[name for name, _ in self.agents]):
            lines = WorkerControlClient(node.address, node_token_for(node), 30).get_logs(model)
            total += sum(1 for line in lines if line.text.startswith("LoadModel"))
        return total

    def stop(self) -> None:
        from nodes.models import Node

        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        Node.objects.filter(name__in=[name for name, _ in self.agents]).delete()


def pin_to_this_run(models: list[str], suffix: int) -> None:
    """Placement rules keeping the models on this run's agents (labelled `bench=<suffix>`), never on a node
    another run left behind in the same database."""
    from scheduling.models import SchedulingRule

    for model in models:
        SchedulingRule.objects.update_or_create(
            model_name=model, defaults={"node_selector": {"bench": str(suffix)}}
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_load(call, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies (s) of `requests` calls made by `concurrency` workers, and the wall time."""
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for _ in counter:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def summary(latencies: list[float], wall: float) -> tuple[float, float, float]:
    return statistics.median(latencies) * 1000, percentile(latencies, 0.99) * 1000, len(latencies) / wall


async def stream_timings(stream_factory, requests: int) -> tuple[list[float], list[float]]:
    """(first-token latencies, per-token gaps) in seconds, sequentially."""
    firsts: list[float] = []
    gaps: list[float] = []
    for _ in range(requests):
        started = time.perf_counter()
        previous = None
        async for _piece in stream_factory():
            now = time.perf_counter()
            if previous is None:
                firsts.append(now - started)
            else:
                gaps.append(now - previous)
            previous = now
    return firsts, gaps


async def bench(cluster: Cluster, args: argparse.Namespace) -> None:
    import httpx
    from asgiref.sync import sync_to_async

    from nodes.models import ModelReplica
    from nodes.tokens import backend_token_for
    from worker_client.client import BackendClient

    def replica_of(model: str):
        replica = ModelReplica.objects.select_related("node").get(model_name=model, state="loaded")
        return replica.address, backend_token_for(replica.node)

    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
    if args.system_chars:  # a system prompt: with prefix_cache routing, blocks to look up and record
        system = ("You are a helpful assistant. " * (args.system_chars // 29 + 1))[: args.system_chars]
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": args.model, "messages": messages}
    async with httpx.AsyncClient(
        base_url=cluster.url, timeout=60, limits=httpx.Limits(max_connections=64)
    ) as http:
        warm = await http.post("/v1/chat/completions", json=body)  # loads the model (cold path)
        warm.raise_for_status()
        address, token = await sync_to_async(replica_of)(args.model)
        backend = BackendClient(address, token)

        async def direct() -> None:
            await backend.predict(Messages=messages, UseTokenizerTemplate=True)

        async def gateway() -> None:
            response = await http.post("/v1/chat/completions", json=body)
            response.raise_for_status()

        for _ in range(50):  # warm both paths
            await direct()
            await gateway()
        print(f"{'':14}{'direct gRPC':>36}  {'through the gateway':>36}  added median / throughput ratio")
        print(
            f"{'':14}{'median   p99      req/s':>36}  {'median   p99      req/s':>36}  / web CPU per request"
        )
        for concurrency in (1, 32):
            d_lat, d_wall = await run_load(direct, args.requests, concurrency)
            cpu_before = cluster.web_cpu()
            g_lat, g_wall = await run_load(gateway, args.requests, concurrency)
            cpu = (cluster.web_cpu() - cpu_before) / len(g_lat) * 1000
            dm, dp, dt = summary(d_lat, d_wall)
            gm, gp, gt = summary(g_lat, g_wall)
            print(
                f"concurrency {concurrency:<2}{dm:>12.2f}ms{dp:>8.2f}ms{dt:>9.0f}  "
                f"{gm:>12.2f}ms{gp:>8.2f}ms{gt:>9.0f}  +{gm - dm:.2f} ms / {gt / dt:.0%} / {cpu:.2f} ms"
            )

        if shutil.which("wrk"):
            print(
                "through the gateway, load from wrk (a C client: the HTTP client's own cost mostly removed)"
            )
            for concurrency in (1, 32):
                cpu_before = cluster.web_cpu()
                median, p99, rate = run_wrk(cluster.url, body, concurrency, args.wrk_seconds)
                cpu = (cluster.web_cpu() - cpu_before) / (rate * args.wrk_seconds) * 1000
                print(
                    f"concurrency {concurrency:<2}{median:>12.2f}ms{p99:>8.2f}ms{rate:>9.0f}"
                    f"  web CPU {cpu:.2f} ms per request"
                )
        else:
            print("(install wrk — apt-get install wrk — for gateway figures measured with a C HTTP client)")

        stream_body = {"model": args.stream_model, "messages": messages, "stream": True}
        warm = await http.post("/v1/chat/completions", json=stream_body)
        warm.raise_for_status()
        s_address, s_token = await sync_to_async(replica_of)(args.stream_model)
        s_backend = BackendClient(s_address, s_token)

        def direct_stream():
            return s_backend.predict_stream(Messages=messages, UseTokenizerTemplate=True)

        async def gateway_stream():
            async with http.stream("POST", "/v1/chat/completions", json=stream_body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        yield line

        d_first, d_gaps = await stream_timings(direct_stream, args.stream_requests)
        g_first, g_gaps = await stream_timings(gateway_stream, args.stream_requests)
        df, gf = statistics.median(d_first) * 1000, statistics.median(g_first) * 1000
        dg, gg = statistics.median(d_gaps) * 1000, statistics.median(g_gaps) * 1000
        print(
            f"streaming ({args.stream_requests} sequential, delay_ms:{args.token_delay_ms}): "
            f"first token {df:.2f} ms direct vs {gf:.2f} ms gateway (+{gf - df:.2f} ms); "
            f"per-token gap {dg:.2f} ms vs {gg:.2f} ms ({gg / dg - 1:+.1%})"
        )
        s_first = await asyncio.to_thread(socket_first_tokens, cluster.url, stream_body, args.stream_requests)
        sf = statistics.median(s_first) * 1000
        print(
            f"streaming, socket client (as wrk for the rows above: the HTTP client's own cost mostly removed): "
            f"first token {df:.2f} ms direct vs {sf:.2f} ms gateway (+{sf - df:.2f} ms)"
        )


def chat_request_bytes(url: str, body: dict) -> bytes:
    """`POST /v1/chat/completions` of `body` as bytes on the wire, for the bare-socket clients."""
    import json
    from urllib.parse import urlsplit

    payload = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def socket_first_tokens(url: str, body: dict, requests: int, warm: int = 5) -> list[float]:
    """First-token latencies (s) of sequential streaming requests on one keep-alive connection, read from a
    bare socket: from sending the request to receiving the first event with content. Each answer is read to
    its last chunk before the next request goes out."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    request = chat_request_bytes(url, body)
    firsts: list[float] = []
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for attempt in range(warm + requests):
            started = time.perf_counter()
            sock.sendall(request)
            answer = b""
            first = None
            while not answer.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's last chunk
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("the gateway closed the streaming connection")
                answer += chunk
                if first is None and b'"content"' in answer:
                    first = time.perf_counter()
            if not answer.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"streaming request failed: {answer[:200]!r}")
            if attempt >= warm and first is not None:
                firsts.append(first - started)
    return firsts


def _wrk_ms(text: str) -> float:
    value = float(text.rstrip("mus"))
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000  # seconds


def run_wrk(
    url: str, body: dict, concurrency: int, seconds: int, timeout: int = 2
) -> tuple[float, float, float]:
    """(median ms, p99 ms, req/s) of POST /v1/chat/completions under wrk; fails on any non-2xx answer, and on
    any request unanswered after `timeout` seconds (wrk's default, 2)."""
    import json
    import re
    import tempfile

    script = "\n".join(
        [
            'wrk.method = "POST"',
            f"wrk.body = {json.dumps(json.dumps(body))}",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    threads = min(concurrency, 2)
    output = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            f"{timeout}s",
            "-s",
            lua.name,
            f"{url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(lua.name)
    if "Non-2xx" in output or "Socket errors" in output:
        raise SystemExit(f"wrk saw failed requests:\n{output}")
    median = _wrk_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))
    p99 = _wrk_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    return median, p99, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level and path")
    parser.add_argument("--stream-requests", type=int, default=200)
    parser.add_argument("--token-delay-ms", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn web processes")
    parser.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument(
        "--system-chars", type=int, default=0, help="add a system prompt of this many characters"
    )
    args = parser.parse_args()
    policy = os.environ.get("LOCALAI_ROUTING_POLICY", "least_in_flight")
    early = os.environ.get("LOCALAI_OPTIMISTIC_DISPATCH", "true")
    print(
        f"reproduce: LOCALAI_ROUTING_POLICY={policy} LOCALAI_OPTIMISTIC_DISPATCH={early} "
        ".venv/bin/python bench/gateway_overhead.py " + shlex.join(sys.argv[1:])
    )
    _setup_django()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    from scheduling.catalog import model_config_upsert

    suffix = os.getpid()
    args.model = f"bench-echo-{suffix}"
    args.stream_model = f"bench-stream-{suffix}"
    model_config_upsert(name=args.model, backend="echo")
    model_config_upsert(
        name=args.stream_model, backend="echo", options={"options": [f"delay_ms:{args.token_delay_ms}"]}
    )
    cluster = Cluster(workers=args.workers)
    try:
        cluster.add_agent(f"bench-agent-{suffix}", slots=2, labels=f"bench={suffix}")
        pin_to_this_run([args.model, args.stream_model], suffix)
        cluster.wait_agents()
        print(
            f"control plane {cluster.url} ({args.workers} uvicorn workers), 1 agent, echo backend; logs in {cluster.log_dir}"
        )
        asyncio.run(bench(cluster, args))
    finally:
        cluster.stop()
        from scheduling.models import ModelConfig, SchedulingRule

        ModelConfig.objects.filter(name__in=[args.model, args.stream_model]).delete()
        SchedulingRule.objects.filter(model_name__in=[args.model, args.stream_model]).delete()


if __name__ == "__main__":
    main()
