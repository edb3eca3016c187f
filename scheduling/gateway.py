"""The OpenAI-compatible gateway (`/v1/*`, CONTRACT §3.4): async views that map OpenAI requests to LocalAI's
`PredictOptions`, route them through the router and answer OpenAI JSON or Server-Sent Events.

The hot path runs on the event loop: one statement checks the API key and one claims a replica (psycopg async
connections, no thread hop), then the gRPC call, and the release after the answer. Every claimed in-flight unit is released exactly once: after the answer, on a backend error,
and when a streaming client disconnects (the stream's `finally`, with a finalizer as a last resort).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from console.usage import usage_record
from localai_cluster import metrics
from localai_cluster.bounds import UnsafeJSON, loads_checked
from scheduling import optimistic, router, routing
from scheduling.models import ModelConfig
from scheduling.placement import LoadFailed, NoCapacity, UnknownModel
from worker_client.client import BackendClient, Reply
from worker_client.errors import WorkerError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
MAX_MODEL_NAME = 255
OWNED_BY = "localai-cluster"
# `Embedding` calls one embeddings request keeps in flight on its replica at once.
EMBEDDING_CONCURRENCY = 16


# --- errors --------------------------------------------------------------------------------------------------


class GatewayError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.retry_after = retry_after

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}

    def response(self) -> JsonResponse:
        response = JsonResponse(self.payload(), status=self.status)
        if self.retry_after is not None:
            response["Retry-After"] = str(self.retry_after)
        return response


def bad_request(message: str, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", code=code)


def _unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        type="invalid_request_error",
        code="invalid_api_key",
    )


def _placement_error(error: Exception, model: str) -> GatewayError:
    if isinstance(error, UnknownModel):
        return GatewayError(
            404, f"The model '{model}' does not exist.", type="invalid_request_error", code="model_not_found"
        )
    reason = getattr(error, "reason", str(error))
    code = "load_failed" if isinstance(error, LoadFailed) else "no_capacity"
    retry_after = getattr(error, "retry_after", None) or RETRY_AFTER_SECONDS  # a failed load's cooldown
    return GatewayError(503, reason, type="server_error", code=code, retry_after=retry_after)


def _database_unavailable(error: Exception) -> GatewayError:
    """The control plane's database is down or out of connections (psycopg's pool gives up after
    `LOCALAI_DB_POOL_TIMEOUT`): a 503 the client may retry, never a 500 or a hang."""
    logger.warning("gateway: the database is unavailable: %s", error)
    return GatewayError(
        503,
        "The control plane's database is unavailable; retry shortly.",
        type="server_error",
        code="control_plane_unavailable",
        retry_after=RETRY_AFTER_SECONDS,
    )


def _backend_error(error: WorkerError) -> GatewayError:
    return GatewayError(
        502, f"The model backend failed: {error.details or error}", type="server_error", code="backend_error"
    )


# --- authentication ------------------------------------------------------------------------------------------


def _bearer(request: HttpRequest) -> str | None:
    # `request.headers` would build a mapping of every header first: `META` is what it reads.
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


# --- request parsing -----------------------------------------------------------------------------------------


def _json_body(request: HttpRequest) -> dict[str, Any]:
    """The one reader of a `/v1` POST body: `Content-Type: application/json` (415 otherwise, so a cross-site
    form or `text/plain` POST from a browser cannot drive inference), at most `LOCALAI_MAX_BODY_BYTES` (413;
    `body_limit` refuses larger bodies before they are read), JSON nested at most 64 deep with no NUL or lone
    surrogate in any string (400, `localai_cluster.bounds`)."""
    if request.content_type != "application/json":
        raise GatewayError(
            415,
            "The request body must be JSON, sent with 'Content-Type: application/json'.",
            type="invalid_request_error",
            code="unsupported_media_type",
        )
    limit = settings.LOCALAI_MAX_BODY_BYTES
    try:
        raw = request.body
    except RequestDataTooBig:
        raw = None
    if raw is None or len(raw) > limit:
        raise GatewayError(
            413,
            f"The request body is larger than {limit} bytes (LOCALAI_MAX_BODY_BYTES).",
            type="invalid_request_error",
            code="request_too_large",
        )
    try:
        body = loads_checked(raw or b"")
    except UnsafeJSON as error:
        raise bad_request(str(error), "invalid_json") from None
    except ValueError:  # also UnicodeDecodeError
        raise bad_request("The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string.", "missing_model")
    if len(model) > MAX_MODEL_NAME:
        raise bad_request(f"'model' must be at most {MAX_MODEL_NAME} characters.")
    return model


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """`PredictOptions` fields of the sampling parameters OpenAI and LocalAI share."""
    fields: dict[str, Any] = {}
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 0 <= max_tokens < 2**31:
            raise bad_request("'max_tokens' must be a non-negative integer.")
        fields["Tokens"] = max_tokens
    for name, field_name, low, high in (("temperature", "Temperature", 0, 2), ("top_p", "TopP", 0, 1)):
        value = body.get(name)
        if value is not None:
            if not _is_number(value) or not low <= value <= high:
                raise bad_request(f"'{name}' must be a number between {low} and {high}.")
            fields[field_name] = float(value)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops) or len(stops) > 16:
            raise bad_request("'stop' must be a string or a list of at most 16 strings.")
        fields["StopPrompts"] = stops
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**31) <= seed < 2**31:
            raise bad_request("'seed' must be a 32-bit integer.")
        fields["Seed"] = seed
    return fields


def _stream_flag(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.")
    return bool(stream), bool(options.get("include_usage"))


def _message_content(content: Any, position: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(f"messages[{position}].content: only text parts are supported.")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{position}].content must be a string or a list of text parts.")


@dataclass
class Completion:
    """A parsed chat or text completion request."""

    model: str
    fields: dict[str, Any]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(body: dict[str, Any]) -> Completion:
    """`POST /v1/chat/completions` body → `PredictOptions` (Messages, UseTokenizerTemplate, sampling)."""
    model = _model_name(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list.", "missing_messages")
    mapped = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise bad_request(f"messages[{position}] must be an object with a string 'role'.")
        mapped.append(
            {"role": message["role"], "content": _message_content(message.get("content"), position)}
        )
    stream, include_usage = _stream_flag(body)
    fields = {"Messages": mapped, "UseTokenizerTemplate": True, **_sampling(body)}
    completion = Completion(model, fields, stream, include_usage, fields.get("Tokens"))
    completion.fields["CorrelationId"] = completion.id
    return completion


def parse_completion(body: dict[str, Any]) -> Completion:
    """`POST /v1/completions` body → `PredictOptions` (Prompt, sampling)."""
    model = _model_name(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request(
            "'prompt' is required and must be a string (or a list of one string).", "missing_prompt"
        )
    stream, include_usage = _stream_flag(body)
    fields = {"Prompt": prompt, **_sampling(body)}
    completion = Completion(model, fields, stream, include_usage, fields.get("Tokens"))
    completion.fields["CorrelationId"] = completion.id
    return completion


def parse_embeddings(body: dict[str, Any]) -> tuple[str, list[str], str]:
    """`POST /v1/embeddings` body → (model, texts, encoding format)."""
    model = _model_name(body)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise bad_request(
            "'input' is required and must be a string or a non-empty list of strings.", "missing_input"
        )
    if len(texts) > 2048:
        raise bad_request("'input' may hold at most 2048 strings.")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.")
    return model, texts, encoding


# --- calling a replica ---------------------------------------------------------------------------------------


async def _with_replica(
    model: str,
    raw_key: str | None,
    call: Callable[[router.Lease], Awaitable[Any]],
    *,
    fields: dict[str, Any] | None = None,
    session: str = "",
    early: bool = False,
    discard: optimistic.Discard[Any] | None = None,
) -> tuple[router.Lease, Any]:
    """`_claim_and_call`, with a database fault answered as a 503 (`control_plane_unavailable`)."""
    try:
        return await _claim_and_call(
            model, raw_key, call, fields=fields, session=session, early=early, discard=discard
        )
    except (DatabaseError, psycopg.Error) as error:
        raise _database_unavailable(error) from error


def _session(request: HttpRequest, body: dict[str, Any]) -> str:
    """The `session` policy's key: `X-Session-Id`, else the body's `user` (400 when it is not a short string)."""
    try:
        return routing.session_key(request.META.get("HTTP_X_SESSION_ID"), body)
    except routing.BadSessionKey as error:
        raise bad_request(str(error), "invalid_session") from None


def _record_prefix(model: str, lease: router.Lease, preference: routing.Preference, fields: Any) -> None:
    """A `prefix_cache` model's claim: notes in the index, in the background, that the replica now holds the
    prompt's prefix (the hashes are computed here when this process did not know the policy before)."""
    if lease.policy != routing.PREFIX_CACHE or fields is None:
        return
    hashes = preference.hashes
    if hashes is None:
        hashes = routing.block_hashes(routing.rendered_prompt(fields))
    if hashes:
        router.run_in_background(routing.record(model, lease.replica_id, hashes))


async def _claim_and_call(
    model: str,
    raw_key: str | None,
    call: Callable[[router.Lease], Awaitable[Any]],
    *,
    fields: dict[str, Any] | None = None,
    session: str = "",
    early: bool = False,
    discard: optimistic.Discard[Any] | None = None,
) -> tuple[router.Lease, Any]:
    """Claims a replica and runs `call` on it (a whole non-streaming call, or a stream up to its first piece:
    nothing has reached the client yet). A call that fails with `UNAVAILABLE` — the connection was refused,
    reset or closed, e.g. a backend killed a moment ago — is retried once, elsewhere or on a fresh load: a
    refused replica is removed and its process stopped at once; another is probed first (the gRPC health
    check) and removed only when it does not answer. Never a third try.
    With `early`, the first attempt's call may start beside its claim, on the replica the claim is predicted
    to pick (`scheduling.optimistic`); its answer counts only when the claim picked that replica, and one
    thrown away is given to `discard` (a stream opened early: closed).
    On success the caller owns the lease (and releases it); on failure, or when the caller is cancelled at
    any point, it is already released."""
    exclude: list[int] = []
    if fields is not None:
        preference = await routing.preference_for(model, fields, session)
    else:
        preference = routing.Preference.none(session)
    with optimistic.in_progress(model):
        for attempt in (0, 1):
            started = (
                optimistic.start(model, raw_key, preference, call, discard)
                if early and attempt == 0
                else None
            )
            try:
                lease = await router.acquire(
                    model,
                    exclude=exclude,
                    raw_key=raw_key if attempt == 0 else router.NO_AUTH,
                    preference=preference,
                )
            except BaseException as error:
                if started is not None:
                    started.drop()
                if isinstance(error, router.Unauthorized):
                    raise _unauthorized() from None
                if isinstance(error, UnknownModel | NoCapacity | LoadFailed):
                    raise _placement_error(error, model) from error
                raise
            if attempt == 0:
                optimistic.claimed(model, raw_key, preference, lease)
            _record_prefix(model, lease, preference, fields)
            # From here until the lease is handed to the caller, every exit gives the unit back.
            try:
                try:
                    answer = call(lease) if started is None else started.answer(lease, call)
                    return lease, await answer
                except WorkerError as error:
                    failure = error
                if attempt == 0 and failure.unavailable:
                    logger.warning(
                        "backend %s of %s on %s is unavailable (%s): retrying once",
                        lease.address,
                        lease.process_key,
                        lease.node_name,
                        failure.details,
                    )
                    if failure.connect_failed:
                        await router.discard_unreachable(lease)
                        exclude.append(lease.replica_id)
                    elif not await router.probe_replica(lease):
                        exclude.append(lease.replica_id)
                    await lease.release()
                    continue
            except BaseException:
                await lease.release()
                raise
            await lease.release()
            raise _backend_error(failure) from failure
    raise AssertionError("unreachable")  # pragma: no cover


def _backend(lease: router.Lease) -> BackendClient:
    return BackendClient(lease.address, lease.backend_token)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish_reason(completion: Completion, tokens: int) -> str:
    return "length" if completion.max_tokens and tokens >= completion.max_tokens else "stop"


def _chat_body(completion: Completion, reply: Reply) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{completion.id}",
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.message},
                "finish_reason": _finish_reason(completion, reply.tokens),
            }
        ],
        "usage": _usage(reply.prompt_tokens, reply.tokens),
    }


def _text_body(completion: Completion, reply: Reply) -> dict[str, Any]:
    return {
        "id": f"cmpl-{completion.id}",
        "object": "text_completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "text": reply.message,
                "index": 0,
                "logprobs": None,
                "finish_reason": _finish_reason(completion, reply.tokens),
            }
        ],
        "usage": _usage(reply.prompt_tokens, reply.tokens),
    }


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _Chunks:
    """OpenAI's streaming chunk shapes for one completion."""

    def __init__(self, completion: Completion, chat: bool) -> None:
        self.completion = completion
        self.chat = chat
        self.first = True

    def _base(self) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {
            "id": f"{prefix}-{self.completion.id}",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.completion.created,
            "model": self.completion.model,
        }

    def piece(self, text: str, finish_reason: str | None = None) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
            if self.first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        self.first = False
        return _event({**self._base(), "choices": [choice]})

    def usage(self, prompt_tokens: int, tokens: int) -> bytes:
        return _event({**self._base(), "choices": [], "usage": _usage(prompt_tokens, tokens)})


def _release_if_leaked(lease: router.Lease) -> None:
    """Last resort when a stream's generator was dropped without running (client gone before the first
    body chunk): give the in-flight unit back from a pool thread."""
    if not lease.released:
        lease.released = True
        router.release_in_background(lease)


async def _sse(
    lease: router.Lease, first: Reply | None, stream: AsyncIterator[Reply], completion: Completion, chat: bool
) -> AsyncIterator[bytes]:
    chunks = _Chunks(completion, chat)
    tokens = prompt_tokens = 0
    try:
        reply = first
        try:
            while reply is not None:
                tokens += reply.tokens
                prompt_tokens = max(prompt_tokens, reply.prompt_tokens)
                yield chunks.piece(reply.message)
                reply = await anext(stream, None)
        except WorkerError as error:
            # Bytes reached the client already: no retry; the error in the stream's shape, and the replica
            # probed now (removed if it does not answer) instead of at the next health tick.
            logger.warning("stream of %s from %s broke: %s", completion.model, lease.process_key, error)
            router.probe_replica_soon(lease)
            yield _event(_backend_error(error).payload())
            return
        yield chunks.piece("", _finish_reason(completion, tokens))
        if completion.include_usage:
            yield chunks.usage(prompt_tokens, tokens)
        yield b"data: [DONE]\n\n"
    finally:
        try:
            await stream.aclose()  # type: ignore[attr-defined]
        finally:
            await lease.release()


class _EventStream(StreamingHttpResponse):
    """A Server-Sent Events answer that gives its in-flight unit back however it ends.

    Django's ASGI handler closes the iterator `__aiter__` answers, but not the one given to the response
    (`streaming_content` wraps it in a generator of its own), so the events' `finally` would wait for garbage
    collection; here closing one closes the other. And a client that stops reading (its connection open, its
    window full) would hold the unit forever: a piece not written within `LOCALAI_STREAM_WRITE_TIMEOUT` cancels
    the request, as a disconnect does."""

    def __init__(self, events: AsyncIterator[bytes], lease: router.Lease) -> None:
        super().__init__(events, content_type="text/event-stream")
        self._events = events
        self._lease = lease
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        request_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        timeout = float(settings.LOCALAI_STREAM_WRITE_TIMEOUT)
        async with contextlib.aclosing(self._events) as events:  # type: ignore[type-var]
            async for part in events:
                # The consumer writes `part` before it asks for the next one: that is the time bounded here.
                stalled = loop.call_later(timeout, self._stalled, request_task, timeout)
                try:
                    yield part
                finally:
                    stalled.cancel()

    def _stalled(self, request_task: asyncio.Task | None, timeout: float) -> None:
        logger.warning(
            "the client of a stream from %s stopped reading for %gs: ending the request",
            self._lease.process_key,
            timeout,
        )
        if request_task is not None:
            request_task.cancel()


# --- views ---------------------------------------------------------------------------------------------------


# Answers given once the request authenticated and its model was found in the catalog: only these label the
# gateway's metrics with the model's name; every other answer (401, 404 model_not_found, a database fault)
# says `unknown`, so no client (least of all an anonymous one) can add label values of its own choosing.
_MODEL_RESOLVED_CODES = frozenset({"no_capacity", "load_failed", "backend_error"})
UNKNOWN_MODEL_LABEL = "unknown"


def _model_label(model: str, error: GatewayError | None = None) -> str:
    if error is None or error.code in _MODEL_RESOLVED_CODES:
        return model
    return UNKNOWN_MODEL_LABEL


ResponseT = TypeVar("ResponseT", bound=HttpResponseBase)


def _routed(response: ResponseT, lease: router.Lease, *, staff: bool = False) -> ResponseT:
    """The answer names where it ran — `X-LocalAI-Node` (the node's name) and `X-LocalAI-Replica` (the
    replica's process key) — for the playground's staff answers always, for API clients only with
    `LOCALAI_EXPOSE_ROUTING_HEADERS` (off by default: they describe the cluster's topology)."""
    if staff or settings.LOCALAI_EXPOSE_ROUTING_HEADERS:  # percent-encoded beyond printable ASCII
        response["X-LocalAI-Node"] = quote(lease.node_name, safe=_HEADER_SAFE)
        response["X-LocalAI-Replica"] = quote(lease.process_key, safe=_HEADER_SAFE)
    return response


_HEADER_SAFE = "!#$&'()*+,/:;=?@[]~"


def _observe(model: str, endpoint: str, status: int, started: float) -> None:
    """Counts an answer; `model` is a catalog name or `unknown` (`_model_label`)."""
    elapsed = time.perf_counter() - started
    metrics.GATEWAY_REQUESTS.labels(model, endpoint, str(status)).inc()
    metrics.GATEWAY_LATENCY.labels(model, endpoint).observe(elapsed)
    usage_record(status, elapsed)  # the overview's cluster-wide counts (console.usage), no I/O here


async def _bad_body(request: HttpRequest, error: GatewayError, *, staff: bool = False) -> HttpResponse:
    """Answers a body error, after authentication (a client without a valid key learns nothing more)."""
    if staff:
        return error.response()
    try:
        await router.authorize(_bearer(request))
    except router.Unauthorized:
        return _unauthorized().response()
    except (DatabaseError, psycopg.Error) as db_error:
        return _database_unavailable(db_error).response()
    return error.response()


async def _complete(
    request: HttpRequest, parse: Callable[[dict[str, Any]], Completion], chat: bool, *, staff: bool = False
) -> HttpResponseBase:
    endpoint = "chat.completions" if chat else "completions"
    started = time.perf_counter()
    try:
        body = _json_body(request)
        completion = parse(body)
        session = _session(request, body)
    except GatewayError as error:
        return await _bad_body(request, error, staff=staff)
    raw_key: Any = router.NO_AUTH if staff else _bearer(request)
    fields = completion.fields
    try:
        if not completion.stream:

            async def predict(lease: router.Lease) -> Reply:
                return await _backend(lease).predict(fields)

            lease, reply = await _with_replica(
                completion.model, raw_key, predict, fields=fields, session=session, early=True
            )
            lease.release_soon()
            body = _chat_body(completion, reply) if chat else _text_body(completion, reply)
            _observe(completion.model, endpoint, 200, started)
            return _routed(JsonResponse(body), lease, staff=staff)

        async def open_stream(lease: router.Lease) -> tuple[Reply | None, AsyncIterator[Reply]]:
            stream = _backend(lease).predict_stream(fields)
            try:
                return await anext(stream, None), stream
            except BaseException:
                await stream.aclose()  # type: ignore[attr-defined]
                raise

        async def close_stream(opened: tuple[Reply | None, AsyncIterator[Reply]]) -> None:
            await opened[1].aclose()  # type: ignore[attr-defined]

        lease, (first, stream) = await _with_replica(
            completion.model,
            raw_key,
            open_stream,
            fields=fields,
            session=session,
            early=True,
            discard=close_stream,
        )
    except GatewayError as error:
        _observe(_model_label(completion.model, error), endpoint, error.status, started)
        return error.response()
    events = _sse(lease, first, stream, completion, chat)
    weakref.finalize(events, _release_if_leaked, lease)
    response = _EventStream(events, lease)
    _observe(completion.model, endpoint, 200, started)
    return _routed(response, lease, staff=staff)


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/chat/completions`."""
    return await _complete(request, parse_chat, chat=True)


@csrf_exempt
@require_POST
async def completions(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/completions`."""
    return await _complete(request, parse_completion, chat=False)


def _encode_embedding(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def _embed_all(client: BackendClient, texts: list[str]) -> list[list[float]]:
    """One `Embedding` call per text, at most `EMBEDDING_CONCURRENCY` at a time, answered in the texts' order.
    The first failure cancels the calls under way and starts no other; so does the caller's cancellation.
    Every call has ended when this returns or raises, so none reaches the backend after the answer."""
    vectors: list[list[float]] = [[] for _ in texts]
    positions = iter(range(len(texts)))

    async def worker() -> None:
        for position in positions:
            vectors[position] = await client.embedding(texts[position])

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(EMBEDDING_CONCURRENCY, len(texts))):
                group.create_task(worker())
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return vectors


@csrf_exempt
@require_POST
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    """`POST /v1/embeddings`: one `Embedding` call per input string, on one replica (`_embed_all`)."""
    return await _embeddings(request)


async def _embeddings(request: HttpRequest, *, staff: bool = False) -> HttpResponseBase:
    started = time.perf_counter()
    try:
        body = _json_body(request)
        model, texts, encoding = parse_embeddings(body)
        session = _session(request, body)
    except GatewayError as error:
        return await _bad_body(request, error, staff=staff)

    async def embed(lease: router.Lease) -> list[list[float]]:
        return await _embed_all(_backend(lease), texts)

    try:
        raw_key: Any = router.NO_AUTH if staff else _bearer(request)
        lease, vectors = await _with_replica(model, raw_key, embed, session=session)
    except GatewayError as error:
        _observe(_model_label(model, error), "embeddings", error.status, started)
        return error.response()
    lease.release_soon()
    prompt_tokens = sum(len(text.split()) for text in texts)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encode_embedding(vector, encoding)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    _observe(model, "embeddings", 200, started)
    return _routed(JsonResponse(body), lease, staff=staff)


# --- the playground's door -----------------------------------------------------------------------------------


async def staff_chat_completions(request: HttpRequest) -> HttpResponseBase:
    """`/v1/chat/completions` for the playground page (`console.views`), which has already checked the staff
    session and Django's CSRF middleware the token: the same parsing, routing, streaming, release and metrics,
    without the API key check; the answer names its node and replica (`X-LocalAI-Node`, `X-LocalAI-Replica`)."""
    return await _complete(request, parse_chat, chat=True, staff=True)


async def staff_embeddings(request: HttpRequest) -> HttpResponseBase:
    """`/v1/embeddings` for the playground page, on the same terms as `staff_chat_completions`."""
    return await _embeddings(request, staff=True)


def _catalog() -> list[dict[str, Any]]:
    return [
        {"id": name, "object": "model", "created": int(created_at.timestamp()), "owned_by": OWNED_BY}
        for name, created_at in ModelConfig.objects.order_by("name").values_list("name", "created_at")
    ]


@require_GET
async def list_models(request: HttpRequest) -> HttpResponse:
    """`GET /v1/models`: the catalog in OpenAI's list shape."""
    try:
        await router.authorize(_bearer(request))
        data = await router.run_db(_catalog)
    except router.Unauthorized:
        return _unauthorized().response()
    except (DatabaseError, psycopg.Error) as db_error:
        return _database_unavailable(db_error).response()
    return JsonResponse({"object": "list", "data": data})


@csrf_exempt
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    """Any other `/v1/` path, in OpenAI's error shape."""
    return GatewayError(
        404,
        f"Unknown endpoint: {request.method} /v1/{path}",
        type="invalid_request_error",
        code="unknown_url",
    ).response()
