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


def _prefix_lines(text: str) -> list[tuple[int, int]]:
    lines = [line for line in text.splitlines() if line.startswith("prefix-cache: ")]
    return [tuple(int(part.split("=")[1]) for part in line.split()[1:]) for line in lines]  # type: ignore[misc]


async def test_prefix_cache_counts_hits_and_misses_and_drops_the_least_recently_used(
    echo: BackendClient, capsys: pytest.CaptureFixture[str]
) -> None:
    system = "s" * 100
    assert (await echo.load_model({"Model": "m", "Options": ["prefix_cache_chars:250"]}))[0]
    capsys.readouterr()
    await echo.predict(Prompt=system + "one")  # cold: all missed
    await echo.predict(Prompt=system + "two")  # the shared system prompt hits
    await echo.predict(Prompt=system + "two")  # the same prompt: a whole hit
    # Kept: the two prompts share their system prompt, stored once (106 chars); with a third of 103, 209.
    await echo.predict(Prompt="x" * 103)
    # A fourth of 42 goes over 250 (251): the least recently used ("…one") goes, which frees only its own
    # 3 characters (248): the system prompt stays, "…two" holds it.
    await echo.predict(Prompt="y" * 42)
    await echo.predict(Prompt=system + "onX")  # "one" was dropped: only "…two" covers the system prompt
    pieces = [piece async for piece in echo.predict_stream(Prompt="x" * 103)]  # streams count too
    assert pieces
    assert _prefix_lines(capsys.readouterr().out) == [
        (0, 103),
        (100, 3),
        (103, 0),
        (0, 103),
        (0, 42),
        (100, 3),
        (103, 0),
    ]


def test_prefix_cache_size_is_its_prompts_trie_and_hits_are_the_longest_common_prefix() -> None:
    """Against a brute force on random prompts over a small alphabet (many shared prefixes): the kept size
    is the number of distinct prefixes of the kept prompts, never above the capacity, and each hit the
    longest common prefix with a prompt kept before it."""
    import random

    from worker_client.backends.echo.server import PrefixCache, common_prefix

    rng = random.Random(14)
    cache = PrefixCache(60)
    for _ in range(2000):
        prompt = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        expected = max((common_prefix(prompt, kept) for kept in cache.prompts), default=0)
        assert cache.serve(prompt) == expected
        distinct = {kept[:end] for kept in cache.prompts for end in range(1, len(kept) + 1)}
        assert cache.size == len(distinct) <= 60
        assert cache.ordered == sorted(cache.prompts)
        assert prompt in cache.prompts  # the newest is always kept (it fits)


async def test_prefill_time_is_paid_per_missed_character_only(
    echo: BackendClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        await echo.load_model({"Model": "m", "Options": ["prefill_us_per_char:1", "prefix_cache_chars:0"]})
    )[0]
    capsys.readouterr()
    await echo.predict({"Messages": [{"role": "user", "content": "abc"}]})
    await echo.predict({"Messages": [{"role": "user", "content": "abc"}]})  # capacity 0: nothing kept
    assert _prefix_lines(capsys.readouterr().out) == [(0, 3), (0, 3)]


async def test_no_prefix_line_without_the_options(
    echo: BackendClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await echo.load_model({"Model": "m", "Options": []}))[0]
    await echo.predict(Prompt="hello")
    assert "prefix-cache" not in capsys.readouterr().out
    assert not (await echo.load_model({"Model": "m", "Options": ["prefix_cache_chars:-1"]}))[0]


def test_common_prefix_lengths() -> None:
    from worker_client.backends.echo.server import common_prefix

    assert [
        common_prefix(a, b) for a, b in [("", "x"), ("abc", "abd"), ("abc", "abc"), ("ab", "abc"), ("x", "y")]
    ] == [
        0,
        2,
        3,
        2,
        0,
    ]
    long_a, long_b = "a" * 5000 + "b", "a" * 5000 + "c"
    assert common_prefix(long_a, long_b) == 5000


async def test_prefills_of_one_replica_run_one_at_a_time_and_see_the_ones_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefill is compute-bound: a second request's prefill starts only when the first's has ended, and then
    finds the first's prompt cached. (Its sleep is replaced by one that records when it starts and ends.)"""
    import asyncio
    from types import SimpleNamespace

    from worker_client._generated import backend_pb2
    from worker_client.backends.echo import server

    events: list[str] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        events.append(f"sleep {seconds:.3f}")
        await real_sleep(0)
        await real_sleep(0)
        events.append("slept")

    backend = server.EchoBackend()
    monkeypatch.setattr(server, "asyncio", SimpleNamespace(sleep=recorded_sleep))
    monkeypatch.setattr(server, "log_request", lambda method, detail: events.append(f"{method} {detail}"))
    backend.knobs = server.Knobs(prefill_us_per_char=1000, prefix_cache_chars=1000)
    backend.prefix_cache = server.PrefixCache(1000)
    system = "s" * 100
    await asyncio.gather(
        backend._prefill(backend_pb2.PredictOptions(Prompt=system + "one")),
        backend._prefill(backend_pb2.PredictOptions(Prompt=system + "two")),
    )
    assert events == [
        "prefix-cache: hit=0 miss=103",
        "sleep 0.103",
        "slept",
        "prefix-cache: hit=100 miss=3",
        "sleep 0.003",
        "slept",
    ]
