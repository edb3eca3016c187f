"""The prefix index of `prefix_cache` routing (scheduling.routing) on the real Redis: chained block hashes,
longest matches, and memory bounded by the TTL and the per-model cap under any traffic."""

from __future__ import annotations

import time

import pytest
import redis

from scheduling import routing


@pytest.fixture
def index(settings):
    settings.LOCALAI_PREFIX_INDEX_MAX_BLOCKS = 16
    settings.LOCALAI_PREFIX_INDEX_TTL = 60
    model = f"idx-{time.monotonic_ns()}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield model, client
    client.delete(*routing.index_keys(model))
    client.close()


def test_block_hashes_are_chained_over_whole_blocks():
    a = routing.block_hashes("x" * 48 + "yy", 16)
    b = routing.block_hashes("x" * 48 + "zz", 16)
    assert len(a) == 3 and a == b  # the last 2 chars are no whole block; the first 3 blocks agree
    c = routing.block_hashes("w" + "x" * 47, 16)
    assert len(c) == 3 and not set(a) & set(c)  # a different first block changes every later hash
    assert routing.block_hashes("short", 16) == []
    assert len(routing.block_hashes("x" * 100_000, 16)) == routing.MAX_BLOCKS


def test_rendered_prompt_keeps_the_messages_order_and_roles():
    one = routing.rendered_prompt(
        {"Messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}
    )
    two = routing.rendered_prompt(
        {"Messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    )
    assert one != two and one.startswith("system")
    assert routing.rendered_prompt({"Prompt": "hello"}) == "hello"


def test_longest_match_first_and_most_recent_replicas_kept(index):
    model, client = index
    hashes = routing.block_hashes("p" * 64, 16)  # 4 blocks
    routing.record_sync(model, 7, hashes[:2])
    routing.record_sync(model, 9, hashes)
    entries = client.hmget(routing.index_keys(model)[0], hashes)
    assert routing.best_matches(hashes, entries) == [(9, 4), (7, 2)]
    for replica in range(20, 20 + routing.REPLICAS_PER_BLOCK + 2):
        routing.record_sync(model, replica, hashes[:1])
    first = client.hget(routing.index_keys(model)[0], hashes[0]).decode().split(",")
    assert first == [str(r) for r in range(25, 21, -1)]  # the most recent REPLICAS_PER_BLOCK, newest first


def test_the_index_stays_within_its_cap_and_expires(index):
    model, client = index
    blocks, lru = routing.index_keys(model)
    for n in range(200):  # 800 distinct blocks recorded
        routing.record_sync(model, n % 5, routing.block_hashes(f"{n:08d}" * 8, 16))
        assert client.hlen(blocks) <= 16 and client.zcard(lru) <= 16
    assert client.hlen(blocks) == 16 and client.zcard(lru) == 16
    assert 0 < client.pttl(blocks) <= 60_000 and 0 < client.pttl(lru) <= 60_000
    # Entries older than the TTL are dropped at the next record.
    now = int(time.time() * 1000)
    routing.record_sync(model, 1, routing.block_hashes("fresh" * 10, 16), now_ms=now + 61_000)
    assert client.hlen(blocks) == 3 and client.zcard(lru) == 3


def test_forget_replica_takes_it_out_of_every_entry(index):
    model, client = index
    hashes = routing.block_hashes("q" * 48, 16)
    routing.record_sync(model, 3, hashes)
    routing.record_sync(model, 4, hashes[:1])
    routing.forget_replica(model, 3)
    entries = client.hmget(routing.index_keys(model)[0], hashes)
    assert routing.best_matches(hashes, entries) == [(4, 1)]
    assert client.hlen(routing.index_keys(model)[0]) == 1 and client.zcard(routing.index_keys(model)[1]) == 1


def test_session_keys():
    assert routing.session_key("abc", {"user": "u"}) == "abc"
    assert routing.session_key(None, {"user": "u"}) == "u"
    assert routing.session_key(None, {}) == ""
    with pytest.raises(routing.BadSessionKey):
        routing.session_key(None, {"user": ["x"]})
    with pytest.raises(routing.BadSessionKey):
        routing.session_key("k" * 300, {})
