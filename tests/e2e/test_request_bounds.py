"""Bounded input over real sockets (issue 11, items 3 and 5): body size (413), deep JSON, lone surrogates and NUL
(400), wrong Host (400) and non-JSON POSTs (415) on the lean `/v1` path and on DRF's `/api/*`, each in the
route's own error shape and never a 5xx."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from nodes.apikeys import api_key_create
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

JSON = {"Content-Type": "application/json"}
CHAT = "/v1/chat/completions"


def chat_body(model: str = "m", content: str = "hi") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"], error
    if code:
        assert error["code"] == code, error
    return error


def assert_api_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "details"} and body["error"], body
    return body


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Sends `head` (request line and headers, CRLF-separated, without the blank line) and `body` on a fresh
    socket; returns the status and the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode("latin1") + b"\r\n\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        header, _, rest = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    return int(header.split(b" ", 2)[1]), rest[:length]


# --- body size -----------------------------------------------------------------------------------------------


def test_default_limit_is_10_mib_on_v1(cp_server):
    limit = 10 * 1024 * 1024
    padding = limit - len(json.dumps(chat_body(content="")))
    big = json.dumps(chat_body(content="x" * (padding + 1))).encode()
    assert len(big) == limit + 1
    response = httpx.post(f"{cp_server.url}{CHAT}", content=big, headers=JSON, timeout=60)
    assert_openai_error(response, 413, "request_too_large")
    # One byte less is read and parsed: the gateway is open and no such model exists.
    fits = json.dumps(chat_body(model="nope", content="x" * padding)).encode()[: limit - 10]
    response = httpx.post(f"{cp_server.url}{CHAT}", content=fits, headers=JSON, timeout=60)
    assert response.status_code == 400  # truncated, so not JSON: but read, not refused


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_bodies_are_413_in_each_routes_shape(cp_server, settings, chunked):
    settings.LOCALAI_MAX_BODY_BYTES = 64 * 1024
    _, raw = api_key_create(name="admin", is_admin=True)
    body = json.dumps({"name": "m", "model": "x" * 100_000}).encode()

    def content():
        if not chunked:
            return body
        return (body[i : i + 8192] for i in range(0, len(body), 8192))  # no Content-Length: chunked

    auth = {**JSON, "Authorization": f"Bearer {raw}"}
    v1 = httpx.post(f"{cp_server.url}{CHAT}", content=content(), headers=auth, timeout=30)
    assert_openai_error(v1, 413, "request_too_large")
    api = httpx.post(f"{cp_server.url}/api/models", content=content(), headers=auth, timeout=30)
    assert assert_api_error(api, 413)["details"] == {"max_bytes": 64 * 1024}
    worker = httpx.post(f"{cp_server.url}/api/node/register", content=content(), headers=JSON, timeout=30)
    assert_api_error(worker, 413)
    # The server keeps serving, and the same body under the limit gets an ordinary answer (sent with a length:
    # DRF reads a chunked body as empty).
    settings.LOCALAI_MAX_BODY_BYTES = 1024 * 1024
    api = httpx.post(f"{cp_server.url}/api/models", content=body, headers=auth, timeout=30)
    assert api.status_code == 400 and "model" in api.json()["details"]


def test_a_huge_declared_length_is_refused_before_the_body_is_sent(cp_server):
    # Content-Length of 100 GB and no body at all: the answer cannot have waited for the body.
    for path, shape in ((CHAT, "openai"), ("/api/models", "api")):
        status, body = raw_request(
            cp_server.port,
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000000",
        )
        assert status == 413
        payload = json.loads(body)
        if shape == "openai":
            assert payload["error"]["code"] == "request_too_large"
        else:
            assert set(payload) == {"error", "details"}


# --- JSON depth, surrogates, NUL -------------------------------------------------------------------------


DEEP = "[" * 1000 + "]" * 1000


def test_deep_json_is_400_on_v1_after_authentication(cp_server):
    body = '{"model": "m", "messages": ' + DEEP + "}"
    assert_openai_error(httpx.post(f"{cp_server.url}{CHAT}", content=body, headers=JSON), 400, "invalid_json")
    nested = '{"model": "m", "messages": [{"role": "user", "content": ' + "[" * 100 + "]" * 100 + "}]}"
    assert_openai_error(httpx.post(f"{cp_server.url}{CHAT}", content=nested, headers=JSON), 400)
    _, raw = api_key_create(name="client")
    # Without a key the client learns nothing more than 401 (it used to be a 500 before authentication).
    assert_openai_error(httpx.post(f"{cp_server.url}{CHAT}", content=body, headers=JSON), 401)
    auth = {**JSON, "Authorization": f"Bearer {raw}"}
    assert_openai_error(httpx.post(f"{cp_server.url}{CHAT}", content=body, headers=auth), 400, "invalid_json")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, '{"model": "m\\ud800", "messages": [{"role": "user", "content": "x"}]}'),
        (CHAT, '{"model": "m", "messages": [{"role": "user", "content": "x\\udfff"}]}'),
        (
            CHAT,
            '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        ),
        ("/v1/completions", '{"model": "m", "prompt": "\\ud800"}'),
        ("/v1/embeddings", '{"model": "m", "input": ["ok", "\\ud800"]}'),
        (CHAT, '{"model": "m\\u0000", "messages": [{"role": "user", "content": "x"}]}'),
        (CHAT, '{"model": "m", "messages": [{"role": "user", "content": "x"}], "\\ud800": 1}'),
        ("/v1/embeddings", '{"model": "m", "input": "a\\u0000b"}'),
    ],
)
def test_surrogates_and_nul_are_400_on_v1(cp_server, path, body):
    ModelConfigFactory(name="m")  # a catalog model: the string reaches the claim and the backend today
    response = httpx.post(f"{cp_server.url}{path}", content=body, headers=JSON, timeout=30)
    assert_openai_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/models", '{"name": "m\\ud800", "backend": "llama-cpp"}'),
        ("/api/models", '{"name": "m", "options": {"k": "\\ud800"}}'),
        ("/api/models", '{"name": "m\\u0000"}'),
        ("/api/models", '{"name": "m", "options": {"\\u0000": 1}}'),
        ("/api/models", '{"name": "m", "options": ' + DEEP + "}"),
        ("/api/models", DEEP),
        ("/api/nodes/scheduling", '{"model_name": "m", "node_selector": {"gpu": "\\ud800"}}'),
        ("/api/nodes/scheduling", '{"model_name": "m\\u0000"}'),
    ],
    ids=[
        "name-surrogate",
        "option-surrogate",
        "name-nul",
        "key-nul",
        "deep-field",
        "deep",
        "selector",
        "rule-nul",
    ],
)
def test_surrogates_nul_and_deep_json_are_400_on_api(cp_server, path, body):
    _, raw = api_key_create(name="admin", is_admin=True)
    headers = {**JSON, "Authorization": f"Bearer {raw}"}
    assert_api_error(httpx.post(f"{cp_server.url}{path}", content=body, headers=headers, timeout=30), 400)


def test_worker_registration_refuses_deep_json_and_surrogates(cp_server):
    for body in (
        '{"name": "w", "address": "127.0.0.1:1", "labels": ' + DEEP + "}",
        '{"name": "w\\ud800", "address": "127.0.0.1:1"}',
        '{"name": "w", "address": "127.0.0.1:1\\u0000"}',
    ):
        response = httpx.post(f"{cp_server.url}/api/node/register", content=body, headers=JSON, timeout=30)
        assert_api_error(response, 400)


# --- Host and Content-Type on the lean path -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/readyz", "/healthz", "/api/nodes"])
def test_a_wrong_host_is_400_on_every_path(cp_server, path):
    response = httpx.get(f"{cp_server.url}{path}", headers={"Host": "evil.example"}, timeout=30)
    assert response.status_code == 400, response.text
    if path.startswith("/v1/"):
        assert_openai_error(response, 400, "disallowed_host")
    # An allowed name (the quick start's defaults: localhost, 127.0.0.1, [::1]) with any port is served.
    port = cp_server.port
    assert httpx.get(f"{cp_server.url}{path}", headers={"Host": f"localhost:{port}"}).status_code != 400


def test_a_wrong_host_is_400_on_a_v1_post(cp_server):
    response = httpx.post(
        f"{cp_server.url}{CHAT}", json=chat_body(), headers={"Host": "attacker.test"}, timeout=30
    )
    assert_openai_error(response, 400, "disallowed_host")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "text/plain;charset=UTF-8",
        None,
    ],
)
def test_v1_posts_need_a_json_content_type(cp_server, content_type):
    # What a cross-site <form> or fetch(…, {mode: "no-cors"}) can send without a preflight.
    ModelConfigFactory(name="m")
    headers = {"Origin": "https://evil.example", "Content-Type": content_type} if content_type else {}
    body = json.dumps(chat_body())
    for path in (CHAT, "/v1/completions", "/v1/embeddings"):
        response = httpx.post(f"{cp_server.url}{path}", content=body, headers=headers, timeout=30)
        assert_openai_error(response, 415, "unsupported_media_type")


def test_json_with_a_charset_and_the_openai_client_are_accepted(cp_server):
    body = json.dumps(chat_body(model="nope")).encode()
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        response = httpx.post(f"{cp_server.url}{CHAT}", content=body, headers={"Content-Type": content_type})
        assert_openai_error(response, 404, "model_not_found")  # parsed and routed
    client = openai.OpenAI(base_url=f"{cp_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
