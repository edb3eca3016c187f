"""The Redis channel layer of the WebSocket consumers, with a read timeout that outlasts its blocking wait."""

from __future__ import annotations

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer

# Each consumer waits for messages with `BZPOPMIN <channel> <brpop_timeout>`; the Redis connection gives up
# reading after `socket_timeout` (settings.CHANNEL_LAYERS). Both were 5 s (channels_redis's block, redis-py 8's
# default read timeout): on a busy machine the server's empty answer, sent at 5 s, arrived after the client had
# given up, a `redis.exceptions.TimeoutError` in the consumer. A short block and a read timeout well beyond it.
BRPOP_TIMEOUT = 2
SOCKET_TIMEOUT = 10


class RedisChannelLayer(_RedisChannelLayer):
    brpop_timeout = BRPOP_TIMEOUT
