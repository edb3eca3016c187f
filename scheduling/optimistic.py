"""Optimistic dispatch: a completion's backend call (a whole answer, or a stream up to its first piece) starts
beside its claim, on the replica the claim is predicted to pick, and its answer is used only when the claim
picked exactly that replica.

At concurrency 1 a request through the gateway waits for the claim's statement (a PostgreSQL round trip) and
then for the backend (for a stream, its first token); when the claim is predictable the two can overlap.
PostgreSQL stays the only source of truth: the claim runs as always (key check, routable set, the unit
recorded under the process's owner id), and an answer reaches the client only when the claim committed a unit
on the same replica (same row id, address and backend token) — so every answer a client gets was counted on a
replica that was routable when its unit was claimed, and stays counted until it is released, exactly as
without this. An early call whose claim picked another replica, or none, or refused the key, is cancelled and
its answer dropped (a stream it had already opened is closed, so the backend stops generating for nobody); an
early call that failed is made again on the claimed replica, so the retry rules apply to the real call only.

What an early call may cost, and the gates that bound it (`docs/internal-interfaces.md`, "Optimistic
dispatch"):
- it runs only while this event loop has no other request of the model between claim and answer (steady,
  low-concurrency traffic: at higher concurrency the claims batch and the prediction would often be wrong);
- only after the last `TRUST_AFTER` predictions for the model were all right (every claim scores the
  prediction, dispatched early or not), so a change of the routable set (a drain, a cordon, an eviction, a new
  replica) costs at most one dropped call per web process and model before the gate closes again;
- only for a bearer value (or none) this process saw accepted within `RECENT` seconds, and only when the
  model's last claim here was that recent: a revoked key gets at most that long of dropped calls, a key never
  accepted none;
- `LOCALAI_OPTIMISTIC_DISPATCH=false` turns it off.

The prediction is first-order: after a claim on replica A, the replica that followed A's previous claim (A
itself when nothing did), which follows a single replica, two replicas taking turns (least recently used
breaking a tie) and a round robin alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Generic, TypeVar

from django.conf import settings

from localai_cluster import metrics
from scheduling import router
from scheduling.routing import Preference

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Frees an answer that is thrown away after it arrived (an open stream: closed).
Discard = Callable[[T], Coroutine[Any, Any, None]]

TRUST_AFTER = 8  # right predictions in a row before a call is dispatched early
RECENT = 2.0  # seconds: how fresh the key's acceptance and the model's last claim must be
MAX_KEYS = 1024  # bearer values remembered per event loop (the least recently accepted go first)
MAX_FOLLOWS = 64  # replicas remembered per model
MAX_MODELS = 10_000  # models remembered per event loop


def same_replica(a: router.Lease, b: router.Lease) -> bool:
    """Whether two leases name one replica process: its row, its address, and the token its node expects."""
    return a.replica_id == b.replica_id and a.address == b.address and a.backend_token == b.backend_token


@dataclass
class _Model:
    last: router.Lease | None = None
    last_at: float = 0.0
    follows: dict[int, router.Lease] = field(default_factory=dict)  # replica id -> the claim after it
    streak: int = 0  # right predictions in a row
    busy: int = 0  # requests of the model between claim and answer on this event loop

    def predicted(self) -> router.Lease | None:
        if self.last is None:
            return None
        return self.follows.get(self.last.replica_id, self.last)


class _Loop:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.models: dict[str, _Model] = {}
        self.accepted: OrderedDict[Any, float] = OrderedDict()  # bearer value -> when last accepted

    def model(self, name: str) -> _Model:
        state = self.models.get(name)
        if state is None:
            if len(self.models) >= MAX_MODELS:
                self.models.clear()
            state = self.models[name] = _Model()
        return state

    def recently_accepted(self, raw_key: Any, now: float) -> bool:
        accepted = self.accepted.get(raw_key)
        return accepted is not None and now - accepted <= RECENT


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()


def _this_loop() -> _Loop:
    return router.of_this_loop(_loops, _Loop)


class EarlyCall(Generic[T]):
    """A backend call started on `guess` before the claim answered. Settle it exactly once: `answer` with the
    claimed lease (awaiting it settles the call at once, before its first suspension), or `drop`. `discard`
    frees an answer that is thrown away after it arrived (an open stream: closed)."""

    def __init__(self, guess: router.Lease, work: Awaitable[T], discard: Discard[T] | None = None) -> None:
        self.guess = guess
        self.task: asyncio.Future[T] = asyncio.ensure_future(work)
        # A dropped call's failure is nobody's to raise: retrieved here so asyncio does not report it.
        self.task.add_done_callback(lambda task: task.cancelled() or task.exception())
        self.settled = False
        self._discard = discard

    async def answer(self, lease: router.Lease, call: Callable[[router.Lease], Awaitable[T]]) -> T:
        """The call's answer for the claimed `lease`: the early one when the claim picked the guessed replica
        and the early call succeeded, else the call made now on `lease` (the early one cancelled)."""
        self.settled = True
        if not same_replica(self.guess, lease):
            self._throw_away()
            metrics.GATEWAY_OPTIMISTIC_CALLS.labels("discarded").inc()
            return await call(lease)
        try:
            result = await self.task
        except asyncio.CancelledError:
            # The request went away: the call was cancelled with it, or had just answered (then discarded).
            self._throw_away()
            raise
        except Exception as error:
            # The real call decides what a failure means (its retry, a removed replica): it is made now.
            logger.info(
                "an early call to %s failed (%s): calling the claimed replica again", lease.address, error
            )
            metrics.GATEWAY_OPTIMISTIC_CALLS.labels("failed").inc()
            return await call(lease)
        metrics.GATEWAY_OPTIMISTIC_CALLS.labels("used").inc()
        return result

    def drop(self) -> None:
        """Cancels the call when it was not settled (the claim failed or was refused, or the caller went away)."""
        if self.settled:
            return
        self.settled = True
        self._throw_away()
        metrics.GATEWAY_OPTIMISTIC_CALLS.labels("discarded").inc()

    def _throw_away(self) -> None:
        """Cancels the call (nothing when it has ended); an answer it has or still gets goes to `discard`."""
        self.task.cancel()
        if self._discard is not None:
            self.task.add_done_callback(self._discard_answer)

    def _discard_answer(self, task: asyncio.Future[T]) -> None:
        if self._discard is not None and not task.cancelled() and task.exception() is None:
            router.run_in_background(self._discard(task.result()))


@contextlib.contextmanager
def in_progress(model: str) -> Iterator[None]:
    """Counts a request of `model` on this event loop while it claims and calls (an early call is made only
    when no other one is)."""
    state = _this_loop().model(model)
    state.busy += 1
    try:
        yield
    finally:
        state.busy -= 1


def start(
    model: str,
    raw_key: Any,
    preference: Preference,
    call: Callable[[router.Lease], Awaitable[T]],
    discard: Discard[T] | None = None,
) -> EarlyCall[T] | None:
    """Starts `call` on the predicted replica when every gate is open (see the module's docstring); None
    otherwise. Call it inside `in_progress(model)`. `discard` frees an answer thrown away (`EarlyCall`)."""
    if not settings.LOCALAI_OPTIMISTIC_DISPATCH or not preference.by_load_alone:
        return None
    loop = _this_loop()
    state = loop.model(model)
    now = monotonic()
    if state.busy > 1 or state.streak < TRUST_AFTER or now - state.last_at > RECENT:
        return None
    if raw_key is not router.NO_AUTH and not loop.recently_accepted(raw_key, now):
        return None
    guess = state.predicted()
    if guess is None:
        return None
    return EarlyCall(guess, call(guess), discard)


def claimed(model: str, raw_key: Any, preference: Preference, lease: router.Lease) -> None:
    """Notes a first-attempt claim: the key was accepted, and the prediction is scored and learned."""
    loop = _this_loop()
    now = monotonic()
    if raw_key is not router.NO_AUTH:
        loop.accepted[raw_key] = now
        loop.accepted.move_to_end(raw_key)
        if len(loop.accepted) > MAX_KEYS:
            loop.accepted.popitem(last=False)
    if not preference.by_load_alone:
        return
    state = loop.model(model)
    guess = state.predicted()
    state.streak = state.streak + 1 if guess is not None and same_replica(guess, lease) else 0
    if state.last is not None:
        if len(state.follows) >= MAX_FOLLOWS:
            state.follows.clear()
        state.follows[state.last.replica_id] = lease
    state.last, state.last_at = lease, now
