"""The `echo` backend's gRPC server.

Answers are derived from the request alone: the reply is "echo: <last user message>" (or the prompt), cut to
`Tokens` whitespace-separated words; token counts are word counts. `ModelOptions.Options` knobs: `delay_ms:N`
(delay before each token), `load_ms:N` (LoadModel takes that long), `fail_load:true` (LoadModel fails and says
why on stderr), `fail_embedding:TEXT` (the embedding of exactly TEXT fails with `INTERNAL`), and a model of a
prefix (KV) cache: `prefix_cache_chars:M` keeps the prompts of recent requests, at most M distinct prefix
characters in all — a prefix that kept prompts share is stored once, as in a radix tree of KV blocks — the
least recently used prompt dropped first (which frees only the characters no other kept prompt shares), and
`prefill_us_per_char:N` makes a completion wait N µs per prompt character not covered by the longest common
prefix with a kept prompt; each completion then prints
`prefix-cache: hit=<chars> miss=<chars>`. Prefills of one replica run one at a time, in arrival order (a GPU's
prefill is compute-bound), while decoding runs concurrently. With
`LOCALAI_GRPC_AUTH_TOKEN` set, calls without `authorization: Bearer <token>` are refused. Every request except
`Health` prints one line to stdout; `Embedding` lines carry a running count (`Embedding #N chars=...`), so a
test can tell how many calls arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import math
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from worker_client._generated import backend_pb2, backend_pb2_grpc
from worker_client.auth import BearerTokenInterceptor

EMBEDDING_SIZE = 16
AUTH_TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"


@dataclass(frozen=True)
class Knobs:
    """Behaviour set through `ModelOptions.Options` entries `name:value`."""

    delay_ms: int = 0
    load_ms: int = 0
    fail_load: bool = False
    fail_embedding: str | None = None
    prefill_us_per_char: int = 0
    prefix_cache_chars: int = 0

    @classmethod
    def parse(cls, options: list[str]) -> Knobs:
        values = dict(option.partition(":")[::2] for option in options)
        knobs = cls(
            delay_ms=int(values.get("delay_ms", 0)),
            load_ms=int(values.get("load_ms", 0)),
            fail_load=values.get("fail_load", "").lower() == "true",
            fail_embedding=values.get("fail_embedding"),
            prefill_us_per_char=int(values.get("prefill_us_per_char", 0)),
            prefix_cache_chars=int(values.get("prefix_cache_chars", 0)),
        )
        if knobs.prefill_us_per_char < 0 or knobs.prefix_cache_chars < 0:
            raise ValueError("prefill_us_per_char and prefix_cache_chars must not be negative")
        return knobs


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b` (a binary search of slice comparisons)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:  # a[:low] == b[:low] and a[:high] != b[:high]
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class PrefixCache:
    """The prompts of recent requests as a radix tree would hold them: `size` counts the distinct prefix
    characters of the kept prompts (their trie's size: a prefix shared by several is counted once), at most
    `capacity`; the least recently used prompt is dropped first, freeing the characters no other kept prompt
    shares. `serve` answers how many leading characters of a prompt a kept prompt already covers (the longest
    common prefix with any of them), then keeps the prompt.

    The kept prompts are also held in sorted order: the longest common prefix of a string with a set is the one
    with its neighbour before or after it in that order, so a request costs two prefix comparisons and a
    binary search, however many prompts are kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.prompts: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.ordered: list[str] = []  # the same prompts, sorted
        self.size = 0

    def _shared(self, prompt: str, position: int) -> int:
        """The longest common prefix of `prompt` with the kept prompts around `position` of `ordered` (the
        slot it has, or would have, there; itself excluded)."""
        following = position
        if following < len(self.ordered) and self.ordered[following] == prompt:
            following += 1  # itself: its neighbour after it is the next one
        before = self.ordered[position - 1] if position > 0 else ""
        after = self.ordered[following] if following < len(self.ordered) else ""
        return max(common_prefix(prompt, before), common_prefix(prompt, after))

    def serve(self, prompt: str) -> int:
        position = bisect.bisect_left(self.ordered, prompt)
        if prompt in self.prompts:
            self.prompts.move_to_end(prompt)
            return len(prompt)
        hit = self._shared(prompt, position)
        if self.capacity <= 0 or len(prompt) > self.capacity:
            return hit
        self.prompts[prompt] = None
        self.ordered.insert(position, prompt)
        self.size += len(prompt) - hit
        while self.size > self.capacity:
            dropped, _ = self.prompts.popitem(last=False)
            where = bisect.bisect_left(self.ordered, dropped)
            self.size -= len(dropped) - self._shared(dropped, where)
            del self.ordered[where]
        return hit


def prompt_text(request: backend_pb2.PredictOptions) -> str:
    """Everything the caller sent: the messages' contents, else the prompt."""
    if request.Messages:
        return "\n".join(message.content for message in request.Messages)
    return request.Prompt


def answer_words(request: backend_pb2.PredictOptions) -> list[str]:
    """The answer's words: "echo:" and the last user message (else the prompt), at most `Tokens` of them."""
    user_messages = [message.content for message in request.Messages if message.role == "user"]
    source = user_messages[-1] if user_messages else request.Prompt
    words = ["echo:", *source.split()]
    return words[: request.Tokens] if request.Tokens > 0 else words


def embedding_of(text: str) -> list[float]:
    """A unit vector of `EMBEDDING_SIZE` floats derived from the text's SHA-256."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [value / 32767.5 - 1.0 for value in struct.unpack(f"<{EMBEDDING_SIZE}H", digest)]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def log_request(method: str, detail: str) -> None:
    """The per-request stdout line that gives a replica's logs their content."""
    print(f"{method} {detail}", flush=True)


class EchoBackend(backend_pb2_grpc.BackendServicer):
    """The `Backend` service with deterministic answers."""

    def __init__(self) -> None:
        self.knobs = Knobs()
        self.state = backend_pb2.StatusResponse.UNINITIALIZED
        self.embeddings = 0
        self.prefix_cache = PrefixCache(0)
        self.prefill_lock = asyncio.Lock()

    async def _prefill(self, request: backend_pb2.PredictOptions) -> None:
        """The prefix cache's part of a completion (a no-op unless its options are given).

        Prefill is compute-bound on a GPU: prefills that run together share its compute, so N of them take
        about as long in all as one after the other. The replica therefore prefills one request at a time
        (first come, first served) and looks its prompt up in the cache when its turn comes, so a request
        queued behind one with the same prefix finds that prefix cached. Decoding (`delay_ms` per token)
        stays concurrent, like continuous batching's decode steps."""
        if not (self.knobs.prefix_cache_chars or self.knobs.prefill_us_per_char):
            return
        prompt = prompt_text(request)
        async with self.prefill_lock:
            hit = self.prefix_cache.serve(prompt)
            miss = len(prompt) - hit
            log_request("prefix-cache:", f"hit={hit} miss={miss}")
            await asyncio.sleep(self.knobs.prefill_us_per_char * miss / 1_000_000)

    async def Health(
        self, request: backend_pb2.HealthMessage, context: grpc.aio.ServicerContext
    ) -> backend_pb2.Reply:
        return backend_pb2.Reply(message=b"OK")

    async def LoadModel(
        self, request: backend_pb2.ModelOptions, context: grpc.aio.ServicerContext
    ) -> backend_pb2.Result:
        log_request("LoadModel", f"model={request.Model!r} options={list(request.Options)}")
        try:
            knobs = Knobs.parse(list(request.Options))
        except ValueError as error:
            return self._load_failed(f"bad options {list(request.Options)}: {error}")
        await asyncio.sleep(knobs.load_ms / 1000)
        if knobs.fail_load:
            return self._load_failed(f"fail_load:true was given for model {request.Model!r}")
        self.knobs = knobs
        self.prefix_cache = PrefixCache(knobs.prefix_cache_chars)
        self.state = backend_pb2.StatusResponse.READY
        return backend_pb2.Result(success=True, message=f"loaded {request.Model}")

    def _load_failed(self, reason: str) -> backend_pb2.Result:
        print(f"LoadModel failed: {reason}", file=sys.stderr, flush=True)
        self.state = backend_pb2.StatusResponse.ERROR
        return backend_pb2.Result(success=False, message=reason)

    async def Predict(
        self, request: backend_pb2.PredictOptions, context: grpc.aio.ServicerContext
    ) -> backend_pb2.Reply:
        words = answer_words(request)
        prompt_tokens = len(prompt_text(request).split())
        log_request("Predict", f"prompt_tokens={prompt_tokens} tokens={len(words)}")
        await self._prefill(request)
        await asyncio.sleep(self.knobs.delay_ms * len(words) / 1000)
        return backend_pb2.Reply(
            message=" ".join(words).encode(), tokens=len(words), prompt_tokens=prompt_tokens
        )

    async def PredictStream(
        self, request: backend_pb2.PredictOptions, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[backend_pb2.Reply]:
        words = answer_words(request)
        prompt_tokens = len(prompt_text(request).split())
        log_request("PredictStream", f"prompt_tokens={prompt_tokens} tokens={len(words)}")
        await self._prefill(request)
        for position, word in enumerate(words):
            await asyncio.sleep(self.knobs.delay_ms / 1000)
            piece = word if position == 0 else f" {word}"
            yield backend_pb2.Reply(message=piece.encode(), tokens=1, prompt_tokens=prompt_tokens)

    async def Embedding(
        self, request: backend_pb2.PredictOptions, context: grpc.aio.ServicerContext
    ) -> backend_pb2.EmbeddingResult:
        text = request.Embeddings or request.Prompt
        self.embeddings += 1
        log_request("Embedding", f"#{self.embeddings} chars={len(text)}")
        if self.knobs.fail_embedding is not None and text == self.knobs.fail_embedding:
            await context.abort(grpc.StatusCode.INTERNAL, f"fail_embedding:{text} was given")
        return backend_pb2.EmbeddingResult(embeddings=embedding_of(text))

    async def Status(
        self, request: backend_pb2.HealthMessage, context: grpc.aio.ServicerContext
    ) -> backend_pb2.StatusResponse:
        log_request("Status", backend_pb2.StatusResponse.State.Name(self.state))
        return backend_pb2.StatusResponse(state=self.state, memory=backend_pb2.MemoryUsageData(total=0))

    async def Free(
        self, request: backend_pb2.HealthMessage, context: grpc.aio.ServicerContext
    ) -> backend_pb2.Result:
        log_request("Free", "model unloaded")
        self.knobs = Knobs()
        self.prefix_cache = PrefixCache(0)
        self.state = backend_pb2.StatusResponse.UNINITIALIZED
        return backend_pb2.Result(success=True, message="freed")


def create_server(token: str) -> grpc.aio.Server:
    """An unbound, unstarted server of the echo backend; `token` empty means no authentication."""
    interceptors = [BearerTokenInterceptor(lambda: token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    backend_pb2_grpc.add_BackendServicer_to_server(EchoBackend(), server)
    return server


async def serve(address: str, token: str) -> None:
    """Serves the echo backend on `address` until the process is stopped."""
    server = create_server(token)
    try:
        server.add_insecure_port(address)
    except RuntimeError as error:
        sys.exit(f"echo backend: cannot listen on {address}: {error}")
    await server.start()
    print(f"echo backend listening on {address}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    """Entry point: `--addr host:port`."""
    parser = argparse.ArgumentParser(prog="echo-backend", description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="host:port to listen on")
    args = parser.parse_args()
    asyncio.run(serve(args.addr, os.environ.get(AUTH_TOKEN_ENV, "")))
