"""Routing policies per catalog model (issue 14 item 1): `prefix_cache` (with its balance threshold, a Redis
outage and a replica leaving) and `session` (rendezvous hashing, minimal remapping), through the real gateway,
PostgreSQL, Redis, agents and echo backends."""

from __future__ import annotations

import hashlib
import logging

import httpx
import pytest
import redis

from nodes.models import ModelReplica
from scheduling import routing
from tests.conftest import wait_until
from tests.e2e.gateway_support import place, start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SYSTEM = "You are a careful assistant. " * 40  # ~1,100 characters: several blocks


def chat(
    url: str, model: str, text: str, *, system: str = SYSTEM, headers=None, extra_user: str | None = None
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
        "max_tokens": 4,
    }
    if extra_user is not None:
        body["user"] = extra_user
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer


def served_by(answer: httpx.Response) -> str:
    """`node/model#index`: process keys repeat across nodes."""
    return f"{answer.headers['x-localai-node']}/{answer.headers['x-localai-replica']}"


@pytest.fixture
def cluster(cp_server, start_agents, settings):
    """Three agents; routing headers on; a fresh prefix index and Redis circuit."""
    settings.LOCALAI_EXPOSE_ROUTING_HEADERS = True
    routing.circuit.reset()
    start_agents(3, slots=2)
    yield cp_server
    routing.circuit.reset()


def clear_index(model: str) -> None:
    with redis.Redis.from_url(routing.settings.REDIS_URL) as client:
        client.delete(*routing.index_keys(model))


def replica_ids_in_index(model: str) -> set[int]:
    with redis.Redis.from_url(routing.settings.REDIS_URL) as client:
        values = client.hvals(routing.index_keys(model)[0])
    return {int(item) for value in values for item in value.decode().split(",")}


def key_of(replica: ModelReplica) -> str:
    return f"{replica.node.name}/{replica.model_name}#{replica.replica_index}"


def replica_at(model: str, key: str) -> ModelReplica:
    return next(
        r for r in ModelReplica.objects.select_related("node").filter(model_name=model) if key_of(r) == key
    )


def recorded(model: str, key: str) -> None:
    """Waits until the index holds the replica that served `key` (the record runs after the claim, in the
    background)."""
    replica = replica_at(model, key)
    wait_until(lambda: replica.pk in replica_ids_in_index(model), timeout=10, message=f"{key} in the index")


def test_least_in_flight_rotates_while_prefix_cache_sticks_to_the_replica_holding_the_prefix(cluster):
    ModelConfigFactory(name="lif", routing="least_in_flight")
    ModelConfigFactory(name="pfx", routing="prefix_cache")
    for model in ("lif", "pfx"):
        clear_index(model)
        place(model, 3)
    # least_in_flight: sequential requests go to the least recently used replica, so they rotate.
    assert len({served_by(chat(cluster.url, "lif", f"turn {n}")) for n in range(6)}) == 3
    # prefix_cache: after the first request, every turn with the same system prompt goes where it went.
    first = served_by(chat(cluster.url, "pfx", "turn 0"))
    recorded("pfx", first)
    assert {served_by(chat(cluster.url, "pfx", f"turn {n}")) for n in range(1, 7)} == {first}
    # Another system prompt is routed by load (to a replica that is not the busiest... any), and then sticks.
    other = served_by(chat(cluster.url, "pfx", "hello", system="Another system prompt. " * 40))
    recorded("pfx", other)
    assert {
        served_by(chat(cluster.url, "pfx", f"q{n}", system="Another system prompt. " * 40)) for n in range(4)
    } == {other}
    # A prompt shorter than one block has no prefix to match: routed by load (rotates again).
    assert len({served_by(chat(cluster.url, "pfx", f"q{n}", system="")) for n in range(6)}) > 1
    wait_in_flight_zero("pfx")


def set_in_flight(replica: ModelReplica, value: int, *, after: int) -> None:
    """Sets the replica's in-flight once the units of the requests already answered are given back (the
    gateway releases a unit after the answer has left: a late release would otherwise undo the update)."""
    wait_until(
        lambda: ModelReplica.objects.get(pk=replica.pk).in_flight == after,
        timeout=20,
        message=f"in-flight of {key_of(replica)} back to {after}",
    )
    ModelReplica.objects.filter(pk=replica.pk).update(in_flight=value)


def test_the_balance_threshold_sends_to_the_least_loaded_when_the_prefix_holder_is_too_busy(
    cluster, settings
):
    settings.LOCALAI_PREFIX_BALANCE_THRESHOLD = 2
    ModelConfigFactory(name="pfx-bal", routing="prefix_cache")
    clear_index("pfx-bal")
    place("pfx-bal", 3)
    holder = served_by(chat(cluster.url, "pfx-bal", "turn 0"))
    recorded("pfx-bal", holder)
    assert served_by(chat(cluster.url, "pfx-bal", "turn 1")) == holder
    replica = replica_at("pfx-bal", holder)
    # In-flight of the holder exactly at the threshold above the least loaded (0): still the holder.
    set_in_flight(replica, 2, after=0)
    assert served_by(chat(cluster.url, "pfx-bal", "turn 2")) == holder
    # Beyond it: the least loaded replica instead.
    set_in_flight(replica, 3, after=2)
    elsewhere = served_by(chat(cluster.url, "pfx-bal", "turn 3"))
    assert elsewhere != holder
    recorded("pfx-bal", elsewhere)
    # That replica now holds the prefix too: with the first holder still busy, it is preferred over the third.
    assert served_by(chat(cluster.url, "pfx-bal", "turn 4")) == elsewhere
    ModelReplica.objects.filter(pk=replica.pk).update(in_flight=0)


def home_order(model: str, system: str) -> list[str]:
    """The model's replicas in the rendezvous order of the prompt's home: highest `md5(first block hash:replica
    id)` first (the claim statement's order for a prompt the index does not match)."""
    fields = {"Messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}]}
    first = routing.block_hashes(routing.rendered_prompt(fields))[0]
    replicas = ModelReplica.objects.select_related("node").filter(model_name=model)
    ranked = sorted(replicas, key=lambda r: hashlib.md5(f"{first}:{r.pk}".encode()).hexdigest(), reverse=True)
    return [key_of(replica) for replica in ranked]


def test_an_unmatched_prompt_goes_to_the_least_loaded_and_at_equal_load_to_its_home(cluster):
    ModelConfigFactory(name="pfx-home", routing="prefix_cache")
    clear_index("pfx-home")
    place("pfx-home", 3)
    chat(cluster.url, "pfx-home", "hi", system="")  # this process learns the policy (no block: by load)

    def ask(text: str, system: str = SYSTEM) -> str:
        """Where the request went, once its record is in the index (so that a `clear_index` after it holds)."""
        wait_in_flight_zero("pfx-home")  # every replica equally loaded (the last answer's unit given back)
        key = served_by(chat(cluster.url, "pfx-home", text, system=system))
        recorded("pfx-home", key)
        return key

    # At equal load, each prompt the index does not know goes to its home (the claim statement's rendezvous
    # order by its first block), not to the least recently used replica.
    for n in range(6):
        system = f"System prompt number {n}. " * 40
        assert ask("turn 0", system) == home_order("pfx-home", system)[0]
    # Its index entries gone (expired), a prompt goes back to the same home; so does a prompt that shares only
    # its first block (its later blocks differ).
    first, second, third = home_order("pfx-home", SYSTEM)
    clear_index("pfx-home")
    assert ask("turn 1") == first
    clear_index("pfx-home")
    assert ask("turn 2", SYSTEM[:300] + "Other. " * 100) == first
    # Load comes first: the home busier than the least loaded (by 1, well within the balance threshold of a
    # matched prefix) is passed over for the least loaded replicas, and among those the prompt's next in
    # rendezvous order is taken.
    clear_index("pfx-home")
    set_in_flight(replica_at("pfx-home", first), 1, after=0)
    served = served_by(chat(cluster.url, "pfx-home", "turn 3"))
    assert served == second
    recorded("pfx-home", served)
    clear_index("pfx-home")
    set_in_flight(replica_at("pfx-home", second), 1, after=0)
    assert served_by(chat(cluster.url, "pfx-home", "turn 4")) == third
    for key in (first, second):
        ModelReplica.objects.filter(pk=replica_at("pfx-home", key).pk).update(in_flight=0)


def test_redis_down_routes_by_load_logs_once_and_answers(cluster, settings, caplog):
    ModelConfigFactory(name="pfx-down", routing="prefix_cache")
    clear_index("pfx-down")
    place("pfx-down", 3)
    holder = served_by(chat(cluster.url, "pfx-down", "turn 0"))
    recorded("pfx-down", holder)
    assert served_by(chat(cluster.url, "pfx-down", "turn 1")) == holder
    with socket_closed_port() as port:
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        with caplog.at_level(logging.WARNING, logger="scheduling.routing"):
            served = {served_by(chat(cluster.url, "pfx-down", f"turn {n}")) for n in range(2, 8)}
            routing.circuit.down_until = 0  # the retry pause over: Redis is asked (and fails) again
            served.add(served_by(chat(cluster.url, "pfx-down", "turn 8")))
    assert len(served) == 3  # least in-flight: the rotation
    outages = [record for record in caplog.records if "Redis is unavailable" in record.getMessage()]
    assert len(outages) == 1


class socket_closed_port:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


def test_a_replica_that_leaves_leaves_the_index_and_its_prefix_goes_elsewhere(cluster):
    from nodes.services import replica_remove

    ModelConfigFactory(name="pfx-gone", routing="prefix_cache")
    clear_index("pfx-gone")
    place("pfx-gone", 3)
    holder = served_by(chat(cluster.url, "pfx-gone", "turn 0"))
    recorded("pfx-gone", holder)
    assert served_by(chat(cluster.url, "pfx-gone", "turn 1")) == holder
    replica = replica_at("pfx-gone", holder)
    replica_remove(replica_id=replica.pk)
    wait_until(
        lambda: replica.pk not in replica_ids_in_index("pfx-gone"),
        timeout=10,
        message="the removed replica to leave the index",
    )
    moved = served_by(chat(cluster.url, "pfx-gone", "turn 2"))
    assert moved != holder
    recorded("pfx-gone", moved)
    assert {served_by(chat(cluster.url, "pfx-gone", f"turn {n}")) for n in range(3, 6)} == {moved}


def test_session_keeps_each_session_on_one_replica_and_remaps_minimally(cluster):
    from nodes.services import replica_remove

    ModelConfigFactory(name="sess", routing="session")
    place("sess", 3)
    sessions = [f"session-{n}" for n in range(24)]

    def mapping() -> dict[str, str]:
        return {
            session: served_by(chat(cluster.url, "sess", "hi", system="", headers={"X-Session-Id": session}))
            for session in sessions
        }

    before = mapping()
    assert mapping() == before  # stable
    assert len(set(before.values())) == 3  # spread over every replica
    # The body's `user` is the key when there is no header.
    for session in sessions[:4]:
        assert served_by(chat(cluster.url, "sess", "hi", system="", extra_user=session)) == before[session]
    # A replica leaves: only its sessions move.
    gone = ModelReplica.objects.select_related("node").filter(model_name="sess").order_by("id").first()
    replica_remove(replica_id=gone.pk)
    after = mapping()
    for session in sessions:
        if before[session] == key_of(gone):
            assert after[session] != key_of(gone)
        else:
            assert after[session] == before[session]
    # A replica comes: a session either stays or moves to the new one.
    (new,) = place("sess", 1)
    again = mapping()
    moved = {session for session in sessions if again[session] != after[session]}
    assert moved, "some sessions move to the new replica"
    assert {again[session] for session in moved} == {f"{new.node_name}/sess#{new.replica_index}"}
    # Without a key, requests are routed by load.
    assert len({served_by(chat(cluster.url, "sess", f"t{n}", system="")) for n in range(6)}) > 1


def test_a_bad_session_key_is_a_400(cluster):
    ModelConfigFactory(name="sess-bad", routing="session")
    body = {"model": "sess-bad", "messages": [{"role": "user", "content": "hi"}], "user": 42}
    answer = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_session"
    long = httpx.post(
        f"{cluster.url}/v1/chat/completions",
        json={**body, "user": "x"},
        headers={"X-Session-Id": "k" * 300},
        timeout=60,
    )
    assert long.status_code == 400 and long.json()["error"]["code"] == "invalid_session"
    assert not ModelReplica.objects.filter(model_name="sess-bad").exists()  # nothing was loaded
