"""`/metrics` cannot be blown up from outside (issue 11, item 4): the gateway's metrics are labelled with a
catalog model's name only once the request authenticated and its model was found; every other request counts
under `unknown`, so random model names leave the label set (and the page) as it was."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from nodes.apikeys import api_key_create
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SAMPLE = re.compile(r'^localai_cluster_gateway_\w+\{[^}]*model="([^"]*)"', re.MULTILINE)


def model_labels(text: str) -> set[str]:
    return set(SAMPLE.findall(text))


def unknown_count(text: str, status: str) -> float:
    pattern = (
        r'^localai_cluster_gateway_requests_total\{endpoint="chat.completions",model="unknown",'
        rf'status="{status}"\}} (\S+)$'
    )
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_random_model_names_do_not_grow_the_metrics(cp_server):
    ModelConfigFactory(name="catalogued")  # no node: its requests answer 503 no_capacity
    with httpx.Client(base_url=cp_server.url, timeout=30) as client:
        before = client.get("/metrics").text
        names = [f"rnd-{uuid.uuid4().hex}" for _ in range(300)]
        # The gateway is open (no key yet): unknown models answer 404.
        for name in names[:150]:
            body = {"model": name, "messages": [{"role": "user", "content": "x"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 404
            assert client.post("/v1/embeddings", json={"model": name, "input": "x"}).status_code == 404
        assert (
            client.post(
                "/v1/chat/completions",
                json={"model": "catalogued", "messages": [{"role": "user", "content": "x"}]},
            ).status_code
            == 503
        )
        # Once a key exists, anonymous requests answer 401, whatever model they name (a catalogued one too).
        api_key_create(name="client")
        for name in [*names[150:], "catalogued"]:
            body = {"model": name, "messages": [{"role": "user", "content": "x"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 401
        after = client.get("/metrics").text

    labels = model_labels(after)
    assert not {label for label in labels if label.startswith("rnd-")}
    assert labels <= model_labels(before) | {"unknown", "catalogued"}
    assert unknown_count(after, "404") - unknown_count(before, "404") == 150
    assert unknown_count(after, "401") - unknown_count(before, "401") == 151
    # The page grew by a handful of series, not by one per name (it grew by megabytes before).
    assert len(after) - len(before) < 20_000
