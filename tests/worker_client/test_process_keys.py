"""Key resolution for stop, logs and is-running (SCENARIOS 159-160)."""

from __future__ import annotations

import pytest

from worker_client.agent.keys import model_of, process_key, resolve

KEYS = ["q#0", "q#1", "other#0", "q3#0"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [("q", ["q#0", "q#1"]), ("q#0", ["q#0"]), ("q#9", []), ("not-loaded", []), ("q3", ["q3#0"])],
)
def test_resolution_never_confuses_models_sharing_a_prefix(selector: str, expected: list[str]) -> None:
    assert resolve(selector, KEYS) == expected


def test_nothing_resolves_without_processes() -> None:
    assert resolve("q", []) == []


def test_key_is_model_and_index() -> None:
    assert process_key("org/model:7b", 3) == "org/model:7b#3"
    assert model_of("org/model:7b#3") == "org/model:7b"
