"""The PostgreSQL failover scenario, shared by `test_failover.py` (which asserts on its outcome) and
`bench/failover_drill.py` (which prints its timeline).

A real stack (a web process, an echo agent, a Celery worker and beat) runs against a primary with a synchronous
streaming standby (`ReplicatedEngines`), `DATABASE_URL` naming both hosts with
`target_session_attrs=read-write`. Under steady traffic, with long streams in flight and committed control
changes made just before, every process of the primary is killed with SIGKILL; once the gateway answers 503,
the standby is promoted (`pg_ctl promote`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg

from tests.conftest import agent_port, free_port, wait_until
from tests.reliability.conftest import celery_worker_argv, wait_http_ok, web_argv
from tests.reliability.replication import ReplicatedEngines

HANG = 60  # a client timeout far above any bound the gateway promises: reaching it means a hang
POOL_TIMEOUT = 2  # LOCALAI_DB_POOL_TIMEOUT of the stack
SLOW_MODEL = "slow-1"
STREAMS = 3


@dataclass
class Answer:
    started: float
    ended: float
    status: int  # 0: no answer (the client gave up or the connection failed)
    code: str = ""
    error: str = ""


class Traffic:
    """`workers` threads sending chat requests back to back until `stop()`; every answer recorded."""

    def __init__(self, url: str, key: str, workers: int = 3) -> None:
        self.url, self.key = url, key
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HANG + 5)

    def _run(self) -> None:
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "ping"}]}
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(timeout=HANG) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)
                    code = ""
                    if response.status_code != 200:
                        try:
                            code = response.json()["error"]["code"]
                        except (ValueError, KeyError, TypeError):
                            code = response.text[:200]
                    answer = Answer(started, time.monotonic(), response.status_code, code)
                except httpx.HTTPError as error:
                    answer = Answer(started, time.monotonic(), 0, error=repr(error))
                with self._lock:
                    self.answers.append(answer)
                if answer.status != 200:
                    self._stop.wait(0.05)  # a failing gateway is not hammered in a busy loop

    def since(self, moment: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.started >= moment or a.ended >= moment]


class Stream:
    """One long streamed answer of the slow model, held open until `close()`."""

    def __init__(self, url: str, key: str) -> None:
        self.claimed = threading.Event()
        self.closed = threading.Event()
        self.failed = ""
        self._close = threading.Event()
        body = {
            "model": SLOW_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": " ".join(["word"] * 300)}],
        }
        self._thread = threading.Thread(target=self._run, args=(url, key, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, key: str, body: dict) -> None:
        try:
            with (
                httpx.Client(timeout=HANG) as client,
                client.stream(
                    "POST",
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response,
            ):
                if response.status_code != 200:
                    self.failed = f"{response.status_code} {response.read()[:200]!r}"
                    return
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.claimed.set()
                    if self._close.is_set():
                        return  # leaving the block closes the connection: the client went away
        except httpx.HTTPError as error:
            self.failed = repr(error)
        finally:
            self.closed.set()

    def close(self) -> None:
        self._close.set()
        self._thread.join(HANG)


@dataclass
class Outcome:
    killed_at: float = 0.0
    first_503_at: float = 0.0
    promote_started_at: float = 0.0
    promoted_at: float = 0.0
    promotion: float = 0.0
    first_200_at: float = 0.0
    republished_at: float = 0.0
    loops_resumed_at: dict[str, float] = field(default_factory=dict)
    in_flight_right_at: float = 0.0
    answers: list[Answer] = field(default_factory=list)  # from the kill to the first 200 after promotion
    committed: dict[str, Any] = field(default_factory=dict)  # what was committed just before the kill
    found: dict[str, Any] = field(default_factory=dict)  # the same, read on the new primary
    overcommits: list = field(default_factory=list)
    in_flight_during: tuple[int, int] = (0, 0)  # (slow model's counter, streams open) after the switch
    in_flight_after: int = -1  # every counter summed once traffic stopped
    replication: list[tuple] = field(default_factory=list)


def _stack_env(pair: ReplicatedEngines) -> dict[str, str]:
    return pair.env(
        LOCALAI_AUTO_APPROVE_NODES="true",
        LOCALAI_RECONCILE_INTERVAL="0.5",
        LOCALAI_HEALTH_CHECK_INTERVAL="0.5",
        LOCALAI_DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        LOCALAI_DB_CONNECT_TIMEOUT="2s",
        LOCALAI_DB_STATEMENT_TIMEOUT="5s",
        LOG_LEVEL="INFO",
    )


def _api(url: str, key: str, method: str, path: str, body: Any) -> httpx.Response:
    response = httpx.request(
        method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=HANG
    )
    assert response.status_code in (200, 201), f"{method} {path}: {response.status_code} {response.text}"
    return response


def _celery_ticks_after(worker: Any, offset: int, task: str) -> int:
    return sum(
        1
        for line in worker.log()[offset:].splitlines()
        if f"scheduling.tasks.{task}" in line and "succeeded" in line
    )


def run_failover(
    pair: ReplicatedEngines,
    start: Callable[[str, list[str], dict[str, str]], Any],
    tmp_dir: Any,
    note: Callable[[str], None] = lambda _: None,
    outage: float = 0.0,
) -> Outcome:
    """The scenario; `start(name, argv, env)` starts a managed process (the `processes` fixture), `note`
    hears each step. The standby is promoted once the gateway answers 503, or `outage` seconds after the kill
    when that is later (the drill's stand-in for a failover manager's detection time). Answers what was
    observed; asserts only what the scenario needs to go on."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    outcome = Outcome()
    env = _stack_env(pair)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web = start("web", web_argv(port), env)
    wait_http_ok(f"{url}/healthz", message="the web process")
    start(
        "agent",
        [
            *(sys.executable, "-m", "worker_client.agent", "--register-to", url),
            *("--addr", f"127.0.0.1:{agent_port()}", "--node-name", "failover-agent"),
            *("--heartbeat-interval", "1s", "--vram", "24GiB", "--drain-timeout", "2s"),
        ],
        env,
    )
    key = pair.manage("create_api_key", "--name", "ops", "--admin").strip().splitlines()[-1]
    worker = start("celery-worker", celery_worker_argv("celery", "failover@%h"), env)
    start(
        "celery-beat",
        [
            *(sys.executable, "-m", "celery", "-A", "localai_cluster", "beat", "--loglevel", "info"),
            *("--schedule", str(tmp_dir / "celerybeat-schedule")),
        ],
        env,
    )
    wait_until(
        lambda: _celery_ticks_after(worker, 0, "health_tick") >= 1, timeout=90, message="a health tick"
    )
    headers = {"Authorization": f"Bearer {key}"}

    def answers_200() -> bool:
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "ping"}]}
        try:
            return (
                httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=HANG).status_code
                == 200
            )
        except httpx.HTTPError:
            return False

    wait_until(answers_200, timeout=90, interval=0.5, message="echo-1 to answer")
    _api(
        url,
        key,
        "PUT",
        f"/api/models/{SLOW_MODEL}",
        {"backend": "echo", "options": {"options": ["delay_ms:1000"]}},
    )
    streams = [Stream(url, key) for _ in range(STREAMS)]
    for stream in streams:
        wait_until(
            lambda stream=stream: stream.claimed.is_set() or stream.failed,
            timeout=120,
            message="a long stream to start",
        )
        assert not stream.failed, stream.failed
    traffic = Traffic(url, key).start()
    wait_until(
        lambda: sum(a.status == 200 for a in traffic.answers) >= 20, timeout=60, message="steady traffic"
    )
    note(f"steady: {sum(a.status == 200 for a in traffic.answers)} answers 200, {STREAMS} long streams open")

    # Control changes committed just before the crash: each returned only once the standby had it on disk.
    node_id = httpx.get(f"{url}/api/nodes", headers=headers, timeout=HANG).json()["results"][0]["id"]
    _api(url, key, "PUT", "/api/models/failover-catalog", {"backend": "echo", "context_size": 2048})
    _api(
        url,
        key,
        "POST",
        "/api/nodes/scheduling",
        {"model_name": "failover-catalog", "min_replicas": 0, "max_replicas": 2},
    )
    _api(url, key, "PATCH", f"/api/nodes/{node_id}/labels", {"failover": "survived"})
    pair.manage("create_api_key", "--name", "made-before-the-crash")
    outcome.committed = {"catalog": 2048, "rule": 2, "label": "survived", "key": True}
    outcome.replication = pair.replication_state()

    outcome.killed_at = time.monotonic()
    pair.crash_primary()
    note("primary killed (SIGKILL to every process)")
    wait_until(
        lambda: any(a.status == 503 for a in traffic.since(outcome.killed_at)),
        timeout=HANG,
        message="the gateway to answer 503 without a primary",
    )
    outcome.first_503_at = min(a.ended for a in traffic.since(outcome.killed_at) if a.status == 503)
    note("gateway answers 503; promoting the standby")
    time.sleep(max(outcome.killed_at + outage - time.monotonic(), 0))  # the drill's chosen outage, if any
    loop_offset = len(worker.log())
    web_offset = len(web.log())
    outcome.promote_started_at = time.monotonic()
    outcome.promotion = pair.promote()
    outcome.promoted_at = time.monotonic()
    note(f"standby promoted ({outcome.promotion:.2f}s)")

    def first_200_after_promotion() -> float:
        return min(
            (
                a.ended
                for a in traffic.since(outcome.promoted_at)
                if a.status == 200 and a.started >= outcome.promoted_at
            ),
            default=0.0,
        )

    outcome.first_200_at = wait_until(
        first_200_after_promotion, timeout=HANG, message="a 200 after the promotion"
    )
    note("gateway serves again")
    for task in ("health_tick", "reconcile_tick"):
        wait_until(
            lambda task=task: _celery_ticks_after(worker, loop_offset, task) >= 1,
            timeout=HANG,
            message=f"Celery's {task} to succeed on the new primary",
        )
        outcome.loops_resumed_at[task] = time.monotonic()
    # A 200 after the promotion means the web process took its new owner id, which re-publishes first.
    if "re-published" in web.log()[web_offset:]:
        outcome.republished_at = time.monotonic()
    open_streams = sum(not s.closed.is_set() for s in streams)

    with psycopg.connect(pair.standby_url, autocommit=True) as conn:

        def slow_in_flight() -> int:
            row = conn.execute(
                "SELECT COALESCE(SUM(in_flight), 0) FROM nodes_modelreplica WHERE model_name = %s",
                [SLOW_MODEL],
            ).fetchone()
            return int(row[0])

        # A health tick after the re-publish has reclaimed the old owner id's claims (its lock is not held on
        # the new primary): the counter is then exactly the streams still open.
        health_offset = len(worker.log())
        wait_until(
            lambda: _celery_ticks_after(worker, health_offset, "health_tick") >= 1,
            timeout=HANG,
            message="a health tick after the re-publish",
        )
        outcome.in_flight_during = (slow_in_flight(), sum(not s.closed.is_set() for s in streams))
        outcome.in_flight_right_at = time.monotonic()
        assert open_streams == outcome.in_flight_during[1], "a long stream ended during the switch"

        outcome.found = {
            "catalog": conn.execute(
                "SELECT context_size FROM scheduling_modelconfig WHERE name = 'failover-catalog'"
            ).fetchone(),
            "rule": conn.execute(
                "SELECT max_replicas FROM scheduling_schedulingrule WHERE model_name = 'failover-catalog'"
            ).fetchone(),
            "label": conn.execute("SELECT value FROM nodes_nodelabel WHERE key = 'failover'").fetchone(),
            "key": conn.execute("SELECT 1 FROM nodes_apikey WHERE name = 'made-before-the-crash'").fetchone(),
        }
        from tests.reliability.invariants import check

        with conn.cursor() as cursor:
            outcome.overcommits = list(check(cursor, exact_reservations=False).overcommits)

        traffic.stop()
        for stream in streams:
            stream.close()
        outcome.answers = [
            a for a in traffic.answers if a.ended >= outcome.killed_at and a.started <= outcome.first_200_at
        ]
        wait_until(
            lambda: (
                conn.execute("SELECT COALESCE(SUM(in_flight), 0) FROM nodes_modelreplica").fetchone()[0] == 0
            ),
            timeout=HANG,
            message="in-flight to return to 0 once traffic stopped",
        )
        outcome.in_flight_after = 0
    return outcome


def timeline(outcome: Outcome) -> list[str]:
    """The outcome as lines of seconds after the kill."""

    def at(moment: float) -> str:
        return f"{moment - outcome.killed_at:7.2f}s"

    statuses: dict[str, int] = {}
    for answer in outcome.answers:
        label = (
            str(answer.status) if answer.status == 200 else f"{answer.status} {answer.code or answer.error}"
        )
        statuses[label] = statuses.get(label, 0) + 1
    longest = max((a.ended - a.started for a in outcome.answers), default=0.0)
    return [
        f"{at(outcome.killed_at)}  primary killed (SIGKILL)",
        f"{at(outcome.first_503_at)}  first 503 control_plane_unavailable",
        f"{at(outcome.promote_started_at)}  pg_ctl promote",
        f"{at(outcome.promoted_at)}  standby accepts writes (promotion {outcome.promotion:.2f}s)",
        f"{at(outcome.first_200_at)}  first 200 of a request sent after the promotion "
        f"({outcome.first_200_at - outcome.promoted_at:.2f}s after it)",
        *(f"{at(moment)}  Celery {task} succeeded" for task, moment in outcome.loops_resumed_at.items()),
        f"{at(outcome.republished_at)}  web process re-published its held units (seen in its log by then)"
        if outcome.republished_at
        else "        web process did NOT log a re-publish of its held units",
        f"{at(outcome.in_flight_right_at)}  after the next health tick: slow model in-flight "
        f"{outcome.in_flight_during[0]}, streams open {outcome.in_flight_during[1]}",
        f"answers from the kill to the first 200: {statuses}; longest {longest:.2f}s",
        f"committed before the kill: {outcome.committed}; on the new primary: {outcome.found}",
        f"over-commits after the switch: {len(outcome.overcommits)}; replication before: {outcome.replication}",
    ]
