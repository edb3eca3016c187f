"""A lean Django ASGI handler for the OpenAI gateway's hot path (`/v1/*`) and the probes.

Django's `ASGIHandler` spends most of a small request's time on thread hops: every `MiddlewareMixin`
middleware runs its `process_request`/`process_response` through `sync_to_async`, the `request_started` and
`request_finished` signals (whose receivers are sync) hop too, and every request gets a thread-sensitive
context with a thread of its own. The gateway needs none of that: its views are async, authenticate with API
keys (no sessions, no CSRF, no messages), and do their database work on the router's own thread pools, which
hand their connections back themselves. This handler resolves URLs and runs views exactly like Django, with no
middleware and no per-request signals or thread; everything else (pages, admin, APIs) keeps Django's full
handler.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections
from django.http import HttpResponse, HttpResponseBadRequest, JsonResponse
from django.urls import set_script_prefix

LEAN_URLCONF = "localai_cluster.lean_urls"
OPENAI_PREFIX = "/v1/"

security_logger = logging.getLogger("django.security.DisallowedHost")


def openai_error(message: str, code: str) -> dict[str, Any]:
    """OpenAI's error body (the gateway's `GatewayError.payload` shape)."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}}


def _disallowed_host_response(path: str, error: DisallowedHost) -> HttpResponse:
    """400 for a `Host` outside `ALLOWED_HOSTS`, as Django's full handler answers it (logged the same way)."""
    security_logger.error(str(error), extra={"status_code": 400})
    if path.startswith(OPENAI_PREFIX):
        return JsonResponse(
            openai_error("The Host header is not allowed (ALLOWED_HOSTS).", "disallowed_host"), status=400
        )
    return HttpResponseBadRequest("<h1>Bad Request (400)</h1>")


class LeanASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        """No middleware: the view (with Django's exception-to-response conversion) is the whole chain."""
        self._view_middleware: list[Callable[..., Any]] = []
        self._template_response_middleware: list[Callable[..., Any]] = []
        self._exception_middleware: list[Callable[..., Any]] = []
        # django-stubs leaves out BaseHandler's private `_get_response_async` (Django 5.2 has it).
        self._middleware_chain = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"the lean handler serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        """Django's `handle`, without the request signals and the thread hop to close the response."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None  # create_request returns a request or an error response
            body_file.close()
            await self.send_response(error_response, send)
            return
        request.urlconf = LEAN_URLCONF  # type: ignore[attr-defined]  # Django reads it; the stubs omit it
        try:
            # Django's full handler checks the Host in CommonMiddleware; the lean path has no middleware.
            request.get_host()
        except DisallowedHost as error:
            body_file.close()
            await self.send_response(_disallowed_host_response(request.path, error), send)
            return

        async def process_request() -> object:
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while the response was being sent
            return response

        # As Django does: a client disconnect cancels the view (a stream's `finally` then releases its
        # in-flight unit).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        # No `response.close()`: it only sends `request_finished` (whose receivers would touch connections
        # from the event loop) and closes resources; a streamed body was already closed by `send_response`,
        # and the gateway's responses hold no other resource.
        body_file.close()


def _too_large_body(path: str, limit: int) -> bytes:
    message = f"The request body is larger than {limit} bytes (LOCALAI_MAX_BODY_BYTES)."
    if path.startswith(OPENAI_PREFIX):
        payload: dict[str, Any] = openai_error(message, "request_too_large")
    else:
        payload = {"error": message, "details": {"max_bytes": limit}}
    return json.dumps(payload).encode()


def body_limit(app):
    """An ASGI app refusing HTTP request bodies over `LOCALAI_MAX_BODY_BYTES` with 413 in the route's error
    shape (OpenAI's under `/v1/`, `{"error", "details"}` elsewhere), before the application reads them: at once
    when `Content-Length` says so (before a client expecting `100 Continue` sends it), else as soon as the
    received chunks of a chunked body pass the limit. Nothing more of a refused body is buffered: the server
    (uvicorn) reads and drops what the client still sends once the response is complete."""

    async def wrapped(scope, receive, send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        limit = settings.LOCALAI_MAX_BODY_BYTES

        async def refuse() -> None:
            body = _too_large_body(scope["path"], limit)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the server refuses a malformed length before the app sees it
                if declared > limit:
                    await refuse()
                    return
                break
        received = 0
        refused = False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await refuse()
                    # The application sees a client that went away (Django: RequestAborted) and answers nothing.
                    return {"type": "http.disconnect"}
            return message

        await app(scope, bounded_receive, send)

    return wrapped


def with_connection_health(view: Callable[..., Any]) -> Callable[..., Any]:
    """For a sync view served by the lean handler that uses Django's database connection (`/metrics`): what
    Django's `request_started`/`request_finished` receivers do around each request, which this handler does
    not send. `close_old_connections` before and after, in the view's own thread, hands the connection back
    (to the pool, whose check replaces one that died) and drops one a database error broke, so a database
    blip never outlives one request."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return view(*args, **kwargs)
        finally:
            close_old_connections()

    return wrapped


def lean_paths_router(lean_app, full_app, prefixes: tuple[str, ...]):
    """An ASGI app sending HTTP requests whose path starts with one of `prefixes` to `lean_app`."""

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(prefixes):
            await lean_app(scope, receive, send)
        else:
            await full_app(scope, receive, send)

    return app


def with_lifespan(app, *, on_shutdown):
    """An ASGI app answering the lifespan protocol itself (Django does not): at shutdown it awaits
    `on_shutdown()` (closing the gateway's async connection pools), everything else goes to `app`."""

    async def wrapped(scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped
