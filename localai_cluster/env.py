"""Typed reading of environment variables: a bad value stops start-up naming the variable."""

from __future__ import annotations

import os
import re

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}: expected true or false, got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}: must be at least {minimum}, got {value}")
    return value


def env_seconds(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A duration in seconds; accepts `30`, `30s`, `500ms`, `5m`, `1h`."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    match = _DURATION.match(raw)
    if not match:
        raise ImproperlyConfigured(f"{name}: expected a duration such as 30 or 30s, got {raw!r}")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if value < minimum:
        raise ImproperlyConfigured(f"{name}: must be at least {minimum} s, got {raw!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_file(name: str) -> str:
    """A path to a readable file, or "" when unset."""
    path = os.environ.get(name, "").strip()
    if path and not os.access(path, os.R_OK):
        raise ImproperlyConfigured(f"{name}: cannot read the file {path!r}")
    if path and not os.path.isfile(path):
        raise ImproperlyConfigured(f"{name}: {path!r} is not a file")
    return path


def parse_bytes(text: str) -> int:
    """A size in bytes from `10485760`, `512k`, `10M`, `10MiB`, `1G` (binary units); `ValueError` otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size in bytes such as 8589934592 or 8GiB, got {text!r}")
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * _SIZE_UNITS[unit]


def env_bytes(name: str, default: int, *, minimum: int = 0) -> int:
    """A size in bytes; accepts `10485760`, `512k`, `10M`, `10MiB`, `1G` (binary units: k = 1024)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    match = _SIZE.match(raw)
    if not match:
        raise ImproperlyConfigured(f"{name}: expected a size in bytes such as 10485760 or 10MiB, got {raw!r}")
    unit = (match.group(2) or "b")[0].lower()
    value = int(match.group(1)) * _SIZE_UNITS[unit]
    if value < minimum:
        raise ImproperlyConfigured(f"{name}: must be at least {minimum} bytes, got {raw!r}")
    return value
