"""Peer comparison: LiteLLM's proxy and this project's gateway, side by side in one run, each in front of a cheap
upstream, driven by the load generator of bench/gateway_overhead.py (and by wrk where the target speaks HTTP).

    .venv/bin/python bench/peer_litellm.py [--requests 2000] [--workers 2] [--wrk-seconds 10] [--no-ours]

Targets, one row each:
- `upstream, direct`: a tiny OpenAI-compatible HTTP server (this file's `--serve-upstream` mode: one process, an
  asyncio protocol answering every `POST …/chat/completions` with the same fixed, non-streaming completion of
  ~300 bytes; no framework, no JSON parsing — tens of microseconds of CPU per request);
- `LiteLLM proxy`: LiteLLM's proxy server (the `bench` extra's pin), `--num_workers` = `--workers` uvicorn
  processes, one model pointing at that upstream; `LITELLM_LOCAL_MODEL_COST_MAP=True` (no cost map fetched: the
  machine may be offline), no master key (so no auth and no database; 1.108 refuses to start without one unless
  `LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true`), no callbacks, spend logs and telemetry off,
  `LITELLM_LOG=ERROR`, and uvicorn's worker health check at 60 s as for ours;
- `echo, direct gRPC` and `our gateway`: as bench/gateway_overhead.py (2 uvicorn web processes in front of an
  agent's echo backend over gRPC; embedded PostgreSQL and Redis unless DATABASE_URL / REDIS_URL are set).

Per target: median and p99 at concurrency 1, the median added over its own direct row, req/s at concurrency 32
and its ratio to the direct row, and CPU per request at concurrency 32 read from /proc: the gateway's process
tree (LiteLLM's, or our uvicorn tree plus the PostgreSQL server, each shown), the upstream's (the HTTP stub, or
the agent with its echo backend), and the load generator's (this process, or wrk). The peers' upstreams differ
in cost, hence the CPU columns beside the ratios. The wrk rows repeat the HTTP targets with a C client (gRPC has
none: our gateway's wrk row is compared with the direct gRPC row); their request count is req/s × duration.

LiteLLM is not installed by ./dev or CI: on first run this script makes a venv of its own, .state/bench-venv,
and installs the `bench` extra's requirements from pyproject.toml into it (installed into .venv, it would move
websockets and rich to older versions). The proxy runs from there; everything else from .venv.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
BENCH_VENV = REPO_ROOT / ".state" / "bench-venv"

# --- the upstream: a tiny OpenAI-compatible server ---------------------------------------------------------

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "bench-upstream",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    }
).encode()


def _http_response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


_OK = _http_response("200 OK", _COMPLETION)
_NOT_FOUND = _http_response("404 Not Found", b'{"error": {"message": "not found"}}')


class _Upstream(asyncio.Protocol):
    """HTTP/1.1 with keep-alive: reads a request's head and its Content-Length body, answers the fixed
    completion to any `…/chat/completions`, 404 otherwise."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (head_end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:head_end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "transfer-encoding":
                    self.transport.close()  # never sent by the clients here
                    return
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            path = head[0].split(" ")[1]
            self.transport.write(_OK if path.endswith("/chat/completions") else _NOT_FOUND)  # type: ignore[attr-defined]


def serve_upstream(port: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# --- LiteLLM's proxy, from a venv of its own -----------------------------------------------------------------


def bench_requirements() -> list[str]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]["optional-dependencies"]["bench"]


def ensure_bench_venv() -> Path:
    """.state/bench-venv with the `bench` extra's requirements installed (once per change of the pin)."""
    requirements = bench_requirements()
    stamp = BENCH_VENV / f".installed-{hashlib.sha1(json.dumps(requirements).encode()).hexdigest()[:12]}"
    if stamp.exists():
        return BENCH_VENV
    print(f"==> installing {' '.join(requirements)} into {BENCH_VENV} (first run: a few minutes)", flush=True)
    if not (BENCH_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [
        str(BENCH_VENV / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    done = subprocess.run([*pip, *requirements], capture_output=True, text=True)
    # (This machine's pip config names local indexes that may be absent: their warnings are noise.)
    print(
        "".join(
            line for line in (done.stdout + done.stderr).splitlines(True) if "WARNING: Location" not in line
        )
    )
    if done.returncode:
        raise SystemExit(f"installing the bench extra into {BENCH_VENV} failed")
    for old in BENCH_VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    return BENCH_VENV


def _process_env(**extra: str) -> dict[str, str]:
    """A clean environment for the peer's processes: none of the control plane's (DATABASE_URL, REDIS_URL, …)."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
    return {**env, **extra}


class Proxy:
    """LiteLLM's proxy with one model, `model`, routed to the OpenAI-compatible server at `upstream`."""

    def __init__(self, venv: Path, upstream: str, model: str, *, workers: int, log_dir: Path) -> None:
        from bench.gateway_overhead import _free_port

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        config = {
            "model_list": [
                {
                    "model_name": model,
                    "litellm_params": {
                        "model": f"openai/{model}",
                        "api_base": f"{upstream}/v1",
                        "api_key": "none",
                    },
                }
            ],
            "litellm_settings": {"set_verbose": False, "callbacks": []},
            "general_settings": {"disable_spend_logs": True},
        }
        (log_dir / "litellm.yaml").write_text(json.dumps(config, indent=1))  # YAML reads JSON
        env = _process_env(
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the cost map (offline)
            LITELLM_MODE="PRODUCTION",  # no .env loading
            LITELLM_LOG="ERROR",
            LITELLM_TELEMETRY_DISABLED="true",
            # 1.108 refuses to start without a master key unless told this is a local bench: no key, no auth
            LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
            PYTHONUNBUFFERED="1",
        )
        command = [str(venv / "bin" / "litellm"), "--config", str(log_dir / "litellm.yaml")]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--num_workers", str(workers)]
        # as for our uvicorn (bench/gateway_overhead.py): on a loaded machine a worker that has not answered
        # uvicorn's health check within 5 s (the default) is killed, and the proxy's workers never come up
        command += ["--timeout_worker_healthcheck", "60"]
        log = (log_dir / "litellm.log").open("wb")
        self.process = subprocess.Popen(command, cwd=log_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.version = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def wait(self, timeout: float = 180) -> None:
        from bench.gateway_overhead import wait_http

        wait_http(
            f"{self.url}/health/liveliness",
            what="LiteLLM's proxy",
            log=self.log_dir / "litellm.log",
            timeout=timeout,
            interval=0.5,
            process=self.process,
        )

    def stop(self) -> None:
        from bench.gateway_overhead import stop_process

        stop_process(self.process)


# --- the measurement -----------------------------------------------------------------------------------------


class Target:
    """One row: a call for the load generator, an HTTP URL for wrk (None for gRPC), the row it is compared
    with (None for a direct row), and readers of CPU seconds per column."""

    def __init__(
        self, name: str, call, url: str | None, direct: Target | None, cpu: dict, body: dict | None = None
    ) -> None:
        self.name, self.call, self.url, self.direct, self.cpu, self.body = name, call, url, direct, cpu, body
        self.c1: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.c32: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.cpu_ms: dict[str, float] = {}
        self.wrk: dict[int, tuple[float, float, float]] = {}
        self.wrk_cpu_ms: dict[str, float] = {}


CPU_COLUMNS = ("gateway", "PostgreSQL", "upstream", "client")
# wrk counts a request unanswered after 2 s (its default) as an error; on a loaded machine LiteLLM's p99 at
# concurrency 32 passes that, which is slowness, not failure: the bench fails only past this many seconds.
WRK_TIMEOUT = 30


def _cpu_now(target: Target) -> dict[str, float]:
    return {column: read() for column, read in target.cpu.items()}


def _cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    return {column: (after[column] - before[column]) * 1000 / requests for column in before}


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once reaped
    return usage.ru_utime + usage.ru_stime


async def measure(targets: list[Target], args: argparse.Namespace) -> None:
    from bench.gateway_overhead import run_load, run_wrk, summary

    for target in targets:  # warm every path (connections, pools, the model's load behind our gateway)
        for _ in range(50):
            await target.call()
    for target in targets:
        target.c1 = summary(*await run_load(target.call, args.requests, 1))
    for target in targets:
        before = _cpu_now(target)
        latencies, wall = await run_load(target.call, args.requests, 32)
        target.cpu_ms = _cpu_ms_per_request(before, _cpu_now(target), len(latencies))
        target.c32 = summary(latencies, wall)
    if not args.wrk_seconds:
        return
    for target in targets:
        if target.url is None:
            continue
        target.wrk[1] = run_wrk(target.url, target.body, 1, args.wrk_seconds, WRK_TIMEOUT)
        cpu = {**target.cpu, "client": _children_cpu_seconds}
        before = {column: read() for column, read in cpu.items()}
        target.wrk[32] = run_wrk(target.url, target.body, 32, args.wrk_seconds, WRK_TIMEOUT)
        after = {column: read() for column, read in cpu.items()}
        target.wrk_cpu_ms = _cpu_ms_per_request(before, after, round(target.wrk[32][2] * args.wrk_seconds))


def _cpu_cells(cpu_ms: dict[str, float]) -> str:
    return "".join(f"{cpu_ms[c]:>11.2f}" if c in cpu_ms else f"{'—':>11}" for c in CPU_COLUMNS)


def print_table(targets: list[Target], wrk: bool) -> None:
    print(f"{'':26}{'concurrency 1':^32}|{'concurrency 32':^17}| CPU ms per request at concurrency 32")
    print(
        f"{'target':26}{'median':>9}{'p99':>10}{'added':>12} |{'req/s':>8}{'ratio':>8} |"
        + "".join(f"{c:>11}" for c in CPU_COLUMNS)
    )

    def row(name: str, c1, c32, direct_c1, direct_c32, cpu_ms) -> str:
        added = f"+{c1[0] - direct_c1[0]:.2f} ms" if direct_c1 else ""
        ratio = f"{c32[2] / direct_c32[2]:.1%}" if direct_c32 else ""
        cells = f"{c1[0]:>7.2f}ms{c1[1]:>8.2f}ms{added:>12} |{c32[2]:>8.0f}{ratio:>8} |"
        return f"{name:26}{cells}{_cpu_cells(cpu_ms)}"

    for target in targets:
        d = target.direct
        print(row(target.name, target.c1, target.c32, d and d.c1, d and d.c32, target.cpu_ms))
    if wrk:
        print("the same through wrk (a C client; its CPU in the client column):")
        for target in targets:
            if target.url is None:
                continue
            d = target.direct
            # gRPC has no wrk row: our gateway is compared with the direct gRPC row above (grpc's C core).
            d1, d32 = (d.wrk[1], d.wrk[32]) if d and d.url else (d and d.c1, d and d.c32)
            print(row(target.name, target.wrk[1], target.wrk[32], d1, d32, target.wrk_cpu_ms))


def _upstream_process(log_dir: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from bench.gateway_overhead import _free_port

    port = _free_port()
    log = (log_dir / "upstream.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(f"{url}/v1/chat/completions", json={}, timeout=2).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"the upstream did not start; see {log_dir}/upstream.log")


async def run(
    args: argparse.Namespace, upstream: str, proxy: Proxy, cluster, pids: dict[str, int]
) -> list[Target]:
    import httpx

    from bench.pgcpu import process_cpu_seconds, tree_cpu_seconds

    def tree(pid: int):
        return lambda: tree_cpu_seconds(pid)

    limits = httpx.Limits(max_connections=64)
    async with (
        httpx.AsyncClient(base_url=upstream, timeout=60, limits=limits) as to_upstream,
        httpx.AsyncClient(base_url=proxy.url, timeout=60, limits=limits) as to_proxy,
        httpx.AsyncClient(base_url=cluster.url if cluster else "", timeout=60, limits=limits) as to_ours,
    ):

        def http_call(client: httpx.AsyncClient, body: dict):
            async def call() -> None:
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()

            return call

        client = {"client": process_cpu_seconds}
        stub = {"upstream": tree(pids["upstream"])}
        direct = Target(
            "upstream, direct HTTP",
            http_call(to_upstream, args.body),
            upstream,
            None,
            {**stub, **client},
            args.body,
        )
        targets = [
            direct,
            Target(
                f"LiteLLM {proxy.version} proxy",
                http_call(to_proxy, args.body),
                proxy.url,
                direct,
                {"gateway": tree(pids["litellm"]), **stub, **client},
                args.body,
            ),
        ]
        if cluster:
            from asgiref.sync import sync_to_async

            from bench.pgcpu import postmaster_pid
            from nodes.models import ModelReplica
            from nodes.tokens import backend_token_for
            from worker_client.client import BackendClient

            (await to_ours.post("/v1/chat/completions", json=args.ours_body)).raise_for_status()  # loads it

            def replica_and_postmaster():
                from django.db import connection

                replica = ModelReplica.objects.select_related("node").get(
                    model_name=args.model, state="loaded"
                )
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    postmaster = postmaster_pid(cursor.fetchone()[0])
                return replica.address, backend_token_for(replica.node), postmaster

            address, token, postmaster = await sync_to_async(replica_and_postmaster)()
            backend = BackendClient(address, token)

            async def grpc_call() -> None:
                await backend.predict(Messages=args.body["messages"], UseTokenizerTemplate=True)

            echo = {"upstream": tree(pids["agent"])}
            grpc = Target("echo, direct gRPC", grpc_call, None, None, {**echo, **client})
            ours = Target(
                "our gateway",
                http_call(to_ours, args.ours_body),
                cluster.url,
                grpc,
                {
                    "gateway": tree(pids["web"]),
                    "PostgreSQL": lambda: tree_cpu_seconds(postmaster),
                    **echo,
                    **client,
                },
                args.ours_body,
            )
            targets += [grpc, ours]
        await measure(targets, args)
    return targets


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per target and concurrency level"
    )
    parser.add_argument("--workers", type=int, default=2, help="web processes of each gateway")
    parser.add_argument(
        "--wrk-seconds", type=int, default=10, help="duration of each wrk run (0: no wrk rows)"
    )
    parser.add_argument("--no-ours", action="store_true", help="LiteLLM and its upstream only (no Django)")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/peer_litellm.py", *sys.argv[1:]])
    print(f"reproduce: {command}", flush=True)
    import shutil

    if args.wrk_seconds and not shutil.which("wrk"):
        print("(no wrk on this machine — apt-get install wrk — so no wrk rows)")
        args.wrk_seconds = 0
    venv = ensure_bench_venv()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-peer-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    suffix = os.getpid()
    args.model = f"bench-echo-{suffix}"
    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
    args.body = {"model": "bench-upstream", "messages": messages}
    args.ours_body = {"model": args.model, "messages": messages}
    load_before = os.getloadavg()
    from bench.gateway_overhead import stop_process

    upstream_process, upstream = _upstream_process(log_dir)
    proxy = Proxy(venv, upstream, "bench-upstream", workers=args.workers, log_dir=log_dir)
    cluster = None
    try:
        pids = {"upstream": upstream_process.pid, "litellm": proxy.process.pid}
        if not args.no_ours:
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "localai_cluster.settings")
            from bench.gateway_overhead import Cluster, _setup_django, pin_to_this_run

            _setup_django()
            import logging

            logging.getLogger("httpx").setLevel(logging.WARNING)
            from scheduling.catalog import model_config_upsert

            model_config_upsert(name=args.model, backend="echo")
            cluster = Cluster(workers=args.workers, log_dir=log_dir)
            cluster.add_agent(f"bench-agent-{suffix}", slots=1, labels=f"bench={suffix}")
            pin_to_this_run([args.model], suffix)
            cluster.wait_agents()
            pids |= {"web": cluster.processes[0].pid, "agent": cluster.processes[1].pid}
        proxy.wait()
        print(
            f"{args.workers} web processes per gateway, {args.requests} requests per row from one Python process "
            f"(httpx, keep-alive), wrk {args.wrk_seconds} s per row; logs in {log_dir}",
            flush=True,
        )
        targets = asyncio.run(run(args, upstream, proxy, cluster, pids))
        before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, os.getloadavg()))
        print(f"load average {before} before the run, {after} after it")
        print_table(targets, bool(args.wrk_seconds))
    finally:
        proxy.stop()
        stop_process(upstream_process)
        if cluster:
            cluster.stop()
            from scheduling.models import ModelConfig, SchedulingRule

            ModelConfig.objects.filter(name=args.model).delete()
            SchedulingRule.objects.filter(model_name=args.model).delete()


if __name__ == "__main__":
    main()
