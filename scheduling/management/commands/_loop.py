"""Shared shape of the control-loop commands: one tick with --once, else a tick every interval.

The loop stops on SIGTERM or SIGINT the way healthchecks' `sendalerts` does: the signal only sets a flag, the
tick under way runs to its end (a tick cut in the middle would leave half its work for the next process), the
wait between ticks ends at once, and the command exits 0 after printing that it stopped.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from django.core.management.base import BaseCommand
from django.db import close_old_connections

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class LoopCommand(BaseCommand):
    interval_setting = ""

    def add_arguments(self, parser) -> None:
        parser.add_argument("--once", action="store_true", help="run exactly one tick, print it, exit 0")

    def tick(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def interval(self) -> float:
        from django.conf import settings

        return float(getattr(settings, self.interval_setting))

    def handle(self, *args, once: bool = False, **options) -> None:
        run: Callable[[], None] = self._run_once
        if once:
            run()
            return
        stop = threading.Event()

        def on_signal(signum, frame) -> None:
            if not stop.is_set():
                self.stdout.write(f"{signal.Signals(signum).name} received: stopping after this tick")
                self.stdout.flush()
            stop.set()

        for signum in STOP_SIGNALS:
            signal.signal(signum, on_signal)
        while not stop.is_set():
            started = time.monotonic()
            try:
                run()
            except Exception as exc:  # a fault is reported; the loop goes on
                self.stderr.write(f"tick failed: {exc}")
            finally:
                # What Django does around each request: drop a connection that a database fault broke (or
                # that is past its age), so the next tick connects afresh instead of failing on it forever.
                close_old_connections()
                self.stdout.flush()
            stop.wait(max(self.interval() - (time.monotonic() - started), 0))
        self.stdout.write("stopped")
        self.stdout.flush()

    def _run_once(self) -> None:
        report = self.tick()
        for line in report.lines():
            self.stdout.write(line)
        self.stdout.write(f"took {report.duration * 1000:.0f} ms")
