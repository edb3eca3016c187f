"""End to end through the gateway with the official `openai` client: real control plane, agents, echo backends."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.gateway_support import in_flight, start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def client(cp_server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cp_server.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_chat_stream_and_embeddings_with_the_openai_client(cp_server, start_agents):
    start_agents(1)
    ModelConfigFactory(name="echo-a")
    api = client(cp_server)

    answer = api.chat.completions.create(
        model="echo-a", messages=[{"role": "user", "content": "hello there world"}], max_tokens=64
    )
    assert answer.choices[0].message.content == "echo: hello there world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 4
    assert answer.usage.prompt_tokens == 3

    pieces = api.chat.completions.create(
        model="echo-a", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    chunks = list(pieces)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"

    vectors = api.embeddings.create(model="echo-a", input=["alpha", "beta"])
    assert len(vectors.data) == 2
    assert len(vectors.data[0].embedding) == 16
    assert vectors.data[0].embedding != vectors.data[1].embedding

    completion = api.completions.create(model="echo-a", prompt="say this", max_tokens=2)
    assert completion.choices[0].text == "echo: say"
    assert completion.choices[0].finish_reason == "length"

    models = api.models.list()
    assert [model.id for model in models.data] == ["echo-a"]
    wait_in_flight_zero("echo-a")
    assert in_flight("echo-a") == [0]


def test_raw_sse_ends_with_done(cp_server, start_agents):
    start_agents(1)
    ModelConfigFactory(name="echo-s")
    body = {"model": "echo-s", "prompt": "a b", "stream": True}
    with httpx.stream("POST", f"{cp_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = [block for block in raw.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert '"object":"text_completion"' in events[0]
