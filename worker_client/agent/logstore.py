"""Backend output, per process key: ring buffers, merged reads and live subscriptions (BEHAVIOUR §7).

Used from the agent's event loop only, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque

from worker_client.agent.keys import matches
from worker_client.client import LogLine

DEFAULT_CAPACITY = 1000
SUBSCRIBER_QUEUE_SIZE = 10_000


class Subscription:
    """Live lines of the keys a selector designates, in the order they were written.

    A consumer that falls `SUBSCRIBER_QUEUE_SIZE` lines behind is cut off: `overflowed` becomes true and no
    more lines arrive, so it can say so rather than silently lose lines.
    """

    def __init__(self, selector: str) -> None:
        self.selector = selector
        self.queue: asyncio.Queue[LogLine] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)
        self.overflowed = False

    def offer(self, line: LogLine) -> None:
        if self.overflowed or not matches(self.selector, line.process_key):
            return
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.overflowed = True


class LogStore:
    """The last `capacity` lines of every process key; a stopped process's lines stay until its key restarts."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._buffers: dict[str, deque[LogLine]] = {}
        self._subscriptions: set[Subscription] = set()
        self._seq = itertools.count(1)

    def reset(self, key: str) -> None:
        """Starts `key` over with an empty buffer (its process is starting again)."""
        self._buffers[key] = deque(maxlen=self._capacity)

    def append(self, key: str, stream: str, text: str) -> LogLine:
        """Stores a line and hands it to the matching subscriptions."""
        line = LogLine(process_key=key, timestamp=time.time(), stream=stream, text=text, seq=next(self._seq))
        self._buffers.setdefault(key, deque(maxlen=self._capacity)).append(line)
        for subscription in self._subscriptions:
            subscription.offer(line)
        return line

    def keys(self) -> list[str]:
        """Keys with a buffer, sorted."""
        return sorted(self._buffers)

    def read(self, selector: str, tail: int = 0) -> list[LogLine]:
        """The lines of the keys `selector` designates, ordered by time; the last `tail` when `tail` > 0."""
        buffers = [buffer for key, buffer in self._buffers.items() if matches(selector, key)]
        lines = list(heapq.merge(*buffers, key=lambda line: (line.timestamp, line.seq)))
        return lines[-tail:] if tail > 0 else lines

    def subscribe(self, selector: str) -> Subscription:
        """Live lines for `selector`, from now on, including keys that start later."""
        subscription = Subscription(selector)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
