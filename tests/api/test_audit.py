"""The audit trail (issue 17 item 5): every admin action through every door — API, Django admin, management
commands (the pages: tests/ui/test_audit_page.py) — records who, what and before → after, in the same
transaction as the change; `GET /api/audit` filters, pages and refuses non-admins."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from urllib.parse import quote, urlencode

import pytest
from django.core.management import call_command
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from audit.context import Actor, acting_as, current_actor
from audit.models import AuditEntry, AuditEntryImmutable
from audit.services import NotInTransaction, record
from nodes import services
from nodes.apikeys import api_key_create, api_key_revoke
from nodes.models import ApiKey, Node, NodeLabel
from scheduling import catalog
from scheduling.loadfailures import LoadAttempt, load_failure_record
from scheduling.models import LoadFailure, ModelConfig, SchedulingRule
from scheduling.services import rule_delete, rule_upsert, rules_breaker_reset
from tests.factories import (
    AuditEntryFactory,
    ModelConfigFactory,
    NodeFactory,
    NodeLabelFactory,
    ReplicaFactory,
    RuleFactory,
)

pytestmark = pytest.mark.django_db


def only_entry(**filters) -> AuditEntry:
    entries = list(AuditEntry.objects.filter(**filters))
    assert len(entries) == 1, [(e.action, e.actor_name, e.before, e.after) for e in AuditEntry.objects.all()]
    return entries[0]


# --- the API door -------------------------------------------------------------------------------------------


def test_api_door_records_the_key_the_action_and_before_after(api):
    node = NodeFactory(name="gpu-a")
    assert api.post(f"/api/nodes/{node.pk}/drain").status_code == 200
    entry = only_entry(action="node.drain")
    assert (entry.actor_kind, entry.actor_name, entry.via) == ("api_key", "ops", "api")
    assert entry.actor_id == str(ApiKey.objects.get(name="ops").pk)
    assert (entry.target_type, entry.target_id, entry.target_name) == ("node", str(node.pk), "gpu-a")
    assert entry.before["status"] == "healthy" and entry.before["drained_by_admin"] is False
    assert entry.after["status"] == "draining" and entry.after["drained_by_admin"] is True

    assert api.post(f"/api/nodes/{node.pk}/drain").status_code == 200  # no change: no second entry
    assert AuditEntry.objects.filter(action="node.drain").count() == 1


def test_api_door_with_a_staff_session_records_the_user(staff_client):
    node = NodeFactory(name="gpu-b")
    from django.middleware.csrf import _get_new_csrf_string

    token = _get_new_csrf_string()
    staff_client.cookies["csrftoken"] = token
    answer = staff_client.put(
        f"/api/nodes/{node.pk}/max-replicas-per-model", {"value": 3}, format="json", HTTP_X_CSRFTOKEN=token
    )
    assert answer.status_code == 200, answer.content
    entry = only_entry(action="node.override_set")
    assert (entry.actor_kind, entry.actor_name, entry.via) == ("user", "staff", "api")
    assert entry.before == {"max_replicas_override": None, "replica_slots": 1}
    assert entry.after == {"max_replicas_override": 3, "replica_slots": 3}


def test_every_admin_route_is_audited(api):
    node = NodeFactory(name="gpu-c", status="pending", approved_at=None)
    base = f"/api/nodes/{node.pk}"
    assert api.post(f"{base}/approve").status_code == 200
    assert api.post(f"{base}/drain").status_code == 200
    assert api.post(f"{base}/resume").status_code == 200
    assert api.put(f"{base}/max-replicas-per-model", {"value": 2}, format="json").status_code == 200
    assert api.delete(f"{base}/max-replicas-per-model").status_code in (200, 204)
    assert api.patch(f"{base}/labels", {"zone": "eu"}, format="json").status_code == 200
    assert api.put(f"{base}/labels", {"zone": "us", "rack": "r1"}, format="json").status_code == 200
    assert api.delete(f"{base}/labels/rack").status_code in (200, 204)
    ReplicaFactory(node=node, model_name="m", replica_index=0)
    assert api.post(f"{base}/models/unload", {"model_name": "m"}, format="json").status_code == 200
    assert api.post("/api/models", {"name": "org/m", "backend": "echo"}, format="json").status_code == 201
    assert api.patch(f"/api/models/{quote('org/m')}", {"vram_bytes": 5}, format="json").status_code == 200
    load_failure_record(attempt=LoadAttempt("org/m"), error="boom")
    assert api.post(f"/api/models/{quote('org/m')}/retry-load").status_code == 200
    rule = {"model_name": "org/m", "node_selector": {}, "min_replicas": 1, "max_replicas": 2}
    assert api.post("/api/nodes/scheduling", rule, format="json").status_code in (200, 201)
    assert api.post("/api/nodes/scheduling", {**rule, "max_replicas": 3}, format="json").status_code in (
        200,
        201,
    )
    assert api.delete(f"/api/nodes/scheduling/{quote('org/m')}").status_code == 204
    assert api.delete(f"/api/models/{quote('org/m')}").status_code == 204
    assert api.delete(base).status_code == 204

    # (The `ops` key itself was created by the fixture: its `api_key.create` entry is the command's door.)
    trail = list(
        AuditEntry.objects.exclude(target_type="api_key")
        .order_by("id")
        .values_list("action", "actor_name", "via")
    )
    assert [action for action, _, _ in trail] == [
        "node.approve",
        "node.drain",
        "node.resume",
        "node.override_set",
        "node.override_reset",
        "node.labels",
        "node.labels",
        "node.labels",
        "node.unload",
        "model.create",
        "model.update",
        "model.retry_load",
        "rule.create",
        "rule.update",
        "rule.delete",
        "model.delete",
        "node.delete",
    ]
    assert {(name, via) for _, name, via in trail} == {("ops", "api")}
    labels = list(AuditEntry.objects.filter(action="node.labels").order_by("id"))
    assert [(e.before, e.after) for e in labels] == [
        ({"labels": {}}, {"labels": {"zone": "eu"}}),
        ({"labels": {"zone": "eu"}}, {"labels": {"rack": "r1", "zone": "us"}}),
        ({"labels": {"rack": "r1", "zone": "us"}}, {"labels": {"zone": "us"}}),
    ]
    unload = AuditEntry.objects.get(action="node.unload")
    assert (unload.before, unload.after) == ({"replicas": ["m#0"]}, {"replicas": []})
    update = AuditEntry.objects.get(action="model.update")
    assert (update.before["vram_bytes"], update.after["vram_bytes"]) == (0, 5)
    retry = AuditEntry.objects.get(action="model.retry_load")
    assert retry.before["failures"] == 1 and retry.before["last_error"] == "boom" and retry.after is None
    rule_update = AuditEntry.objects.get(action="rule.update")
    assert (rule_update.before["max_replicas"], rule_update.after["max_replicas"]) == (2, 3)
    deleted = AuditEntry.objects.get(action="node.delete")
    assert deleted.before["labels"] == {"zone": "us"} and deleted.after is None
    assert deleted.target_name == "gpu-c"


# --- the Django admin door ----------------------------------------------------------------------------------


def test_admin_door_actions_and_forms(admin_client, admin_user):
    node = NodeFactory(name="gpu-d")
    answer = admin_client.post(
        "/admin/nodes/node/", {"action": "node_drain", "_selected_action": [str(node.pk)]}
    )
    assert answer.status_code == 302
    entry = only_entry(action="node.drain")
    assert (entry.actor_kind, entry.actor_name, entry.via) == ("user", admin_user.username, "admin")
    assert entry.actor_id == str(admin_user.pk)
    assert (entry.before["status"], entry.after["status"]) == ("healthy", "draining")

    rule = RuleFactory(model_name="m", min_replicas=0, max_replicas=1)
    answer = admin_client.post(
        f"/admin/scheduling/schedulingrule/{rule.pk}/change/",
        {
            "model_name": "m",
            "node_selector": '{"gpu": "a100"}',
            "min_replicas": "1",
            "max_replicas": "2",
            "target_in_flight": "0",
            "upscale_delay": "30",
            "scale_to_zero_after": "0",
        },
    )
    assert answer.status_code == 302, answer.content[:3000]
    entry = only_entry(action="rule.update")
    assert entry.via == "admin" and entry.target_id == "m"
    autoscaling = {
        "target_in_flight": 0,
        "upscale_delay": 30,
        "downscale_delay": None,
        "scale_to_zero_after": 0,
    }
    assert entry.before == {"node_selector": {}, "min_replicas": 0, "max_replicas": 1, **autoscaling}
    assert entry.after == {
        "node_selector": {"gpu": "a100"},
        "min_replicas": 1,
        "max_replicas": 2,
        **autoscaling,
    }

    SchedulingRule.objects.filter(pk=rule.pk).update(unsatisfiable_ticks=3, unsatisfiable_reason="no node")
    answer = admin_client.post(
        "/admin/scheduling/schedulingrule/", {"action": "reset_breaker", "_selected_action": [rule.pk]}
    )
    assert answer.status_code == 302
    entry = only_entry(action="rule.breaker_reset")
    assert entry.before["unsatisfiable_ticks"] == 3 and entry.after["unsatisfiable_ticks"] == 0

    key, _ = api_key_create(name="leaked")
    admin_client.post("/admin/nodes/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    entry = only_entry(action="api_key.revoke")
    assert entry.via == "admin" and entry.before["revoked_at"] is None and entry.after["revoked_at"]

    config = ModelConfigFactory(name="cat", backend="echo")
    answer = admin_client.post(f"/admin/scheduling/modelconfig/{config.pk}/delete/", {"post": "yes"})
    assert answer.status_code == 302
    entry = only_entry(action="model.delete")
    assert entry.via == "admin" and entry.before["backend"] == "echo" and entry.after is None

    answer = admin_client.post(f"/admin/nodes/node/{node.pk}/delete/", {"post": "yes"})
    assert answer.status_code == 302
    assert not Node.objects.filter(pk=node.pk).exists()
    entry = only_entry(action="node.delete")
    assert entry.via == "admin" and entry.target_name == "gpu-d"


def test_admin_labels_inline_is_one_labels_entry(admin_client):
    node = NodeFactory(name="gpu-e")
    label = NodeLabelFactory(node=node, key="zone", value="eu")
    prefix = "labels"
    data = {
        "name": "gpu-e",
        "node_type": "backend",
        "address": "10.0.0.9:50051",
        "status": "healthy",
        "max_replicas_override": "",
        f"{prefix}-TOTAL_FORMS": "2",
        f"{prefix}-INITIAL_FORMS": "1",
        f"{prefix}-0-id": str(label.pk),
        f"{prefix}-0-node": str(node.pk),
        f"{prefix}-0-key": "zone",
        f"{prefix}-0-value": "us",
        f"{prefix}-0-source": "admin",
        f"{prefix}-1-node": str(node.pk),
        f"{prefix}-1-key": "rack",
        f"{prefix}-1-value": "r1",
        f"{prefix}-1-source": "admin",
        "replicas-TOTAL_FORMS": "0",
        "replicas-INITIAL_FORMS": "0",
    }
    answer = admin_client.post(f"/admin/nodes/node/{node.pk}/change/", data)
    assert answer.status_code == 302, answer.content.decode()[:3000]
    entry = only_entry(action="node.labels")
    assert entry.via == "admin"
    assert entry.before == {"labels": {"zone": "eu"}}
    assert entry.after == {"labels": {"rack": "r1", "zone": "us"}}
    update = only_entry(action="node.update")
    assert (update.before["address"], update.after["address"]) == (node.address, "10.0.0.9:50051")
    assert update.before["status"] == update.after["status"] == "healthy"


def test_admin_load_failure_delete_is_retry_now(admin_client):
    ModelConfigFactory(name="broken", backend="echo")
    failure = load_failure_record(attempt=LoadAttempt("broken"), error="no such file")
    answer = admin_client.post(f"/admin/scheduling/loadfailure/{failure.pk}/delete/", {"post": "yes"})
    assert answer.status_code == 302
    assert not LoadFailure.objects.exists()
    entry = only_entry(action="model.retry_load")
    assert (
        entry.via == "admin" and entry.target_id == "broken" and entry.before["last_error"] == "no such file"
    )


# --- the management command door ----------------------------------------------------------------------------


def test_command_door_create_api_key_and_import_models(tmp_path):
    call_command("create_api_key", "--name", "ci", "--admin", stdout=StringIO(), stderr=StringIO())
    entry = only_entry(action="api_key.create")
    assert (entry.actor_kind, entry.actor_name, entry.via) == ("command", "create_api_key", "command")
    assert entry.before is None
    assert entry.after["name"] == "ci" and entry.after["is_admin"] is True
    assert "key_hash" not in entry.after and entry.after["prefix"].startswith("lac_")

    ModelConfigFactory(name="old", backend="echo")
    models_file = tmp_path / "models.yaml"
    models_file.write_text("- name: new\n  backend: echo\n- name: old\n  backend: llama-cpp\n")
    call_command("import_models", str(models_file), stdout=StringIO())
    created = only_entry(action="model.create")
    updated = only_entry(action="model.update")
    assert (created.actor_kind, created.actor_name) == ("command", "import_models")
    assert created.target_id == "new" and created.before is None and created.after["backend"] == "echo"
    assert (updated.before["backend"], updated.after["backend"]) == ("echo", "llama-cpp")


def test_a_manage_py_process_without_a_context_is_its_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/srv/manage.py", "shell"])
    assert current_actor() == Actor.command("shell")
    monkeypatch.setattr("sys.argv", ["python"])
    assert current_actor() == Actor.system()
    with acting_as(Actor.command("nightly")):
        assert current_actor().name == "nightly"


# --- every service, one entry each --------------------------------------------------------------------------


def test_each_service_records_its_action():
    actor = Actor(kind="user", name="alice", via="page", id="7")
    node = NodeFactory(name="n1", status="pending", approved_at=None)
    with acting_as(actor):
        node = services.node_approve(node=node)
        services.node_drain(node=node)
        services.node_drain(node=node, by_admin=True)  # already drained by an admin: nothing changes
        services.node_resume(node=node)
        services.node_override_set(node=node, value=4)
        services.node_override_reset(node=node)
        services.node_labels_merge(node=node, labels={"a": "1"})
        services.node_labels_replace(node=node, labels={"b": "2"})
        services.node_label_remove(node=node, key="b")
        services.node_label_remove(node=node, key="absent")  # nothing removed: nothing recorded
        rule_upsert(model_name="m", node_selector={}, min_replicas=1, max_replicas=1)
        SchedulingRule.objects.filter(model_name="m").update(unsatisfiable_ticks=2)
        assert rules_breaker_reset(model_names=["m"]) == 1
        assert rules_breaker_reset(model_names=["m"]) == 0
        rule_delete(model_name="m")
        catalog.model_config_upsert(name="m", backend="echo")
        catalog.model_config_delete(name="m")
        assert catalog.model_retry_load(name="m") is False  # not failing: nothing recorded
        key, _ = api_key_create(name="k")
        api_key_revoke(api_key=key)
        api_key_revoke(api_key=key)  # already revoked: nothing recorded
        services.node_delete(node=node)
    actions = list(AuditEntry.objects.order_by("id").values_list("action", flat=True))
    assert actions == [
        "node.approve",
        "node.drain",
        "node.resume",
        "node.override_set",
        "node.override_reset",
        "node.labels",
        "node.labels",
        "node.labels",
        "rule.create",
        "rule.breaker_reset",
        "rule.delete",
        "model.create",
        "model.delete",
        "api_key.create",
        "api_key.revoke",
        "node.delete",
    ]
    assert set(AuditEntry.objects.values_list("actor_kind", "actor_name", "actor_id", "via")) == {
        ("user", "alice", "7", "page")
    }


def test_the_agents_own_drain_is_not_an_admin_action():
    node = NodeFactory()
    services.node_drain(node=node, by_admin=False)
    assert not AuditEntry.objects.exists()


# --- atomicity ----------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_change_that_fails_writes_no_entry(settings, monkeypatch):
    node = NodeFactory(name="full")
    monkeypatch.setattr(services, "MAX_NODE_LABELS", 1)
    services.node_labels_merge(node=node, labels={"a": "1"})
    assert AuditEntry.objects.count() == 1
    with pytest.raises(services.InvalidValue):
        services.node_labels_merge(node=node, labels={"b": "2"})  # written, then refused: rolled back
    assert AuditEntry.objects.count() == 1
    assert set(NodeLabel.objects.filter(node=node).values_list("key", flat=True)) >= {"a"}
    assert not NodeLabel.objects.filter(node=node, key="b").exists()


@pytest.mark.django_db(transaction=True)
def test_an_entry_that_cannot_be_written_rolls_the_change_back(monkeypatch):
    node = NodeFactory(name="steady")
    config = ModelConfigFactory(name="kept", backend="echo")

    def refuse(**fields):
        raise IntegrityError("the audit table refused the row")

    monkeypatch.setattr(AuditEntry.objects, "create", refuse)
    with pytest.raises(IntegrityError):
        services.node_drain(node=node)
    with pytest.raises(IntegrityError):
        catalog.model_config_upsert(name="kept", backend="llama-cpp")
    with pytest.raises(IntegrityError):
        api_key_create(name="never")
    node.refresh_from_db()
    assert node.status == "healthy" and not node.drained_by_admin
    assert ModelConfig.objects.get(pk=config.pk).backend == "echo"
    assert not ApiKey.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_record_refuses_to_run_outside_a_transaction():
    with pytest.raises(NotInTransaction):
        record(action="node.drain", target_type="node", target_id="x", before={}, after={"a": 1})
    assert not AuditEntry.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_entries_are_append_only():
    with transaction.atomic():
        entry = record(
            action="node.drain", target_type="node", target_id="x", before={"a": 0}, after={"a": 1}
        )
    assert entry is not None
    with pytest.raises(AuditEntryImmutable):
        entry.delete()
    with pytest.raises(AuditEntryImmutable):
        AuditEntry.objects.all().delete()
    with pytest.raises(AuditEntryImmutable):
        AuditEntry.objects.update(action="node.resume")
    for statement in ("DELETE FROM audit_auditentry", "UPDATE audit_auditentry SET action = 'x'"):
        with (
            pytest.raises(DatabaseError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(statement)
    assert AuditEntry.objects.get().action == "node.drain"


# --- GET /api/audit -----------------------------------------------------------------------------------------


def entry(minutes_ago=0, **fields) -> AuditEntry:
    return AuditEntryFactory(at=timezone.now() - timedelta(minutes=minutes_ago), **fields)


def test_list_newest_first_with_every_filter(api):
    entry(40, actor_kind="api_key", actor_name="ops-key", via="api", action="model.create", target_type="model",
          target_id="m", target_name="m", before=None, after={"backend": "echo"})  # fmt: skip
    entry(30)
    entry(
        20, actor_name="bob", action="node.resume", before={"status": "draining"}, after={"status": "healthy"}
    )
    newest = entry(10, actor_kind="command", actor_name="create_api_key", via="command", action="api_key.create",
                   target_type="api_key", target_id="5", target_name="ci", before=None, after={"name": "ci"})  # fmt: skip
    page = api.get("/api/audit").json()
    # `ops` itself was created by the fixture through the service: one more entry.
    assert page["count"] == 5
    assert page["results"][0]["target"]["name"] == "ops"  # the fixture's key, created just now
    first = page["results"][1]
    assert first["id"] == newest.id
    assert first["actor"] == {"kind": "command", "name": "create_api_key", "id": "", "via": "command"}
    assert first["target"] == {"type": "api_key", "id": "5", "name": "ci"}
    assert (
        first["action"] == "api_key.create" and first["before"] is None and first["after"] == {"name": "ci"}
    )
    assert set(first) == {"id", "at", "actor", "action", "target", "before", "after"}

    def actions(**query):
        answer = api.get(f"/api/audit?{urlencode(query)}")
        assert answer.status_code == 200, answer.json()
        return [r["action"] for r in answer.json()["results"]]

    assert actions(actor="bob") == ["node.resume"]
    assert actions(action="node.drain") == ["node.drain"]
    assert actions(target_type="node") == ["node.resume", "node.drain"]
    assert actions(target_id="gpu-1") == ["node.resume", "node.drain"]  # by name
    assert actions(target_id="m") == ["model.create"]  # by id
    since = (timezone.now() - timedelta(minutes=25)).isoformat()
    assert actions(since=since) == ["api_key.create", "api_key.create", "node.resume"]
    window = {
        "since": (timezone.now() - timedelta(minutes=35)).isoformat(),
        "until": (timezone.now() - timedelta(minutes=15)).isoformat(),
    }
    assert actions(**window) == ["node.resume", "node.drain"]


def test_pagination(api):
    for index in range(5):
        entry(index)
    first = api.get("/api/audit?page_size=2&action=node.drain").json()
    assert first["count"] == 5 and len(first["results"]) == 2 and first["next"] and first["previous"] is None
    last = api.get("/api/audit?page_size=2&page=3&action=node.drain").json()
    assert len(last["results"]) == 1 and last["next"] is None
    assert api.get("/api/audit?page=9").status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        "action=node.explode",
        "target_type=planet",
        "since=yesterday",
        "actor=%00",
        "since=2030-01-01T00:00Z&until=2029-01-01T00:00Z",
    ],
)
def test_bad_filters_are_400_in_the_api_shape(api, query):
    answer = api.get(f"/api/audit?{query}")
    assert answer.status_code == 400
    assert set(answer.json()) == {"error", "details"}


def test_only_admins_read_the_trail(client, inference_client, user_client):
    assert client.get("/api/audit").status_code == 401
    assert inference_client.get("/api/audit").status_code == 403
    assert user_client.get("/api/audit").status_code == 403


def test_the_route_is_in_the_openapi_schema(api):
    schema = api.get("/api/schema/?format=json").json()
    operation = schema["paths"]["/api/audit"]["get"]
    assert operation["operationId"] == "audit_list"
    names = {parameter["name"] for parameter in operation["parameters"]}
    assert names >= {"actor", "action", "target_type", "target_id", "since", "until", "page", "page_size"}


def test_queries_do_not_grow_with_entries(api, django_assert_max_num_queries):
    for index in range(3):
        entry(index)
    with django_assert_max_num_queries(4) as small:  # the key, the count, the page (+ the key's last use)
        api.get("/api/audit")
    for index in range(60):
        entry(index)
    with django_assert_max_num_queries(len(small.captured_queries)):
        api.get("/api/audit")
