"""The lean ASGI handler (`localai_cluster.lean_asgi`) driven directly over ASGI, without a server: which paths
skip URL resolution, the answers Django's handler gave (405, an unexpected exception's 500, headers and
cookies), and how a request ends when its client goes away or stops reading a stream."""

from __future__ import annotations

import asyncio
import functools
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from django.http import JsonResponse

from localai_cluster import lean_asgi
from localai_cluster.lean_asgi import LeanASGIHandler
from scheduling import gateway

CHAT = "/v1/chat/completions"


class Exchange:
    """One request over ASGI: the body in one message, then (once `disconnect()` is called) `http.disconnect`;
    what the application sends is kept in `sent`. `stall_after` body messages, `send` blocks for good (a client
    that stopped reading)."""

    def __init__(self, method: str, path: str, body: bytes = b"", *, stall_after: int | None = None) -> None:
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        self._pending = [{"type": "http.request", "body": body, "more_body": False}]
        self._gone = asyncio.Event()
        self._stall_after = stall_after
        self.sent: list[dict[str, Any]] = []

    def disconnect(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop(0)
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and self._stall_after is not None:
            bodies = sum(1 for sent in self.sent if sent["type"] == "http.response.body")
            if bodies >= self._stall_after:
                await asyncio.Event().wait()
        self.sent.append(message)

    async def run(self, handler: LeanASGIHandler) -> Exchange:
        await handler(self.scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.sent[0]["headers"]

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent[1:])


@pytest.fixture
def handler() -> LeanASGIHandler:
    return LeanASGIHandler()


async def test_the_fixed_routes_are_served_without_url_resolution(handler, monkeypatch):
    async def answer(request, parse, chat, staff=False):
        return JsonResponse({"served": request.path})

    monkeypatch.setattr(gateway, "_complete", answer)

    def no_resolution(self, path):
        raise AssertionError(f"resolved {path} through the URL resolver")

    monkeypatch.setattr("django.urls.resolvers.URLResolver.resolve", no_resolution)
    chat = await Exchange("POST", CHAT, b"{}").run(handler)
    assert (chat.status, chat.body) == (200, b'{"served": "/v1/chat/completions"}')
    health = await Exchange("GET", "/healthz").run(handler)
    assert (health.status, health.body) == (200, b'{"status": "ok"}')


async def test_other_v1_paths_are_resolved_as_before(handler):
    unknown = await Exchange("GET", "/v1/nothing-here").run(handler)
    assert unknown.status == 404
    assert b'"Unknown endpoint: GET /v1/nothing-here"' in unknown.body
    trailing = await Exchange("GET", "/v1/models/").run(handler)
    assert trailing.status == 404 and b'"code": "unknown_url"' in trailing.body
    # A lean path outside the lean urlconf: Django's own 404 page, as the resolver's Resolver404 gives it.
    page = await Exchange("GET", "/healthz/").run(handler)
    assert page.status == 404
    assert page.headers == [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", str(len(page.body)).encode()),
    ]


@pytest.mark.parametrize(
    ("method", "path", "allow", "logged"),
    [
        ("GET", CHAT, b"POST", f"Method Not Allowed (GET): {CHAT}"),
        ("PUT", "/v1/completions", b"POST", "Method Not Allowed (PUT): /v1/completions"),
        ("GET", "/v1/embeddings", b"POST", "Method Not Allowed (GET): /v1/embeddings"),
        ("POST", "/v1/models", b"GET", "Method Not Allowed (POST): /v1/models"),
        ("HEAD", "/v1/models", b"GET", "Method Not Allowed (HEAD): /v1/models"),
        ("POST", "/healthz", b"GET", "Method Not Allowed (POST): /healthz"),
        ("DELETE", "/readyz", b"GET", "Method Not Allowed (DELETE): /readyz"),
        # The view's own check, logged by the handler as any answer of 400 or more.
        ("POST", "/metrics", b"GET, HEAD", "Method Not Allowed: /metrics"),
    ],
)
async def test_a_wrong_method_is_the_views_own_405(handler, caplog, monkeypatch, method, path, allow, logged):
    # `/metrics`' connection health runs before its method check, and would touch the database connection of
    # the thread it runs in when an earlier test of this worker left one there: not this test's subject.
    monkeypatch.setattr(lean_asgi, "close_old_connections", lambda: None)
    caplog.set_level(logging.WARNING, logger="django.request")
    answer = await Exchange(method, path).run(handler)
    assert answer.status == 405
    assert answer.headers == [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Allow", allow),
        (b"Content-Length", b"0"),
    ]
    assert answer.body == b""
    assert [record.getMessage() for record in caplog.records if record.name == "django.request"] == [logged]


async def test_an_unexpected_exception_is_djangos_plain_500(handler, caplog, monkeypatch):
    async def broken(request, parse, chat, staff=False):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway, "_complete", broken)
    caplog.set_level(logging.ERROR, logger="django.request")
    answer = await Exchange("POST", CHAT, b"{}").run(handler)
    assert answer.status == 500
    assert answer.headers == [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", str(len(answer.body)).encode()),
    ]
    # Django's default `server_error` page (no 500.html template): HTML, not OpenAI's error shape.
    assert (
        b"<title>Server Error (500)</title>" in answer.body and b"<h1>Server Error (500)</h1>" in answer.body
    )
    [record] = [record for record in caplog.records if record.name == "django.request"]
    assert record.getMessage() == f"Internal Server Error: {CHAT}"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_response_is_one_start_and_one_body_with_its_headers_and_cookies(handler, monkeypatch):
    async def answer(request, parse, chat, staff=False):
        response = JsonResponse({"ok": True}, status=201)
        response["X-Extra"] = "é"
        response.set_cookie("flavour", "plain")
        return response

    monkeypatch.setattr(gateway, "_complete", answer)
    answer_ = await Exchange("POST", CHAT, b"{}").run(handler)
    assert [message["type"] for message in answer_.sent] == ["http.response.start", "http.response.body"]
    assert answer_.status == 201
    assert answer_.headers == [
        (b"Content-Type", b"application/json"),
        (b"X-Extra", "é".encode("latin1")),
        # As CommonMiddleware sets it on the full stack: the server need not frame the body in chunks.
        (b"Content-Length", b"12"),
        (b"Set-Cookie", b"flavour=plain; Path=/"),
    ]
    body = answer_.sent[1]
    assert body["body"] == b'{"ok": true}' and not body.get("more_body", False)


async def test_a_disconnect_cancels_the_view(handler, monkeypatch):
    started = asyncio.Event()
    ended: list[str] = []

    async def waits(request, parse, chat, staff=False):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended.append("cancelled")  # where a claimed unit is given back
            raise
        return JsonResponse({})

    monkeypatch.setattr(gateway, "_complete", waits)
    exchange = Exchange("POST", CHAT, b"{}")
    request = asyncio.create_task(exchange.run(handler))
    await started.wait()
    exchange.disconnect()
    await request  # ends without an error
    assert ended == ["cancelled"]
    assert exchange.sent == []


def _stream(events: list[bytes], closed: list[str]) -> gateway._EventStream:
    async def produce():
        try:
            for event in events:
                yield event
            await asyncio.Event().wait()  # a token that never comes
        finally:
            closed.append("closed")  # the stream's `finally`: where the unit is released

    return gateway._EventStream(produce(), SimpleNamespace(process_key="replica-1"))  # type: ignore[arg-type]


async def test_a_disconnect_mid_stream_closes_the_stream(handler, monkeypatch):
    closed: list[str] = []

    async def streams(request, parse, chat, staff=False):
        return _stream([b"data: 1\n\n"], closed)

    monkeypatch.setattr(gateway, "_complete", streams)
    exchange = Exchange("POST", CHAT, b"{}")
    request = asyncio.create_task(exchange.run(handler))
    while not any(message.get("body") == b"data: 1\n\n" for message in exchange.sent):
        await asyncio.sleep(0)
    exchange.disconnect()
    await request
    assert closed == ["closed"]
    assert exchange.status == 200
    assert (b"Content-Type", b"text/event-stream") in exchange.headers


async def test_a_client_that_stops_reading_a_stream_ends_the_request_quietly(handler, monkeypatch, settings):
    settings.LOCALAI_STREAM_WRITE_TIMEOUT = 0.05
    closed: list[str] = []

    async def streams(request, parse, chat, staff=False):
        return _stream([b"data: 1\n\n", b"data: 2\n\n"], closed)

    monkeypatch.setattr(gateway, "_complete", streams)
    # The first piece is written, the second never is: the write-stall timeout cancels the request, which ends
    # without an error (the server then closes the connection) and with the stream closed.
    exchange = await Exchange("POST", CHAT, b"{}", stall_after=1).run(handler)
    assert closed == ["closed"]
    assert exchange.body == b"data: 1\n\n"


async def test_metrics_keeps_its_connection_health_around_the_view(handler, monkeypatch):
    from localai_cluster import metrics

    calls: list[str] = []
    monkeypatch.setattr(lean_asgi, "close_old_connections", lambda: calls.append("close_old_connections"))
    monkeypatch.setattr(metrics, "render", lambda: (b"up 1\n", "text/plain"))
    answer = await Exchange("GET", "/metrics").run(handler)
    assert (answer.status, answer.body) == (200, b"up 1\n")
    assert calls == ["close_old_connections", "close_old_connections"]


def test_only_djangos_csrf_and_method_wrappers_are_peeled():
    from django.views.decorators.csrf import csrf_exempt
    from django.views.decorators.http import require_GET, require_http_methods, require_POST

    from localai_cluster.lean_asgi import _without_django_wrappers

    async def view(request):
        return JsonResponse({})

    assert _without_django_wrappers(csrf_exempt(require_POST(view))) == (view, frozenset({"POST"}))
    both = require_http_methods(["GET", "POST"])(require_GET(view))
    assert _without_django_wrappers(both) == (view, frozenset({"GET"}))

    def logged(inner):
        @functools.wraps(inner)
        async def wrapper(request):
            return await inner(request)

        return wrapper

    custom = csrf_exempt(logged(require_POST(view)))
    peeled, methods = _without_django_wrappers(custom)
    assert peeled is custom.__wrapped__ and methods is None  # the custom wrapper and all below it are kept


def test_the_table_holds_what_resolution_gives_for_a_fixed_path():
    from django.urls import URLResolver, path, re_path
    from django.urls.resolvers import RegexPattern

    from localai_cluster.lean_asgi import _fixed_paths

    def first(request, **kwargs): ...

    def second(request): ...

    def third(request): ...

    def fourth(request, pk): ...

    patterns = [
        path("a", first),
        path("a", second),  # shadowed by the first
        re_path(r"^b/(?P<rest>.*)$", first),
        path("b/c", second),  # taken by the regex, with an argument: left to resolution
        path("d", third, {"extra": 1}),  # resolved with a keyword argument: left to resolution
        path("e/<int:pk>", fourth),
        path("f", third),
    ]
    assert _fixed_paths(URLResolver(RegexPattern(r"^/"), patterns)) == {"/a": first, "/f": third}
