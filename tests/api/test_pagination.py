"""`GET /api/nodes` and `GET /api/models` answer pages: `{count, next, previous, results}`, 100 by default,
`?page_size` up to 1000, in a constant number of queries."""

from __future__ import annotations

import pytest

from scheduling.models import ModelConfig
from tests.factories import NodeFactory, NodeLabelFactory

pytestmark = pytest.mark.django_db


def test_nodes_are_listed_in_pages(api, django_assert_max_num_queries):
    for i in range(105):
        node = NodeFactory(name=f"node-{i:03d}")
        NodeLabelFactory(node=node, key="env", value="prod")
    first = api.get("/api/nodes").json()
    assert first["count"] == 105 and first["previous"] is None
    assert [n["name"] for n in first["results"]] == [f"node-{i:03d}" for i in range(100)]
    assert first["next"].endswith("/api/nodes?page=2")
    second = api.get("/api/nodes", {"page": 2}).json()
    assert [n["name"] for n in second["results"]] == [f"node-{i:03d}" for i in range(100, 105)]
    assert second["next"] is None and second["previous"]
    # A bigger page costs the same queries: the key, the count, the nodes with their counts, their labels.
    with django_assert_max_num_queries(4):
        whole = api.get("/api/nodes", {"page_size": 1000}).json()
    assert len(whole["results"]) == 105 and whole["next"] is None


def test_page_size_is_capped_and_a_bad_page_is_a_clean_404(api):
    for i in range(3):
        NodeFactory(name=f"n{i}")
    assert len(api.get("/api/nodes", {"page_size": 10**9}).json()["results"]) == 3
    response = api.get("/api/nodes", {"page": 99})
    assert response.status_code == 404
    assert set(response.json()) == {"error", "details"}
    assert api.get("/api/nodes", {"page": "x\x00"}).status_code == 404


def test_models_are_listed_in_pages(api):
    ModelConfig.objects.bulk_create([ModelConfig(name=f"m-{i:04d}") for i in range(1001)])
    page = api.get("/api/models", {"page_size": 5000}).json()
    assert page["count"] == 1001 and len(page["results"]) == 1000  # at most 1000 per page
    assert page["results"][0]["name"] == "m-0000"
    last = api.get(page["next"]).json()
    assert [m["name"] for m in last["results"]] == ["m-1000"]
