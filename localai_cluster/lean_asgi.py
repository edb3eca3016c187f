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
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections
from django.urls import set_script_prefix

LEAN_URLCONF = "localai_cluster.lean_urls"


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
