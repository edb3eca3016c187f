"""The echo backend's answers and its token check, through `BackendClient` (CONTRACT §5.2)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from worker_client.backends.echo.server import EMBEDDING_SIZE, create_server
from worker_client.client import BackendClient
from worker_client.errors import WorkerError

TOKEN = "backend-secret"


@pytest.fixture
async def echo() -> AsyncIterator[BackendClient]:
    server = create_server(TOKEN)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield BackendClient(f"127.0.0.1:{port}", TOKEN, timeout=10)
    await server.stop(None)


async def test_answer_echoes_the_last_user_message_and_counts_words(echo: BackendClient) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "tell me more please"},
    ]
    reply = await echo.predict({"Messages": messages})
    assert reply.message == "echo: tell me more please"
    assert (reply.tokens, reply.prompt_tokens) == (5, 9)


async def test_max_tokens_truncate_the_answer(echo: BackendClient) -> None:
    reply = await echo.predict(Prompt="one two three four", Tokens=3)
    assert (reply.message, reply.tokens, reply.prompt_tokens) == ("echo: one two", 3, 4)


async def test_stream_yields_one_reply_per_token_adding_up_to_the_answer(echo: BackendClient) -> None:
    pieces = [reply async for reply in echo.predict_stream(Prompt="a b c")]
    assert [piece.message for piece in pieces] == ["echo:", " a", " b", " c"]
    assert "".join(piece.message for piece in pieces) == (await echo.predict(Prompt="a b c")).message


async def test_embedding_is_fixed_size_and_deterministic(echo: BackendClient) -> None:
    first, again, other = (
        await echo.embedding("hello"),
        await echo.embedding("hello"),
        await echo.embedding("bye"),
    )
    assert len(first) == EMBEDDING_SIZE and first == again and first != other
    assert sum(value * value for value in first) == pytest.approx(1.0, rel=1e-5)


async def test_load_model_succeeds_or_fails_on_request(echo: BackendClient) -> None:
    assert await echo.load_model({"Model": "m", "Options": ["delay_ms:1", "load_ms:10"]}) == (
        True,
        "loaded m",
    )
    success, message = await echo.load_model({"Model": "m", "Options": ["fail_load:true"]})
    assert not success and "fail_load" in message
    assert not (await echo.load_model({"Model": "m", "Options": ["delay_ms:soon"]}))[0]


async def test_health_answers_ok(echo: BackendClient) -> None:
    assert await echo.health()


async def test_calls_without_the_token_are_unauthenticated(echo: BackendClient) -> None:
    for token in ("", "wrong"):
        anonymous = BackendClient(echo.address, token)
        assert not await anonymous.health()
        with pytest.raises(WorkerError) as failure:
            await anonymous.predict(Prompt="hi")
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED and not failure.value.retryable
        with pytest.raises(WorkerError):
            [reply async for reply in anonymous.predict_stream(Prompt="hi")]
