"""Shared shape of the control-loop commands: one tick with --once, else a tick every interval."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.core.management.base import BaseCommand
from django.db import close_old_connections


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
        while True:
            started = time.monotonic()
            try:
                run()
            except Exception as exc:  # a fault is reported; the loop goes on
                self.stderr.write(f"tick failed: {exc}")
            finally:
                # What Django does around each request: drop a connection that a database fault broke (or
                # that is past its age), so the next tick connects afresh instead of failing on it forever.
                close_old_connections()
            time.sleep(max(self.interval() - (time.monotonic() - started), 0))

    def _run_once(self) -> None:
        report = self.tick()
        for line in report.lines():
            self.stdout.write(line)
        self.stdout.write(f"took {report.duration * 1000:.0f} ms")
