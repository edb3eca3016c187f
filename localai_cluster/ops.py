"""Operational endpoints: liveness and readiness."""

from __future__ import annotations

import asyncio

import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _redis_ok() -> bool:
    try:
        return bool(
            redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
        )
    except Exception:
        return False


@require_GET
async def readyz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL and Redis answer, else 503 naming the ones that do not. The database is checked on
    the gateway's own pool, whose check replaces a connection that died while idle (so a database that came
    back reads as up on the first probe), within `LOCALAI_DB_POOL_TIMEOUT` (so a frozen one reads as down
    instead of hanging the probe)."""
    from scheduling.router import database_ready

    database, redis_up = await asyncio.gather(database_ready(), asyncio.to_thread(_redis_ok))
    checks = {"database": database, "redis": redis_up}
    down = [name for name, ok in checks.items() if not ok]
    if down:
        return JsonResponse({"status": "unavailable", "down": down, "checks": checks}, status=503)
    return JsonResponse({"status": "ok", "checks": checks})
