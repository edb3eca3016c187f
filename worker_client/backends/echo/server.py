"""The `echo` backend's gRPC server.

Answers are derived from the request alone: the reply is "echo: <last user message>" (or the prompt), cut to
`Tokens` whitespace-separated words; token counts are word counts. `ModelOptions.Options` knobs: `delay_ms:N`
(delay before each token), `load_ms:N` (LoadModel takes that long), `fail_load:true` (LoadModel fails and says
why on stderr), `fail_embedding:TEXT` (the embedding of exactly TEXT fails with `INTERNAL`). With
`LOCALAI_GRPC_AUTH_TOKEN` set, calls without `authorization: Bearer <token>` are refused. Every request except
`Health` prints one line to stdout; `Embedding` lines carry a running count (`Embedding #N chars=...`), so a
test can tell how many calls arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import struct
import sys
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

    @classmethod
    def parse(cls, options: list[str]) -> Knobs:
        values = dict(option.partition(":")[::2] for option in options)
        return cls(
            delay_ms=int(values.get("delay_ms", 0)),
            load_ms=int(values.get("load_ms", 0)),
            fail_load=values.get("fail_load", "").lower() == "true",
            fail_embedding=values.get("fail_embedding"),
        )


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
