"""Connection health without a round trip.

An idle PostgreSQL session has nothing to say: the server writes to it only to answer a statement. So input
waiting on an idle connection's socket means the server ended the session (`pg_terminate_backend`, a restart:
its goodbye message, then EOF) or the peer vanished (EOF, a reset) — or, rarely, a harmless notice. Polling
the socket costs one system call, not a round trip, so every pooled connection can be checked each time it is
handed out.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


def idle_connection_suspect(conn: Any) -> bool:
    """True when the psycopg connection `conn` (sync or async, idle) is closed, broken, or has unread input on
    its socket (then a round trip tells a dead session from a harmless notice)."""
    if conn.closed or conn.broken:
        return True
    try:
        fd = conn.pgconn.socket
    except Exception:  # psycopg raises when the connection has no socket any more
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))  # POLLHUP and POLLERR are always reported too


# --- a client-side deadline for Django's statements ----------------------------------------------------------
# `statement_timeout` is enforced by the server: a frozen server (SIGSTOP, a paused VM) or one whose host
# vanished behind a silent network never answers, and libpq would wait forever. The watchdog gives every
# statement run through Django a deadline a little after the server's own timeout, and past it shuts the
# connection's socket down: the blocked read returns, psycopg raises `OperationalError`, Django marks the
# connection unusable, and the loop (or request) fails instead of hanging; `close_old_connections` then drops
# it. Unix sockets (the embedded engine) are covered the same way (keepalives are TCP only).

DEADLINE_MARGIN = 2.0  # seconds after the server's statement_timeout


class _Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}  # token → (deadline, socket fd)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (time.monotonic() + seconds, fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        # Under the lock: once this returns, the fd (which the caller may close and the OS reuse) is never cut.
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (deadline, fd) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        _cut(fd)
                wait = min((deadline for deadline, _ in self._armed.values()), default=now + 60) - now
                self._cond.wait(max(wait, 0.01))


def _cut(fd: int) -> None:
    logger.warning("a database statement passed its deadline: closing its connection")
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def statement_deadline(conn: Any, seconds: float) -> Iterator[None]:
    """Cuts the psycopg connection `conn` when the statements run inside take longer than `seconds` (0: no
    deadline), for sessions outside Django (the in-flight owner's lock session)."""
    if not seconds:
        yield
        return
    token = _WATCHDOG.arm(conn.pgconn.socket, seconds)
    try:
        yield
    finally:
        _WATCHDOG.disarm(token)


def _deadline_wrapper(execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]) -> Any:
    from django.conf import settings

    seconds = float(settings.LOCALAI_DB_STATEMENT_TIMEOUT)
    raw = context["connection"].connection
    if not seconds or raw is None:
        return execute(sql, params, many, context)
    with statement_deadline(raw, seconds + DEADLINE_MARGIN):
        return execute(sql, params, many, context)


def _install(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _deadline_wrapper not in connection.execute_wrappers:
        connection.execute_wrappers.append(_deadline_wrapper)


def install_statement_deadline() -> None:
    """Gives every statement of every Django connection of this process its deadline (AppConfig.ready)."""
    from django.db.backends.signals import connection_created

    connection_created.connect(_install, dispatch_uid="localai_cluster.dbhealth")
