"""Optimistic dispatch (`scheduling.optimistic`): the prediction, its gates, and what becomes of an early call.
End to end through the gateway: tests/e2e/test_gateway_optimistic.py."""

from __future__ import annotations

import asyncio

import pytest

from localai_cluster import metrics
from scheduling import optimistic, router
from scheduling.routing import Preference
from tests.conftest import turns_until


def lease(replica_id: int, *, address: str | None = None, token: str = "t") -> router.Lease:
    return router.Lease(
        replica_id=replica_id,
        model_name="m",
        replica_index=0,
        address=address or f"127.0.0.1:{40000 + replica_id}",
        node_id=replica_id,
        node_name=f"n{replica_id}",
        node_address="127.0.0.1:1",
        backend_token=token,
    )


def count(outcome: str) -> float:
    return metrics.GATEWAY_OPTIMISTIC_CALLS.labels(outcome)._value.get()


NONE = Preference.none()


def claims(model: str, replicas: list[int], key: object = None) -> None:
    for replica_id in replicas:
        optimistic.claimed(model, key, NONE, lease(replica_id))


async def answer_of(target: router.Lease) -> str:
    return f"answer of {target.replica_id}"


def started(model: str, key: object = None, preference: Preference = NONE) -> optimistic.EarlyCall | None:
    with optimistic.in_progress(model):
        early = optimistic.start(model, key, preference, answer_of)
    if early is not None:
        early.drop()
    return early


@pytest.mark.parametrize(
    "pattern",
    [[1], [1, 2], [1, 2, 3], [3, 1, 2, 4]],
    ids=["one replica", "two taking turns", "round robin of three", "round robin of four"],
)
async def test_a_repeating_pattern_of_claims_is_predicted_and_opens_the_gate(pattern):
    claims("m", pattern * 2)  # one round to learn who follows whom
    assert started("m") is None  # not trusted yet
    claims("m", pattern * optimistic.TRUST_AFTER)
    early = started("m")
    assert early is not None
    assert early.guess.replica_id == pattern[0]  # after the last of the pattern comes its first


async def test_one_wrong_prediction_closes_the_gate_until_enough_right_ones():
    claims("m", [1] * (optimistic.TRUST_AFTER + 1))
    assert started("m") is not None
    claims("m", [2])  # the routable set changed (a drain): one miss
    for _ in range(optimistic.TRUST_AFTER - 1):
        claims("m", [2])
        assert started("m") is None
    claims("m", [2])
    early = started("m")
    assert early is not None and early.guess.replica_id == 2


async def test_a_replica_that_came_back_at_another_address_or_token_is_a_miss():
    claims("m", [1] * (optimistic.TRUST_AFTER + 1))
    optimistic.claimed("m", None, NONE, lease(1, address="127.0.0.1:9"))
    assert started("m") is None
    claims("m", [1] * (optimistic.TRUST_AFTER + 1))
    optimistic.claimed("m", None, NONE, lease(1, token="new salt"))
    assert started("m") is None


async def test_gates_busy_preference_key_age_and_setting(settings, monkeypatch):
    claims("m", [1] * (optimistic.TRUST_AFTER + 1), key="lac_a")
    assert started("m", "lac_a") is not None
    assert started("m", router.NO_AUTH) is not None  # the staff console's calls carry no bearer value
    assert started("m", "lac_never_accepted") is None
    assert started("m", "lac_a", Preference([1], [3])) is None  # a prefix match orders the claim
    assert started("m", "lac_a", Preference.none("session-key")) is None

    with optimistic.in_progress("m"):  # another request of the model is between claim and answer
        assert started("m", "lac_a") is None

    settings.LOCALAI_OPTIMISTIC_DISPATCH = False
    assert started("m", "lac_a") is None
    settings.LOCALAI_OPTIMISTIC_DISPATCH = True

    now = optimistic.monotonic()
    monkeypatch.setattr(optimistic, "monotonic", lambda: now + optimistic.RECENT + 0.1)
    assert started("m", "lac_a") is None  # the key's acceptance and the model's last claim are too old


async def test_a_preferred_claim_is_neither_scored_nor_learned():
    claims("m", [1] * (optimistic.TRUST_AFTER + 1))
    optimistic.claimed("m", None, Preference([2], [1]), lease(2))
    early = started("m")
    assert early is not None and early.guess.replica_id == 1


async def test_the_early_answer_is_used_when_the_claim_picked_the_guessed_replica():
    calls: list[int] = []

    async def call(target: router.Lease) -> str:
        calls.append(target.replica_id)
        return f"answer of {target.replica_id}"

    used = count("used")
    early = optimistic.EarlyCall(lease(1), call(lease(1)))
    assert await early.answer(lease(1), call) == "answer of 1"
    assert calls == [1]  # not called again
    assert count("used") == used + 1
    early.drop()  # settled: nothing more
    assert count("used") == used + 1


async def test_another_replica_claimed_cancels_the_early_call_and_calls_the_claimed_one():
    reached = asyncio.Event()

    async def slow(target: router.Lease) -> str:
        reached.set()
        await asyncio.Event().wait()  # a backend still computing
        return "never"

    discarded = count("discarded")
    early = optimistic.EarlyCall(lease(1), slow(lease(1)))
    await reached.wait()
    assert await early.answer(lease(2), answer_of) == "answer of 2"
    await asyncio.wait([early.task])
    assert early.task.cancelled()
    assert count("discarded") == discarded + 1


async def test_a_failed_early_call_is_made_again_on_the_claimed_replica():
    async def failing(target: router.Lease) -> str:
        raise RuntimeError("backend went away")

    failed = count("failed")
    early = optimistic.EarlyCall(lease(1), failing(lease(1)))
    assert await early.answer(lease(1), answer_of) == "answer of 1"
    assert count("failed") == failed + 1


async def test_a_dropped_call_is_cancelled_once():
    reached = asyncio.Event()

    async def slow(target: router.Lease) -> str:
        reached.set()
        await asyncio.Event().wait()
        return "never"

    early = optimistic.EarlyCall(lease(1), slow(lease(1)))
    await reached.wait()
    discarded = count("discarded")
    early.drop()
    early.drop()
    await asyncio.wait([early.task])
    assert early.task.cancelled()
    assert count("discarded") == discarded + 1


async def test_an_answer_thrown_away_after_it_arrived_is_discarded():
    """A stream opened early on the wrong replica, or by a request that failed or went away, is closed."""
    closed: list[str] = []

    async def close(answer: str) -> None:
        closed.append(answer)

    early = optimistic.EarlyCall(lease(1), answer_of(lease(1)), close)
    await asyncio.wait([early.task])  # the early stream is open
    assert await early.answer(lease(2), answer_of) == "answer of 2"
    dropped = optimistic.EarlyCall(lease(3), answer_of(lease(3)), close)
    await asyncio.wait([dropped.task])
    dropped.drop()  # the claim failed
    used = optimistic.EarlyCall(lease(4), answer_of(lease(4)), close)
    assert await used.answer(lease(4), answer_of) == "answer of 4"
    await turns_until(lambda: len(closed) == 2, turns=100)
    assert closed == ["answer of 1", "answer of 3"]  # the one used is the caller's to close


async def test_an_early_answer_that_arrives_as_its_request_goes_away_is_discarded():
    opening = asyncio.Event()
    closed: list[str] = []

    async def opened(target: router.Lease) -> str:
        await opening.wait()
        return f"stream of {target.replica_id}"

    async def close(answer: str) -> None:
        closed.append(answer)

    early = optimistic.EarlyCall(lease(1), opened(lease(1)), close)
    request = asyncio.ensure_future(early.answer(lease(1), opened))
    # Runs after the early call answered and before the request resumes with that answer: the client went away.
    early.task.add_done_callback(lambda _: request.cancel())
    await asyncio.sleep(0)  # the request waits for the early answer
    opening.set()
    await asyncio.wait([request])
    assert request.cancelled()
    await turns_until(lambda: closed == ["stream of 1"], turns=100)
