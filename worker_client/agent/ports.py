"""Backend ports: base port + 1 upwards, lowest free first, reused once released."""

from __future__ import annotations

import socket
from collections.abc import Callable

MAX_PORT = 65535


def can_bind(host: str, port: int) -> bool:
    """Whether nothing on this host listens on `port` (sockets in TIME_WAIT do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class NoFreePort(Exception):
    """Every port above the base port is taken."""


class PortAllocator:
    """Hands out the lowest port above `base_port` that is neither handed out nor busy on the host."""

    def __init__(self, base_port: int, is_free: Callable[[int], bool]) -> None:
        self._base_port = base_port
        self._is_free = is_free
        self._taken: set[int] = set()

    def acquire(self) -> int:
        """Takes a port; raises `NoFreePort` when none is left."""
        for port in range(self._base_port + 1, MAX_PORT + 1):
            if port not in self._taken and self._is_free(port):
                self._taken.add(port)
                return port
        raise NoFreePort(f"no free port above {self._base_port}")

    def release(self, port: int) -> None:
        """Gives a port back; releasing a port twice is harmless."""
        self._taken.discard(port)
