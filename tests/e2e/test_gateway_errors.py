"""The gateway's errors in OpenAI's shape: 400 bad bodies, 404 unknown model, 401 once an API key exists."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def post(cp_server, path: str, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{cp_server.url}{path}", content=content, headers=headers, timeout=30)


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and error["code"]
    return error


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", "{not json"),
        ("/v1/chat/completions", "[1, 2]"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}]}'),
        ("/v1/chat/completions", '{"model": "m"}'),
        ("/v1/chat/completions", '{"model": "m", "messages": []}'),
        ("/v1/chat/completions", '{"model": "m", "messages": "hi"}'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"content": "x"}]}'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": 5}]}'),
        ("/v1/chat/completions", '{"model": 7, "messages": [{"role": "user", "content": "x"}]}'),
        (
            "/v1/chat/completions",
            '{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
        ),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 3}'),
        (
            "/v1/chat/completions",
            '{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        ),
        (
            "/v1/chat/completions",
            '{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1}',
        ),
        ("/v1/completions", '{"model": "m"}'),
        ("/v1/completions", '{"model": "m", "prompt": 12}'),
        ("/v1/embeddings", '{"model": "m"}'),
        ("/v1/embeddings", '{"model": "m", "input": [1, 2]}'),
        ("/v1/embeddings", b"\xff\xfe"),
    ],
)
def test_malformed_bodies_answer_400(cp_server, path, body):
    assert_error(post(cp_server, path, body), 400)


def test_unknown_model_answers_404(cp_server):
    body = '{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'
    error = assert_error(post(cp_server, "/v1/chat/completions", body), 404)
    assert error["code"] == "model_not_found"
    api = openai.OpenAI(base_url=f"{cp_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="nope", input="x")


def test_unknown_path_and_wrong_method(cp_server):
    assert_error(httpx.get(f"{cp_server.url}/v1/nothing-here", timeout=30), 404)
    assert httpx.get(f"{cp_server.url}/v1/chat/completions", timeout=30).status_code == 405


def test_open_while_no_key_then_401_without_a_valid_key(cp_server):
    from nodes.apikeys import api_key_create

    ModelConfigFactory(name="listed")
    assert httpx.get(f"{cp_server.url}/v1/models", timeout=30).json()["data"][0]["id"] == "listed"
    _, raw = api_key_create(name="client")
    assert_error(httpx.get(f"{cp_server.url}/v1/models", timeout=30), 401)
    bad = {"Authorization": "Bearer lac_wrong"}
    assert_error(httpx.get(f"{cp_server.url}/v1/models", headers=bad, timeout=30), 401)
    # A bad body from an unauthenticated client is still 401.
    assert_error(post(cp_server, "/v1/chat/completions", "{broken"), 401)
    good = {"Authorization": f"Bearer {raw}"}
    listed = httpx.get(f"{cp_server.url}/v1/models", headers=good, timeout=30)
    assert listed.status_code == 200
    assert listed.json()["object"] == "list"
    assert_error(post(cp_server, "/v1/chat/completions", "{broken", good), 400)
