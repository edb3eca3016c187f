"""Routing policies (`ModelConfig.routing`): which loaded replica of a model a request is claimed on.

- `least_in_flight` (the default, `LOCALAI_ROUTING_POLICY`): fewest in-flight requests, then most effective
  free VRAM on its node, then least recently used.
- `prefix_cache`: the rendered prompt (chat messages in order, or the prompt) is cut into blocks of
  `LOCALAI_PREFIX_BLOCK_CHARS` characters, each hashed with the hash of the blocks before it (so one block hash
  names a whole prefix). A bounded index in Redis, per model and shared by every web process, maps a block hash
  to the replicas that recently served a prompt with that prefix. The request goes to the routable replica with
  the longest matched prefix among those whose in-flight exceeds the least-loaded replica's by at most
  `LOCALAI_PREFIX_BALANCE_THRESHOLD`; when none matches (or all matching ones are too busy), to the least
  loaded — and among equally loaded replicas to the prompt's *home*, the highest `md5(first block
  hash:replica id)` (rendezvous hashing of its first block), instead of the least recently used one. So at
  equal load (an idle cluster, a quiet moment) a prompt goes to the same replica each time the index does not
  know it (before its first record lands, after its entries expired), and prompts sharing their first block
  (one system prompt, different later turns) meet on one replica. The home is only a tie-break: a home
  preferred up to the balance threshold (consistent hashing with bounded load) made the placement of every
  cold prompt blind to load up to that bound, and measured worse — the no-sharing bench's p99 ~35 % higher in
  every run, no gain in shared hits beyond the run-to-run noise (docs/performance.md). A prompt shorter than
  one block has no home: routed by load.
- `session`: requests with the same session key (the `X-Session-Id` header, else the body's `user`) go to the
  same routable replica: rendezvous hashing (the replica with the highest `md5(key:replica id)`), so when a
  replica leaves only its sessions move, and a new replica takes only about 1/n of them.

The gateway's warm path stays one database round trip: the preference (replicas ordered by matched prefix and
the home, or the session key) is a parameter of the claim statement itself (`scheduling.router`), which reads
the model's policy, applies the balance threshold and re-checks the row under `FOR UPDATE`. A `prefix_cache`
lookup is one pipelined Redis round trip (`HMGET` of the request's block hashes) before the claim; recording
which replica served the prompt is a script (by `EVALSHA`) run in the background as soon as the claim
returns, before the backend is called, so that the requests that follow see it while this one is still being
prefilled. Only a process that has seen the model's policy (every claim answers it; cached per process) looks
the prefix up: a process's first request of a model, and the first after a switch to `prefix_cache`, are
routed by load (and recorded).

The index, per model: a hash `block hash → replica ids` (most recent first, at most `REPLICAS_PER_BLOCK`) and a
sorted set `block hash → last recorded (ms)`. Each record drops the entries older than
`LOCALAI_PREFIX_INDEX_TTL`, trims the oldest beyond `LOCALAI_PREFIX_INDEX_MAX_BLOCKS`, and sets both keys to
expire after the TTL: memory stays bounded under any traffic (at most that many blocks per model). A removed
replica is taken out of every entry of its model (`forget_replica`, after the deleting transaction commits);
the claim statement only ever considers routable replicas anyway.

Redis down (or slow beyond `REDIS_TIMEOUT`): routing falls back to `least_in_flight`, logged once when it
starts and once when Redis answers again; no error reaches the client. The home is computable without Redis
but deliberately not used then: the contract during an outage is plain `least_in_flight` (issue 14); as a
tie-break it would change little there anyway. Redis is not asked again for `REDIS_RETRY_AFTER` seconds after
a failure, so an outage adds no latency per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

LEAST_IN_FLIGHT = "least_in_flight"
PREFIX_CACHE = "prefix_cache"
SESSION = "session"
POLICIES = (LEAST_IN_FLIGHT, PREFIX_CACHE, SESSION)

REDIS_PREFIX = "localai:prefix"
REPLICAS_PER_BLOCK = 4
# At most this many blocks of a prompt are hashed (a prefix longer than that counts as that long).
MAX_BLOCKS = 128
REDIS_TIMEOUT = 1.0  # seconds, for the lookup and the record
REDIS_RETRY_AFTER = 5.0  # seconds without asking Redis after a failure
MAX_SESSION_KEY = 256


def index_keys(model: str) -> tuple[str, str]:
    """The model's hash and sorted set, named after the cluster's database (clusters and test runs sharing one
    Redis keep their indexes apart)."""
    base = f"{REDIS_PREFIX}:{settings.DATABASES['default']['NAME']}:{model}"
    return f"{base}:blocks", f"{base}:lru"


# --- the prompt's blocks ------------------------------------------------------------------------------------


def rendered_prompt(fields: dict[str, Any]) -> str:
    """The prompt as a prefix-preserving string: each message's role and content in order, else the prompt."""
    messages = fields.get("Messages")
    if messages:
        return "".join(f"{message['role']}\x1f{message['content']}\x1e" for message in messages)
    return str(fields.get("Prompt", ""))


def block_hashes(text: str, block_chars: int | None = None) -> list[str]:
    """Chained hashes of the text's whole blocks: hash i covers the first i+1 blocks."""
    size = block_chars or int(settings.LOCALAI_PREFIX_BLOCK_CHARS)
    hashes: list[str] = []
    previous = b""
    for start in range(0, min(len(text) // size, MAX_BLOCKS) * size, size):
        previous = hashlib.blake2b(
            previous + text[start : start + size].encode("utf-8", "surrogatepass"), digest_size=8
        ).digest()
        hashes.append(previous.hex())
    return hashes


def best_matches(hashes: Sequence[str], entries: Sequence[Any]) -> list[tuple[int, int]]:
    """(replica id, matched blocks) from the index's entries of `hashes` (HMGET's answer): longest match first;
    among equal matches, the replica that recorded the deepest block most recently first, so a prefix stays
    with the replica that has it rather than being spread over every replica that ever served it."""
    matched: dict[int, tuple[int, int]] = {}
    for position, entry in enumerate(entries):
        if not entry:
            continue
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        for rank, item in enumerate(text.split(",")):
            if item.isdigit():
                matched[int(item)] = (position + 1, rank)  # positions ascend: the last seen is the longest
    ordered = sorted(matched.items(), key=lambda pair: (-pair[1][0], pair[1][1]))
    return [(replica, blocks) for replica, (blocks, _rank) in ordered]


# --- session keys -------------------------------------------------------------------------------------------


class BadSessionKey(ValueError):
    pass


def session_key(header: str | None, body: dict[str, Any]) -> str:
    """The request's session key: `X-Session-Id`, else the body's `user`; "" when neither is given."""
    key = header if header else body.get("user")
    if key is None or key == "":
        return ""
    if not isinstance(key, str):
        raise BadSessionKey("'user' must be a string.")
    if len(key) > MAX_SESSION_KEY:
        raise BadSessionKey(
            f"The session key (X-Session-Id or 'user') must be at most {MAX_SESSION_KEY} characters."
        )
    return key


# --- what the claim statement is given ----------------------------------------------------------------------


@dataclass
class Preference:
    """Parameters of the claim statement: replica ids in the order of `best_matches` with their matched
    blocks, and the session key. The statement applies each only under its model's policy."""

    replicas: list[int]
    matched: list[int]
    session: str = ""
    hashes: list[str] | None = None  # the prompt's block hashes, to record after the claim
    home: str = ""  # `prefix_cache`: the first block's hash ("" routes an unmatched prompt by load)

    @classmethod
    def none(cls, session: str = "") -> Preference:
        return cls([], [], session)

    @property
    def by_load_alone(self) -> bool:
        """Whether the claim orders replicas by load alone: no prefix match, session key or home."""
        return not self.replicas and not self.session and not self.home


# Every claim answers the model's policy; this process remembers it to know whether to look a prefix up.
_policies: dict[str, str] = {}
MAX_REMEMBERED_POLICIES = 10_000


def known_policy(model: str) -> str | None:
    return _policies.get(model)


def remember_policy(model: str, policy: str | None) -> None:
    if policy is None:
        return
    if _policies.get(model) != policy:
        if len(_policies) >= MAX_REMEMBERED_POLICIES:
            _policies.clear()
        _policies[model] = policy


# --- Redis: one client per event loop, and a circuit --------------------------------------------------------


class _Circuit:
    """Redis is skipped for `REDIS_RETRY_AFTER` seconds after a failure; the outage is logged once when it
    starts and once when it ends."""

    def __init__(self) -> None:
        self.down_until = 0.0
        self.down = False
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Asks Redis again at the next request (tests)."""
        with self.lock:
            self.down_until, self.down = 0.0, False

    def open(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, error: Exception) -> None:
        with self.lock:
            self.down_until = time.monotonic() + REDIS_RETRY_AFTER
            if self.down:
                return
            self.down = True
        logger.warning(
            "prefix_cache routing: Redis is unavailable (%s); routing by least in-flight until it answers",
            error,
        )

    def succeeded(self) -> None:
        if self.down:
            with self.lock:
                was, self.down = self.down, False
            if was:
                logger.warning("prefix_cache routing: Redis answers again; routing by prefix resumed")


circuit = _Circuit()
# This event loop's client, with the URL it was made for and its record script.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, Any, Any]] = (
    weakref.WeakKeyDictionary()
)


def _async_known() -> tuple[str, Any, Any]:
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    url = settings.REDIS_URL
    known = _clients.get(loop)
    if known is None or known[0] != url:
        client = aioredis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        # Run by EVALSHA: the script's text goes to Redis once (again only if Redis lost it), not per request.
        _clients[loop] = known = (url, client, client.register_script(_RECORD_LUA))
    return known


def _async_client() -> Any:
    return _async_known()[1]


async def close_clients() -> None:
    """Closes this event loop's client (ASGI lifespan shutdown)."""
    known = _clients.pop(asyncio.get_running_loop(), None)
    if known is not None:
        await known[1].aclose()


async def preference_for(model: str, fields: dict[str, Any], session: str) -> Preference:
    """What the claim of a request for `model` prefers: its session key, and for a `prefix_cache` model (as
    this process last saw it) the replicas by matched prefix — one Redis round trip, none while Redis is
    failing (then the prefix is not used and the request routes by load)."""
    if known_policy(model) != PREFIX_CACHE:
        return Preference.none(session)
    hashes = block_hashes(rendered_prompt(fields))
    preference = Preference([], [], session, hashes)
    if not hashes or not circuit.open():
        return preference
    from redis import RedisError

    try:
        entries = await _async_client().hmget(index_keys(model)[0], hashes)  # bounded by REDIS_TIMEOUT
    except (RedisError, OSError, TimeoutError) as error:
        circuit.failed(error)
        return preference
    circuit.succeeded()
    preference.home = hashes[0]
    for replica_id, blocks in best_matches(hashes, entries):
        preference.replicas.append(replica_id)
        preference.matched.append(blocks)
    return preference


_RECORD_LUA = """
local rid = ARGV[1]
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
for i = 6, #ARGV do
  local h = ARGV[i]
  local current = redis.call('HGET', KEYS[1], h)
  local out = {rid}
  if current then
    for id in string.gmatch(current, '[^,]+') do
      if id ~= rid and #out < keep then out[#out + 1] = id end
    end
  end
  redis.call('HSET', KEYS[1], h, table.concat(out, ','))
  redis.call('ZADD', KEYS[2], now, h)
end
local function drop(names)
  for s = 1, #names, 500 do
    local chunk = {}
    for j = s, math.min(s + 499, #names) do chunk[#chunk + 1] = names[j] end
    redis.call('HDEL', KEYS[1], unpack(chunk))
    redis.call('ZREM', KEYS[2], unpack(chunk))
  end
end
drop(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, 5000))
local n = redis.call('ZCARD', KEYS[2])
if n > cap then drop(redis.call('ZRANGE', KEYS[2], 0, n - cap - 1)) end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return n
"""

_FORGET_LUA = """
local entries = redis.call('HGETALL', KEYS[1])
local rid = ARGV[1]
local removed = 0
for i = 1, #entries, 2 do
  local out = {}
  local found = false
  for id in string.gmatch(entries[i + 1], '[^,]+') do
    if id == rid then found = true else out[#out + 1] = id end
  end
  if found then
    removed = removed + 1
    if #out == 0 then
      redis.call('HDEL', KEYS[1], entries[i])
      redis.call('ZREM', KEYS[2], entries[i])
    else
      redis.call('HSET', KEYS[1], entries[i], table.concat(out, ','))
    end
  end
end
return removed
"""


def _record_args(replica_id: int, hashes: Sequence[str], now_ms: int | None = None) -> list[Any]:
    return [
        replica_id,
        int(time.time() * 1000) if now_ms is None else now_ms,
        int(float(settings.LOCALAI_PREFIX_INDEX_TTL) * 1000),
        int(settings.LOCALAI_PREFIX_INDEX_MAX_BLOCKS),
        REPLICAS_PER_BLOCK,
        *hashes,
    ]


async def record(model: str, replica_id: int, hashes: Sequence[str]) -> None:
    """Notes that `replica_id` served a prompt with these block hashes (one script run; logs, never raises)."""
    if not hashes or not circuit.open():
        return
    from redis import RedisError

    try:
        script = _async_known()[2]
        await asyncio.wait_for(
            script(keys=index_keys(model), args=_record_args(replica_id, hashes)), REDIS_TIMEOUT
        )
    except (RedisError, OSError, TimeoutError) as error:
        circuit.failed(error)
        return
    circuit.succeeded()


def record_sync(model: str, replica_id: int, hashes: Sequence[str], *, now_ms: int | None = None) -> int:
    """`record` from sync code (tests, tools), as of `now_ms` (default now): answers the model's block count
    before trimming."""
    with _sync_client() as client:
        args = _record_args(replica_id, hashes, now_ms)
        return int(client.eval(_RECORD_LUA, 2, *index_keys(model), *args))


def _sync_client() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)


def forget_replica(model: str, replica_id: int) -> None:
    """Takes a removed replica out of its model's index (logs, never raises)."""
    if not circuit.open():
        return
    from redis import RedisError

    try:
        with _sync_client() as client:
            client.eval(_FORGET_LUA, 2, *index_keys(model), replica_id)
    except (RedisError, OSError) as error:
        circuit.failed(error)
