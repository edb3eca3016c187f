"""A lean Django ASGI handler for the OpenAI gateway's hot path (`/v1/*`) and the probes.

Django's `ASGIHandler` spends most of a small request's time on thread hops: every `MiddlewareMixin`
middleware runs its `process_request`/`process_response` through `sync_to_async`, the `request_started` and
`request_finished` signals (whose receivers are sync) hop too, and every request gets a thread-sensitive
context with a thread of its own. The gateway needs none of that: its views are async, authenticate with API
keys (no sessions, no CSRF, no messages), and do their database work on the router's own thread pools, which
hand their connections back themselves. So this handler has no middleware and no per-request signals or
thread; everything else (pages, admin, APIs) keeps Django's full handler.

It also serves a request with less of Django's per-request machinery than `ASGIHandler` does, answering the
same bytes, but for `Content-Length` on a non-streaming answer (below):

- Direct dispatch: every path a fixed route of the lean urlconf matches (`/v1/chat/completions`,
  `/v1/completions`, `/v1/embeddings`, `/v1/models`, `/healthz`, `/readyz`, `/metrics`) is one dictionary
  lookup, built once from the urlconf itself, with no `URLResolver` walk; any other path (`/v1/<anything>`)
  is resolved as Django does. Such a view is called without its `csrf_exempt` and `require_http_methods`
  wrappers (there is no CSRF middleware here, and the handler checks the method the wrapper allows itself); a
  method it refuses goes to the wrapped view, whose decorator answers its 405 as before.
- The view is awaited directly (no `get_response_async` chain), an exception it raises answered by Django's
  own `response_for_exception` (for an unexpected one, Django's plain HTML 500 page, logged as Django logs it).
- A non-streaming answer is sent as one `http.response.start` and one `http.response.body` message built from
  the response (its headers and cookies, as Django's `send_response` builds them), with `Content-Length` as
  Django's `CommonMiddleware` sets it on the full stack; a streaming one goes through Django's
  `send_response`, which closes its iterator however the request ends.
- The view runs in the request's own task, not in a task of its own: one listener task per request waits for
  `http.disconnect` and cancels the request (the view, or the stream being sent), as Django's pair of tasks
  did, so a claimed in-flight unit is given back when the client goes away.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response, response_for_exception
from django.db import close_old_connections
from django.http import HttpResponse, HttpResponseBadRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import URLResolver, get_resolver, set_script_prefix, set_urlconf
from django.urls.resolvers import RoutePattern
from django.utils.log import log_response
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

LEAN_URLCONF = "localai_cluster.lean_urls"
OPENAI_PREFIX = "/v1/"

security_logger = logging.getLogger("django.security.DisallowedHost")

View = Callable[..., Awaitable[HttpResponseBase]]


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


def _wrapper_codes(decorator: Callable[[Callable[..., Any]], Callable[..., Any]]) -> frozenset[Any]:
    """The code objects of the functions `decorator` wraps a view in (one for async views, one for sync)."""

    async def async_view(request: Any) -> None: ...

    def sync_view(request: Any) -> None: ...

    return frozenset(decorator(view).__code__ for view in (async_view, sync_view))


_CSRF_EXEMPT_WRAPPERS = _wrapper_codes(csrf_exempt)
_METHOD_WRAPPERS = _wrapper_codes(require_http_methods(["GET"]))


def _without_django_wrappers(view: Callable[..., Any]) -> tuple[Callable[..., Any], frozenset[str] | None]:
    """`view` without its outer `csrf_exempt` and `require_http_methods` wrappers, and the methods those
    allow (None: any). Peeling stops at any other wrapper, which is then called with all it wraps."""
    methods: frozenset[str] | None = None
    while (inner := getattr(view, "__wrapped__", None)) is not None:
        code = getattr(view, "__code__", None)
        if code in _METHOD_WRAPPERS:
            allowed = inspect.getclosurevars(view).nonlocals.get("request_method_list")
            if allowed is None:
                break
            methods = frozenset(allowed) if methods is None else methods & frozenset(allowed)
        elif code not in _CSRF_EXEMPT_WRAPPERS:
            break
        view = inner
    return view, methods


def _awaitable(view: Callable[..., Any]) -> View:
    """An async view as it is; a sync one through `sync_to_async`, on the thread Django's handler uses."""
    return view if iscoroutinefunction(view) else sync_to_async(view, thread_sensitive=True)


def _fixed_paths(resolver: URLResolver) -> dict[str, Callable[..., Any]]:
    """Every path that a route without converters matches exactly, with the view resolving it gives: a path an
    earlier pattern takes gets that pattern's view, and one resolved with arguments is left out."""
    paths: list[str] = []

    def walk(patterns: list[Any], prefix: str) -> None:
        for entry in patterns:
            pattern = entry.pattern
            if not isinstance(pattern, RoutePattern) or pattern.converters:
                continue
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, prefix + str(pattern))
            else:
                paths.append("/" + prefix + str(pattern))

    walk(resolver.url_patterns, "")
    views = {}
    for path in paths:
        match = resolver.resolve(path)
        if not match.args and not match.kwargs:
            views[path] = match.func
    return views


@dataclass(frozen=True, slots=True)
class _Route:
    """A fixed path's view: `direct` (without Django's CSRF and method wrappers) for a method in `methods`
    (None: any method, the view checks it), else `view` as the urlconf has it, whose decorator answers 405."""

    view: View
    direct: View
    methods: frozenset[str] | None


class LeanASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._routes = self._direct_routes()

    def load_middleware(self, is_async: bool = False) -> None:
        """No middleware: the view (with Django's exception-to-response conversion) is the whole chain."""
        self._view_middleware: list[Callable[..., Any]] = []
        self._template_response_middleware: list[Callable[..., Any]] = []
        self._exception_middleware: list[Callable[..., Any]] = []
        # `handle` does not use it; kept so that BaseHandler's `get_response_async` still works.
        # django-stubs leaves out BaseHandler's private `_get_response_async` (Django 5.2 has it).
        self._middleware_chain = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]

    def _direct_routes(self) -> dict[str, _Route]:
        """The lean urlconf's fixed paths. A view Django would wrap in a transaction (`ATOMIC_REQUESTS`) is
        left to resolution, which does that as Django does."""
        routes = {}
        for path, view in _fixed_paths(get_resolver(LEAN_URLCONF)).items():
            try:
                if self.make_view_atomic(view) is not view:
                    continue
            except RuntimeError:  # ATOMIC_REQUESTS with an async view: Django answers 500 per request
                continue
            direct, methods = _without_django_wrappers(view)
            routes[path] = _Route(_awaitable(view), _awaitable(direct), methods)
        return routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"the lean handler serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        """Django's `handle`, without the request signals and the thread hop to close the response, and with
        the view run in this task (a listener task cancels it when the client goes away)."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None  # create_request returns a request or an error response
            body_file.close()
            await self._send(error_response, send)
            return
        request.urlconf = LEAN_URLCONF  # type: ignore[attr-defined]  # Django reads it; the stubs omit it
        try:
            # Django's full handler checks the Host in CommonMiddleware; the lean path has no middleware.
            request.get_host()
        except DisallowedHost as error:
            body_file.close()
            await self._send(_disallowed_host_response(request.path, error), send)
            return

        request_task = asyncio.current_task()
        assert request_task is not None  # an ASGI application runs in a task
        aborted = sending = False

        async def cancel_on_disconnect() -> None:
            nonlocal aborted
            try:
                await self.listen_for_disconnect(receive)
            except RequestAborted:
                aborted = True
                request_task.cancel()

        # As Django does: a client disconnect cancels the view (a stream's `finally` then releases its
        # in-flight unit), here the request's own task rather than a second one.
        listener = asyncio.create_task(cancel_on_disconnect())
        try:
            response = await self._response(request)
            sending = True
            await self._send(response, send)
        except asyncio.CancelledError:
            # The client went away, or (while the response was being sent) stopped reading a stream
            # (`_EventStream`'s write timeout): the request ends here, as in Django's handler. Any other
            # cancellation of the view goes on up.
            if not (aborted or sending):
                raise
            request_task.uncancel()
        finally:
            listener.cancel()
            # No `response.close()`: it only sends `request_finished` (whose receivers would touch
            # connections from the event loop) and closes resources; a streamed body was already closed by
            # `send_response`, and the gateway's responses hold no other resource.
            body_file.close()
        if listener.done() and not listener.cancelled():
            listener.result()  # an ASGI message other than `http.disconnect` after the body: Django's error

    async def _response(self, request) -> HttpResponseBase:
        """The view's answer, or the one Django gives for the exception it raised; an answer of 400 or more
        is logged as Django's handler logs it."""
        try:
            route = self._routes.get(request.path_info)
            if route is None:
                callback, args, kwargs = self.resolve_request(request)
                view = _awaitable(self.make_view_atomic(callback))
                response = await view(request, *args, **kwargs)
            elif route.methods is None or request.method in route.methods:
                callback = route.direct
                response = await callback(request)
            else:
                callback = route.view
                response = await callback(request)
            self.check_response(response, callback)  # a view that answered None: Django's ValueError
            if hasattr(response, "render") and callable(response.render):  # a TemplateResponse
                render = response.render
                response = await (render() if iscoroutinefunction(render) else sync_to_async(render)())
        except Exception as exc:
            set_urlconf(LEAN_URLCONF)  # the error pages (404, 500) come from the lean urlconf, as before
            response = await sync_to_async(response_for_exception, thread_sensitive=False)(request, exc)
        if response.status_code >= 400:
            await sync_to_async(log_response, thread_sensitive=False)(
                "%s: %s",
                response.reason_phrase,
                request.path,
                response=response,  # type: ignore[arg-type]  # any response; the stubs say HttpResponse
                request=request,
            )
        return response

    async def _send(self, response: HttpResponseBase, send) -> None:
        """`response` over ASGI: a streaming one through Django's `send_response`; any other as one start
        and one body message, with the headers and cookies Django's `send_response` sends."""
        if response.streaming:
            await self.send_response(response, send)
            return
        content = response.content  # type: ignore[attr-defined]
        if not response.has_header("Content-Length"):
            # As Django's CommonMiddleware sets it on the full stack: without it the server frames the body in
            # chunks, and writes the last (empty) chunk on its own.
            response["Content-Length"] = str(len(content))
        headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
        for cookie in response.cookies.values():
            headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": content})


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
