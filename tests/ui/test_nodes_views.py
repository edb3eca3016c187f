"""The nodes page and its HTMX fragments (BEHAVIOUR §8, SCENARIOS 172-177, 181)."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

from nodes import services
from nodes.choices import LABEL_REPLICA_SLOTS, NodeStatus, NodeType
from nodes.models import ModelReplica, Node, NodeLabel
from tests.factories import GiB, NodeFactory, NodeLabelFactory, ReplicaFactory
from tests.ui.conftest import HTMX

pytestmark = pytest.mark.django_db


def toast_of(response) -> dict:
    return json.loads(response["HX-Trigger"])["toast"]


def summary_html(html: str, node: Node) -> str:
    match = re.search(rf'<tr id="node-{node.pk}-summary".*?</tr>', html, re.S)
    assert match, f"no summary row for {node.name}"
    return match.group(0)


# --- page and poll fragment ---------------------------------------------------------------------------


def test_full_page_and_poll_fragment(staff_client: Client) -> None:
    node = NodeFactory(name="alpha")
    page = staff_client.get("/ui/nodes/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "<html" in html and 'id="nodes-live"' in html and 'hx-trigger="every 5s' in html
    assert "htmx-2.0.11.min.js" in html and "/static/css/app.css" in html
    fragment = staff_client.get("/ui/nodes/", **HTMX).content.decode()
    assert "<html" not in fragment and 'id="nodes-poll"' not in fragment
    assert 'id="node-stats"' in fragment and f'id="node-{node.pk}-summary"' in fragment
    # The drawer row of every node is preserved by id across polls, so an open drawer stays open.
    assert f'<tr id="node-{node.pk}-drawer" class="node-drawer" hx-preserve="true"' in fragment


def test_poll_keeps_queries_fixed(staff_client: Client, django_assert_max_num_queries) -> None:
    def populate(count: int) -> None:
        for _ in range(count):
            node = NodeFactory(worker_max_replicas_per_model=2)
            NodeLabelFactory(node=node)
            NodeLabelFactory(node=node)
            ReplicaFactory(node=node, model_name="m", replica_index=0)
            ReplicaFactory(node=node, model_name="m", replica_index=1)

    populate(2)
    # session, user, two for the stat cards, two for the rows and their labels
    with django_assert_max_num_queries(6):
        staff_client.get("/ui/nodes/", **HTMX)
    populate(20)
    with django_assert_max_num_queries(6):
        assert staff_client.get("/ui/nodes/", **HTMX).content.decode().count('class="node-row') == 22
    with django_assert_max_num_queries(6):
        staff_client.get("/ui/nodes/")


def test_slot_badges_agent_and_approve_button(staff_client: Client) -> None:
    one = NodeFactory(name="one", worker_max_replicas_per_model=1)
    four = NodeFactory(name="four", worker_max_replicas_per_model=1, max_replicas_override=4)
    agent = NodeFactory(name="agent-x", node_type=NodeType.AGENT)
    pending = NodeFactory(name="newbie", status=NodeStatus.PENDING, approved_at=None)
    html = staff_client.get("/ui/nodes/").content.decode()
    assert '<span class="slot-badge muted"' in summary_html(html, one) and "1× slots" in summary_html(
        html, one
    )
    assert '<span class="slot-badge accent"' in summary_html(html, four) and "4× slots" in summary_html(
        html, four
    )
    assert "slots" not in summary_html(html, agent)
    assert ">Approve</button>" in summary_html(html, pending)
    assert ">Approve</button>" not in summary_html(html, one)


def test_label_strip_shows_five_then_more_and_hides_replica_slots(staff_client: Client) -> None:
    node = NodeFactory()
    NodeLabelFactory(node=node, key=LABEL_REPLICA_SLOTS, value="2")
    for index in range(7):
        NodeLabelFactory(node=node, key=f"k{index}", value=f"v{index}")
    html = staff_client.get("/ui/nodes/").content.decode()
    row = summary_html(html, node)
    assert re.findall(r'class="chip chip-sm">(k\d=v\d)<', row) == [f"k{i}=v{i}" for i in range(5)]
    assert "+2 more" in row and LABEL_REPLICA_SLOTS not in row
    drawer = staff_client.get(f"/ui/nodes/{node.pk}/", **HTMX).content.decode()
    assert "k6=v6" in drawer and LABEL_REPLICA_SLOTS not in drawer


def test_stat_cards_and_reserved_vram(staff_client: Client) -> None:
    NodeFactory(status=NodeStatus.HEALTHY, total_vram=24 * GiB, available_vram=8 * GiB, reserved_vram=2 * GiB)
    NodeFactory(status=NodeStatus.HEALTHY, total_vram=16 * GiB, available_vram=16 * GiB)
    NodeFactory(status=NodeStatus.UNHEALTHY)
    NodeFactory(status=NodeStatus.OFFLINE)
    draining = NodeFactory(status=NodeStatus.DRAINING)
    NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    ReplicaFactory(node=draining, in_flight=3)
    ReplicaFactory(node=draining, model_name="n", state="loading")
    html = staff_client.get("/ui/nodes/", **HTMX).content.decode().replace("\xa0", " ")

    def stat(name: str) -> str:
        return re.search(rf'data-stat="{name}">(.*?)</span>', html, re.S).group(1).strip()

    assert [stat(name) for name in ("total", "healthy", "unhealthy", "draining", "pending")] == [
        "6",
        "2",
        "2",
        "1",
        "1",
    ]
    assert stat("loaded") == "1" and stat("in-flight") == "3"
    assert "16.0 GB" in stat("vram") and "40.0 GB" in stat("vram")  # used 16 of 40
    assert "2.0 GB reserved" in html and "+2.0 GB reserved" in html


# --- drawer -----------------------------------------------------------------------------------------------


def test_drawer_rep_pills_logs_links_and_unload_of_exactly_one(staff_client: Client) -> None:
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, model_name="M", replica_index=0)
    m1 = ReplicaFactory(node=node, model_name="M", replica_index=1, in_flight=2)
    ReplicaFactory(node=node, model_name="N", replica_index=0)
    drawer = staff_client.get(f"/ui/nodes/{node.pk}/", **HTMX)
    html = drawer.content.decode()
    assert "<html" not in html
    assert "rep 0</span>" in html and "rep 1</span>" in html and html.count('class="pill pill-rep"') == 2
    assert (
        f'href="/ui/nodes/{node.pk}/logs/M%230"' in html and f'href="/ui/nodes/{node.pk}/logs/N%230"' in html
    )
    assert "It is serving 2 requests right now: they will be cut off." in html
    assert '<details class="node-manage">' in html  # Manage is closed by default

    response = staff_client.post(f"/ui/nodes/{node.pk}/replicas/{m1.pk}/unload", **HTMX)
    assert response.status_code == 200
    assert toast_of(response) == {"message": f"Unloaded M#1 from {node.name}.", "level": "success"}
    assert sorted(ModelReplica.objects.values_list("model_name", "replica_index")) == [("M", 0), ("N", 0)]
    assert 'data-process-key="M#1"' not in response.content.decode()
    again = staff_client.post(f"/ui/nodes/{node.pk}/replicas/{m1.pk}/unload", **HTMX)
    assert again.status_code == 404 and toast_of(again)["level"] == "error"


def test_drawer_full_page_opens_it(staff_client: Client) -> None:
    node = NodeFactory()
    other = NodeFactory()
    html = staff_client.get(f"/ui/nodes/{node.pk}/").content.decode()
    assert "<html" in html and "Loaded replicas" in html
    assert re.search(rf'<tr id="node-{node.pk}-drawer" class="node-drawer" hx-preserve="true" >', html)
    assert re.search(rf'<tr id="node-{other.pk}-drawer" class="node-drawer" hx-preserve="true" hidden>', html)
    assert staff_client.get("/ui/nodes/6f0c1b1e-0000-4000-8000-000000000000/").status_code == 404


def test_drawer_queries_fixed(staff_client: Client, django_assert_max_num_queries) -> None:
    node = NodeFactory(worker_max_replicas_per_model=8)
    for index in range(8):
        ReplicaFactory(node=node, model_name="m", replica_index=index)
        NodeLabelFactory(node=node)
        services.node_override_set(node=node, value=8 + index)  # an audit entry each
    # + the decisions that placed the replicas: one query for all; + the node's recent audit entries: one
    with django_assert_max_num_queries(7):
        staff_client.get(f"/ui/nodes/{node.pk}/", **HTMX)
    with django_assert_max_num_queries(5):
        staff_client.get(f"/ui/nodes/{node.pk}/replicas", **HTMX)


# --- capacity -------------------------------------------------------------------------------------------


def test_capacity_override_set_and_reset(staff_client: Client) -> None:
    node = NodeFactory(worker_max_replicas_per_model=1)
    ReplicaFactory(node=node, model_name="m")
    response = staff_client.post(f"/ui/nodes/{node.pk}/capacity", {"value": "3"}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    node.refresh_from_db()
    assert node.max_replicas_override == 3
    assert 'data-override title="Set by an admin; the worker reports 1">override</span>' in html
    summary = summary_html(html, node)
    assert (
        'hx-swap-oob="true"' in summary
        and '<span class="slot-badge accent"' in summary
        and "3× slots" in summary
    )
    assert NodeLabel.objects.get(node=node, key=LABEL_REPLICA_SLOTS).value == "3"
    assert toast_of(response)["message"].startswith(f"{node.name}: 3 replica slot")
    # the soft confirm knows how many replicas of one model are loaded here
    assert 'data-loaded-most="1" data-loaded-model="m"' in html

    reset = staff_client.post(f"/ui/nodes/{node.pk}/capacity/reset", **HTMX)
    node.refresh_from_db()
    assert reset.status_code == 200 and node.max_replicas_override is None
    assert ">override</span>" not in reset.content.decode()
    assert '<span class="slot-badge muted"' in summary_html(reset.content.decode(), node)


@pytest.mark.parametrize("value", ["0", "-2", "abc", ""])
def test_capacity_refuses_bad_values_inline(staff_client: Client, value: str) -> None:
    node = NodeFactory()
    response = staff_client.post(f"/ui/nodes/{node.pk}/capacity", {"value": value}, **HTMX)
    assert response.status_code == 422
    html = response.content.decode()
    assert 'class="field-error"' in html and 'aria-invalid="true"' in html
    assert '<form class="cap-form"  hx-post' in html  # the editor stays open with the error
    assert toast_of(response)["level"] == "error"
    node.refresh_from_db()
    assert node.max_replicas_override is None


# --- labels -------------------------------------------------------------------------------------------


def test_label_add_and_remove(staff_client: Client) -> None:
    node = NodeFactory()
    added = staff_client.post(f"/ui/nodes/{node.pk}/labels", {"key": "zone", "value": "eu-1"}, **HTMX)
    assert added.status_code == 200
    assert NodeLabel.objects.get(node=node, key="zone").value == "eu-1"
    assert "zone=eu-1" in summary_html(added.content.decode(), node)
    assert toast_of(added)["message"] == f"{node.name}: label zone=eu-1 set."
    removed = staff_client.post(f"/ui/nodes/{node.pk}/labels/remove", {"key": "zone"}, **HTMX)
    assert removed.status_code == 200 and not NodeLabel.objects.filter(node=node, key="zone").exists()
    assert "zone=eu-1" not in removed.content.decode()


@pytest.mark.parametrize("key", [LABEL_REPLICA_SLOTS, "gpu.vendor", "", "a=b"])
def test_label_editor_refuses_auto_and_bad_keys(staff_client: Client, key: str) -> None:
    node = NodeFactory()
    response = staff_client.post(f"/ui/nodes/{node.pk}/labels", {"key": key, "value": "9"}, **HTMX)
    assert response.status_code == 422 and 'class="field-error"' in response.content.decode()
    assert not NodeLabel.objects.filter(node=node).exists()


def test_removing_an_auto_label_reports_the_server_error(staff_client: Client) -> None:
    node = NodeFactory()
    NodeLabelFactory(node=node, key=LABEL_REPLICA_SLOTS, value="1")
    response = staff_client.post(f"/ui/nodes/{node.pk}/labels/remove", {"key": LABEL_REPLICA_SLOTS}, **HTMX)
    assert response.status_code == 400 and "managed by the control plane" in toast_of(response)["message"]


# --- node actions -----------------------------------------------------------------------------------------


def test_approve_pending_node(staff_client: Client) -> None:
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    response = staff_client.post(f"/ui/nodes/{node.pk}/approve", **HTMX)
    assert response.status_code == 200
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY and node.approved_at is not None
    html = response.content.decode()
    assert html.startswith(f'\n<tbody id="node-{node.pk}"') or f'<tbody id="node-{node.pk}"' in html
    assert (
        ">Approve</button>" not in html
        and 'id="node-stats" class="stats"' in html
        and 'hx-swap-oob="true"' in html
    )
    assert toast_of(response) == {"message": f"Node {node.name} approved.", "level": "success"}


def test_approving_a_healthy_node_reports_the_conflict(staff_client: Client) -> None:
    node = NodeFactory()
    response = staff_client.post(f"/ui/nodes/{node.pk}/approve", **HTMX)
    assert response.status_code == 409
    assert toast_of(response) == {
        "message": f"Cannot approve node {node.name}: it is healthy.",
        "level": "error",
    }


def test_drain_resume_and_remove(staff_client: Client) -> None:
    node = NodeFactory()
    assert staff_client.post(f"/ui/nodes/{node.pk}/drain", **HTMX).status_code == 200
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING
    html = staff_client.get("/ui/nodes/").content.decode()
    assert ">Resume</button>" in summary_html(html, node) and ">Drain</button>" not in summary_html(
        html, node
    )
    assert staff_client.post(f"/ui/nodes/{node.pk}/resume", **HTMX).status_code == 200
    node.refresh_from_db()
    assert node.status == NodeStatus.HEALTHY
    assert staff_client.post(f"/ui/nodes/{node.pk}/resume", **HTMX).status_code == 409
    removed = staff_client.post(f"/ui/nodes/{node.pk}/delete", **HTMX)
    assert removed.status_code == 200 and not Node.objects.filter(pk=node.pk).exists()
    assert toast_of(removed)["message"] == f"Node {node.name} removed."


def test_plain_post_redirects_with_a_message(staff_client: Client) -> None:
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    response = staff_client.post(f"/ui/nodes/{node.pk}/approve", follow=True)
    assert response.redirect_chain == [("/ui/nodes/", 302)]
    assert f"Node {node.name} approved." in response.content.decode()


# --- access -----------------------------------------------------------------------------------------------

PAGES = ["/ui/nodes/", "/ui/scheduling/", "/ui/scheduling/form"]


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_users_go_to_the_login_page(client: Client, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/?next=")
    htmx = client.get(url, **HTMX)
    assert htmx.status_code == 401 and htmx["HX-Redirect"].startswith("/admin/login/?next=")


@pytest.mark.parametrize("url", PAGES)
def test_non_staff_users_are_refused(plain_client: Client, url: str) -> None:
    assert plain_client.get(url).status_code == 403


def test_node_urls_are_staff_only(plain_client: Client, client: Client) -> None:
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    for url in (f"/ui/nodes/{node.pk}/", f"/ui/nodes/{node.pk}/logs/m%230"):
        assert plain_client.get(url).status_code == 403
    assert plain_client.post(f"/ui/nodes/{node.pk}/approve").status_code == 403
    assert client.post(f"/ui/nodes/{node.pk}/approve").status_code == 302
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING


def test_posts_need_the_csrf_token(staff_user) -> None:
    node = NodeFactory(status=NodeStatus.PENDING, approved_at=None)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user)
    assert client.post(f"/ui/nodes/{node.pk}/approve", **HTMX).status_code == 403
    assert client.post(f"/ui/nodes/{node.pk}/capacity", {"value": "2"}).status_code == 403
    node.refresh_from_db()
    assert node.status == NodeStatus.PENDING and node.max_replicas_override is None
    page = client.get("/ui/nodes/")
    token = page.cookies["csrftoken"].value
    response = client.post(f"/ui/nodes/{node.pk}/approve", HTTP_X_CSRFTOKEN=token, **HTMX)
    assert response.status_code == 200
    assert 'hx-headers=\'{"X-CSRFToken": "' in page.content.decode()


def test_get_is_refused_on_actions(staff_client: Client) -> None:
    node = NodeFactory()
    assert staff_client.get(f"/ui/nodes/{node.pk}/drain").status_code == 405


# --- logs page ----------------------------------------------------------------------------------------------


def test_logs_page_for_one_replica_of_several(staff_client: Client) -> None:
    node = NodeFactory(worker_max_replicas_per_model=2)
    ReplicaFactory(node=node, model_name="org/m:v1", replica_index=0)
    ReplicaFactory(node=node, model_name="org/m:v1", replica_index=1)
    html = staff_client.get(f"/ui/nodes/{node.pk}/logs/org/m:v1%231").content.decode()
    assert "data-scope-chip>replica 1</span>" in html
    assert re.findall(
        r'<a href="[^"]+" ?(?:aria-current="page")?>([^<]+)</a>', html.split('aria-label="Scope"')[1]
    )[:3] == ["Replica 0", "Replica 1", "All merged"]
    assert f'href="/ui/nodes/{node.pk}/logs/org/m:v1%231" aria-current="page"' in html
    assert f'data-ws-path="/ws/nodes/{node.pk}/backend-logs/org%2Fm%3Av1%231"' in html
    merged = staff_client.get(f"/ui/nodes/{node.pk}/logs/org/m:v1").content.decode()
    assert "data-scope-chip>merged · 2 replicas</span>" in merged


def test_logs_page_of_a_single_replica_has_no_scope_switch(staff_client: Client) -> None:
    node = NodeFactory()
    ReplicaFactory(node=node, model_name="m", replica_index=0)
    html = staff_client.get(f"/ui/nodes/{node.pk}/logs/m%230").content.decode()
    assert "replica 0</span>" in html and 'aria-label="Scope"' not in html
    assert staff_client.get(f"/ui/nodes/{node.pk}/logs/m%23x").status_code == 404


def test_auto_labels_are_shown_but_not_removable_in_the_editor(staff_client: Client) -> None:
    node = NodeFactory()
    NodeLabelFactory(node=node, key="gpu.vendor", value="nvidia")
    NodeLabelFactory(node=node, key="zone", value="a")
    html = staff_client.get(f"/ui/nodes/{node.pk}/", **HTMX).content.decode()
    assert "gpu.vendor=nvidia" in html and 'aria-label="Remove label gpu.vendor"' not in html
    assert 'aria-label="Remove label zone"' in html
