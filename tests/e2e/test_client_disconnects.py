"""Every claimed in-flight unit comes back, whatever happens to its request (issue 12 item 1, issue 11 item 10b).

A real web process (uvicorn in a subprocess), a real agent and echo backend; clients on raw sockets cut their
requests with a TCP reset (SO_LINGER 0) at each point of a request's life — while the replica is being claimed,
during the gRPC call, after the answer was built, mid-stream, at random moments — or stop reading a stream.
Each test then waits for the replica's in-flight count to come back to 0.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from nodes.inflight import plain_connection_params
from tests.conftest import wait_until
from tests.e2e.gateway_support import in_flight, place, start_agents_fixture  # noqa: F401
from tests.e2e.request_faults_support import (
    WebProcess,
    backend_lines,
    chat_body,
    read_until,
    reset,
    send_request,
    waiting_statements,
    web_fixture,  # noqa: F401
)
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHAT = "/v1/chat/completions"
GONE_DURING_CLAIM = "went away while its replica was being claimed"


def wait_in_flight_back_to_zero(model: str) -> None:
    wait_until(
        lambda: in_flight(model) and all(value == 0 for value in in_flight(model)),
        timeout=30,
        message=f"in-flight of {model} back to 0 (now {in_flight(model)})",
    )


@contextlib.contextmanager
def row_locked(table: str, row_id: int) -> Iterator[None]:
    """A row lock held by another database session until the block ends (its transaction rolled back)."""
    with psycopg.connect(**plain_connection_params()) as other:
        other.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [row_id])
        yield
        other.rollback()


def cut_while_blocked(web: WebProcess, model: str, statement: str, key: str | None) -> None:
    """Sends a request whose claim blocks on a locked row (in `statement`), resets the connection, waits until
    the web process has seen the disconnect, then lets the statement go on."""
    sock = send_request(web.port, CHAT, chat_body(model), key=key)
    wait_until(lambda: waiting_statements(statement) == 1, message=f"the request's {statement!r} to block")
    reset(sock)
    # The web process saw the reset: either its statement was cancelled, or it says the unit comes back.
    wait_until(
        lambda: waiting_statements(statement) == 0 or GONE_DURING_CLAIM in web.log(),
        message="the web process to see the disconnect",
    )


def test_cut_after_the_claim_committed_but_before_the_lease_was_made(web, start_agents):
    """The claim statement committed, then the next statement of the claim (the API key's last-used stamp)
    blocks: a reset there used to lose the unit for good (the claim's result never reached Python)."""
    from nodes.apikeys import api_key_create
    from nodes.models import ApiKey

    start_agents(1)
    ModelConfigFactory(name="cut-claim")
    place("cut-claim")
    api_key, raw = api_key_create(name="client")

    with row_locked(ApiKey._meta.db_table, api_key.pk):
        cut_while_blocked(web, "cut-claim", "SET last_used_at", key=raw)
        assert in_flight("cut-claim") == [1]  # claimed, and the lease not built yet
    wait_in_flight_back_to_zero("cut-claim")
    assert web.alive()


def test_cut_while_the_claim_statement_waits(web, start_agents):
    """Before the gRPC call: the claim statement itself waits on the replica's row lock when the client goes."""
    from nodes.models import ModelReplica

    start_agents(1)
    ModelConfigFactory(name="cut-wait")
    (placed,) = place("cut-wait")

    with row_locked(ModelReplica._meta.db_table, placed.replica_id):
        cut_while_blocked(web, "cut-wait", "in_flight + 1", key=None)
    wait_in_flight_back_to_zero("cut-wait")
    # The replica still serves, and counts exactly.
    answer = httpx.post(f"{web.url}{CHAT}", json=chat_body("cut-wait"), timeout=60)
    assert answer.status_code == 200, answer.text
    wait_in_flight_back_to_zero("cut-wait")


def test_cut_during_the_grpc_call(web, start_agents):
    (agent,) = start_agents(1)
    ModelConfigFactory(name="cut-call", options={"options": ["delay_ms:300"]})
    place("cut-call")

    sock = send_request(web.port, CHAT, chat_body("cut-call", "one two three four five six"))
    wait_until(lambda: in_flight("cut-call") == [1], message="the request to claim its unit")
    wait_until(lambda: backend_lines(agent, "cut-call", "Predict"), message="the call to reach the backend")
    reset(sock)
    wait_in_flight_back_to_zero("cut-call")


def test_cut_mid_stream_and_before_the_first_chunk(web, start_agents):
    (agent,) = start_agents(1)
    ModelConfigFactory(name="cut-stream", options={"options": ["delay_ms:200"]})
    place("cut-stream")

    # After the first chunk.
    sock = send_request(web.port, CHAT, chat_body("cut-stream", "a b c d e f g h", stream=True))
    assert b"data: " in read_until(sock, b"data: ")
    reset(sock)
    wait_in_flight_back_to_zero("cut-stream")
    # Before the first chunk (the backend waits 200 ms before each piece).
    sock = send_request(web.port, CHAT, chat_body("cut-stream", "a b c d e f g h", stream=True))
    wait_until(lambda: len(backend_lines(agent, "cut-stream", "PredictStream")) == 2, message="the call")
    reset(sock)
    wait_in_flight_back_to_zero("cut-stream")


def test_cut_after_the_answer_was_built(web, start_agents):
    """The non-streaming answer is complete and being written (a large embeddings list) when the reset comes."""
    start_agents(1)
    ModelConfigFactory(name="cut-after")
    place("cut-after")

    body = {"model": "cut-after", "input": [f"text number {i}" for i in range(2048)]}
    sock = send_request(web.port, "/v1/embeddings", body, rcvbuf=4096)
    assert read_until(sock, b"HTTP/1.1 ").startswith(b"HTTP/1.1 200")
    reset(sock)
    wait_in_flight_back_to_zero("cut-after")
    assert web.alive()


def test_resets_at_random_moments_leave_no_unit(web, start_agents):
    """100 requests, streaming and not, each reset at a random moment of its ~100 ms life, 8 at a time."""
    start_agents(1)
    ModelConfigFactory(name="cut-random", options={"options": ["delay_ms:25"]})
    place("cut-random")
    chooser = random.Random(12)
    plans = [(chooser.random() < 0.5, chooser.uniform(0, 0.15)) for _ in range(100)]
    failures: list[BaseException] = []

    def client(share: list[tuple[bool, float]]) -> None:
        try:
            for stream, after in share:
                sock = send_request(
                    web.port, CHAT, chat_body("cut-random", "one two three four", stream=stream)
                )
                sock.settimeout(after)
                with contextlib.suppress(TimeoutError):
                    sock.recv(1)  # waits at most `after` (the answer's first byte ends it sooner)
                reset(sock)
        except BaseException as error:  # reported by the test below
            failures.append(error)

    threads = [threading.Thread(target=client, args=(plans[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    wait_in_flight_back_to_zero("cut-random")
    assert web.alive()
    answer = httpx.post(f"{web.url}{CHAT}", json=chat_body("cut-random"), timeout=60)
    assert answer.status_code == 200, answer.text
    wait_in_flight_back_to_zero("cut-random")


def test_a_client_that_stops_reading_a_stream_gives_its_unit_back(web, start_agents):
    """Issue 11 item 10b: the web process runs with LOCALAI_STREAM_WRITE_TIMEOUT=1s; the client keeps its
    connection open but never reads a long stream."""
    start_agents(1)
    ModelConfigFactory(name="stall")
    place("stall")

    words = " ".join(["word"] * 100_000)  # an answer of ~12 MB of events, far more than the buffers hold
    sock = send_request(web.port, CHAT, chat_body("stall", words, stream=True), rcvbuf=4096)
    try:
        wait_until(lambda: in_flight("stall") == [1], message="the stream to start")
        wait_in_flight_back_to_zero("stall")
        assert "stopped reading" in web.log()
    finally:
        reset(sock)
    assert web.alive()
