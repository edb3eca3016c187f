"""The agent's log store (SCENARIOS 161-165)."""

from __future__ import annotations

import asyncio

from worker_client.agent.logstore import LogStore, Subscription
from worker_client.client import LogLine


def drain(subscription: Subscription) -> list[LogLine]:
    lines = []
    while not subscription.queue.empty():
        lines.append(subscription.queue.get_nowait())
    return lines


def test_reads_per_key_merged_per_model_and_unknown() -> None:
    logs = LogStore()
    for key, text in (("q#0", "a"), ("q#1", "b"), ("q#0", "c"), ("other#0", "d")):
        logs.append(key, "stdout", text)
    assert [line.text for line in logs.read("q")] == ["a", "b", "c"]
    assert [line.text for line in logs.read("q#0")] == ["a", "c"]
    assert logs.read("unknown") == [] and logs.read("q#9") == []
    assert [line.text for line in logs.read("q", tail=2)] == ["b", "c"]


def test_subscription_to_a_model_receives_its_replicas_only() -> None:
    logs = LogStore()
    subscription = logs.subscribe("q")
    for key in ("q#0", "q#1", "other#0", "q3#0"):
        logs.append(key, "stdout", key)
    assert [line.process_key for line in drain(subscription)] == ["q#0", "q#1"]


def test_subscription_to_a_key_receives_that_key_only() -> None:
    logs = LogStore()
    subscription = logs.subscribe("q#0")
    logs.append("q#0", "stdout", "mine")
    logs.append("q#1", "stdout", "sibling")
    assert [line.text for line in drain(subscription)] == ["mine"]
    logs.unsubscribe(subscription)
    logs.append("q#0", "stdout", "after")
    assert drain(subscription) == []


def test_the_last_1000_lines_are_kept_with_timestamp_stream_and_key() -> None:
    logs = LogStore()
    for number in range(1500):
        logs.append("q#0", "stderr" if number % 2 else "stdout", f"line {number}")
    lines = logs.read("q#0")
    assert [line.text for line in lines] == [f"line {n}" for n in range(500, 1500)]
    assert {line.stream for line in lines} == {"stdout", "stderr"}
    assert all(line.process_key == "q#0" and line.timestamp > 0 for line in lines)
    assert [line.seq for line in lines] == sorted({line.seq for line in lines})


def test_a_stopped_process_lines_stay_until_its_key_starts_again() -> None:
    logs = LogStore()
    logs.reset("q#1")
    logs.append("q#1", "stderr", "panic: out of memory")
    assert [line.text for line in logs.read("q#1")] == ["panic: out of memory"]
    assert logs.keys() == ["q#1"]
    logs.reset("q#1")
    assert logs.read("q#1") == [] and logs.keys() == ["q#1"]


def test_a_consumer_too_far_behind_is_cut_off() -> None:
    logs = LogStore()
    subscription = logs.subscribe("q")
    for number in range(subscription.queue.maxsize + 5):
        logs.append("q#0", "stdout", str(number))
    assert subscription.overflowed
    assert len(drain(subscription)) == subscription.queue.maxsize


async def test_subscription_wakes_a_waiting_consumer() -> None:
    logs = LogStore()
    subscription = logs.subscribe("q")
    waiting = asyncio.create_task(subscription.queue.get())
    await asyncio.sleep(0)
    logs.append("q#0", "stdout", "hello")
    assert (await asyncio.wait_for(waiting, 5)).text == "hello"
