"""The audit page `/ui/audit/` and the nodes drawer's "Recent changes" (issue 17 item 5): the page door
records the signed-in user; the page filters and pages the trail in a fixed number of queries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from audit.models import AuditEntry
from scheduling.loadfailures import LoadAttempt, load_failure_record
from tests.factories import AuditEntryFactory, NodeFactory, ReplicaFactory
from tests.ui.conftest import HTMX

pytestmark = pytest.mark.django_db


def entry(minutes_ago=0, **fields) -> AuditEntry:
    approved = {"approved_at": "2026-01-01T00:00:00Z"}
    values = {
        "before": {"status": "healthy", **approved},
        "after": {"status": "draining", **approved},
        **fields,
    }
    return AuditEntryFactory(at=timezone.now() - timedelta(minutes=minutes_ago), **values)


def test_page_door_records_the_signed_in_user(staff_client: Client, staff_user) -> None:
    node = NodeFactory(name="gpu-a")
    assert staff_client.post(f"/ui/nodes/{node.pk}/drain", **HTMX).status_code == 200
    assert staff_client.post(f"/ui/nodes/{node.pk}/capacity", {"value": "2"}, **HTMX).status_code == 200
    assert (
        staff_client.post(f"/ui/nodes/{node.pk}/labels", {"key": "zone", "value": "eu"}, **HTMX).status_code
        == 200
    )
    replica = ReplicaFactory(node=node, model_name="m")
    assert staff_client.post(f"/ui/nodes/{node.pk}/replicas/{replica.pk}/unload", **HTMX).status_code == 200
    entries = list(AuditEntry.objects.order_by("id"))
    assert [e.action for e in entries] == ["node.drain", "node.override_set", "node.labels", "node.unload"]
    assert {(e.actor_kind, e.actor_name, e.actor_id, e.via) for e in entries} == {
        ("user", "ops", str(staff_user.pk), "page")
    }
    drain = entries[0]
    assert (drain.before["status"], drain.after["status"]) == ("healthy", "draining")
    assert (entries[2].before, entries[2].after) == ({"labels": {}}, {"labels": {"zone": "eu"}})


def test_keys_and_scheduling_pages_are_audited_too(staff_client: Client) -> None:
    assert (
        staff_client.post("/ui/keys/create", {"name": "frontend", "scope": "inference"}, **HTMX).status_code
        == 200
    )
    assert AuditEntry.objects.get(action="api_key.create").via == "page"
    answer = staff_client.post(
        "/ui/scheduling/save",
        {"model_name": "m", "mode": "autoscale", "min_replicas": "1", "max_replicas": "2"},
        **HTMX,
    )
    assert answer.status_code == 200, answer.content[:2000]
    rule = AuditEntry.objects.get(action="rule.create")
    assert rule.via == "page" and rule.before is None and rule.after["max_replicas"] == 2
    load_failure_record(attempt=LoadAttempt("m"), error="boom")
    assert staff_client.post("/ui/scheduling/retry-load", {"model_name": "m"}, **HTMX).status_code == 200
    retry = AuditEntry.objects.get(action="model.retry_load")
    assert (retry.actor_name, retry.via, retry.target_id) == ("ops", "page", "m")
    assert staff_client.post("/ui/scheduling/delete", {"model_name": "m"}, **HTMX).status_code == 200
    assert AuditEntry.objects.get(action="rule.delete").before["max_replicas"] == 2


def test_the_page_lists_filters_and_shows_before_after(staff_client: Client) -> None:
    entry(30)
    entry(
        20, actor_name="bob", action="node.resume", before={"status": "draining"}, after={"status": "healthy"}
    )
    entry(10, action="model.create", target_type="model", target_id="m", target_name="m", before=None,
          after={"backend": "echo"})  # fmt: skip
    html = staff_client.get("/ui/audit/").content.decode()
    assert "<html" in html and 'aria-current="page">Audit' in html
    assert html.count("data-audit-entry=") == 3
    assert (
        '<span class="audit-old">healthy</span>' in html and '<span class="audit-new">draining</span>' in html
    )
    assert "approved_at" not in html.split("data-audit-entry=")[-1]  # unchanged fields are not listed
    fragment = staff_client.get("/ui/audit/?actor=bob", **HTMX).content.decode()
    assert "<html" not in fragment and fragment.count("data-audit-entry=") == 1 and "node.resume" in fragment
    assert staff_client.get("/ui/audit/?target_type=model").content.decode().count("data-audit-entry=") == 1
    bad = staff_client.get("/ui/audit/?since=yesterday", **HTMX).content.decode()
    assert 'role="alert"' in bad and "since" in bad


def test_pages_of_fifty(staff_client: Client) -> None:
    for index in range(55):
        entry(index)
    html = staff_client.get("/ui/audit/").content.decode()
    assert html.count("data-audit-entry=") == 50 and "page 1 of 2" in html and ">Older<" in html
    assert staff_client.get("/ui/audit/?page=2").content.decode().count("data-audit-entry=") == 5


def test_staff_only(client: Client, plain_client: Client) -> None:
    assert client.get("/ui/audit/").status_code == 302
    assert plain_client.get("/ui/audit/").status_code == 403


def test_page_queries_do_not_grow_with_entries(staff_client: Client, django_assert_max_num_queries) -> None:
    entry(1)
    with django_assert_max_num_queries(4):  # session, user, count, the page
        staff_client.get("/ui/audit/")
    for index in range(120):
        entry(index, action="node.resume" if index % 2 else "node.drain")
    with django_assert_max_num_queries(4):
        staff_client.get("/ui/audit/")
    with django_assert_max_num_queries(4):
        staff_client.get("/ui/audit/?page=2&actor=alice", **HTMX)


def test_the_drawer_shows_the_nodes_recent_changes(staff_client: Client) -> None:
    node = NodeFactory(name="gpu-z")
    staff_client.post(f"/ui/nodes/{node.pk}/drain", **HTMX)
    entry(5, target_id="someone-else")
    drawer = staff_client.get(f"/ui/nodes/{node.pk}/", **HTMX).content.decode()
    assert "Recent changes" in drawer and drawer.count("data-audit-entry=") == 1
    assert 'data-action="node.drain"' in drawer and "by <strong>ops</strong>" in drawer
    assert f"/ui/audit/?target_type=node&amp;target_id={node.pk}" in drawer
    fragment = staff_client.get(f"/ui/nodes/{node.pk}/audit", **HTMX).content.decode()
    assert (
        fragment.strip().startswith(f'<div id="node-{node.pk}-audit"')
        and 'data-action="node.drain"' in fragment
    )
    plain = staff_client.get(f"/ui/nodes/{node.pk}/audit")
    assert plain.status_code == 302 and plain["Location"].endswith(f"target_id={node.pk}")
