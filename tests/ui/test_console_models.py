"""The models page `/ui/models/` (issue 17 item 1): catalog search, add, edit, delete, YAML upload through the
`import_models` parser, per-model replicas, rule, routing, last decision and load failure, the missing-backend
warning, "load one now" and "unload all"; staff only; queries fixed whatever the number of models, nodes and
replicas. The real agent flows are in `tests/browser/test_console_models_page.py`."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from nodes.models import ModelReplica
from scheduling.decisions import decision_record
from scheduling.loadfailures import LoadAttempt, load_failure_record
from scheduling.models import ModelConfig
from tests.factories import ModelConfigFactory, NodeFactory, ReplicaFactory, RuleFactory
from tests.ui.conftest import HTMX

pytestmark = pytest.mark.django_db(transaction=True)


def toast_of(response) -> dict:
    return json.loads(response["HX-Trigger"])["toast"]


def row_html(html: str, name: str) -> str:
    start = html.index(f'<tr data-model="{name}"')
    return html[start : html.index("</tr>", start)]


def _populate(models: int, nodes: int) -> None:
    node_list = [NodeFactory(name=f"n{i}", worker_max_replicas_per_model=8) for i in range(nodes)]
    for m in range(models):
        name = f"m{m}"
        ModelConfigFactory(name=name, backend="echo" if m % 2 else "llama-cpp")
        RuleFactory(model_name=name, min_replicas=1, node_selector={"gpu": "a100"})
        for index, node in enumerate(node_list):
            ReplicaFactory(node=node, model_name=name, replica_index=index, in_flight=m % 3)
        decision_record(model_name=name, trigger="admin", outcome="placed", node_name="n0", replica_index=0)
        load_failure_record(attempt=LoadAttempt(name), error="LoadModel failed")


def test_queries_are_fixed_whatever_the_number_of_models_nodes_and_replicas(staff_client: Client) -> None:
    _populate(models=1, nodes=1)
    with CaptureQueriesContext(connection) as small:
        html = staff_client.get("/ui/models/").content.decode()
    assert html.count("<tr data-model=") == 1
    _populate_more = [f"x{i}" for i in range(12)]
    for node_index in range(1, 6):
        NodeFactory(name=f"extra-{node_index}")
    for name in _populate_more:
        ModelConfigFactory(name=name)
        RuleFactory(model_name=name, min_replicas=2)
        for index in range(4):
            ReplicaFactory(node__name=f"{name}-node-{index}", model_name=name)
        decision_record(model_name=name, trigger="request", outcome="no_capacity", message="cannot place")
        load_failure_record(attempt=LoadAttempt(name), error="boom")
    with CaptureQueriesContext(connection) as large:
        html = staff_client.get("/ui/models/").content.decode()
    assert html.count("<tr data-model=") == 13 and html.count("data-replica=") == 1 + 48
    assert (
        len(large) == len(small) <= 8
    )  # session, user, nodes' backends, catalog, replicas, rules, failures, decisions
    with CaptureQueriesContext(connection) as fragment:
        staff_client.get("/ui/models/", **HTMX)
    assert len(fragment) == len(small)


def test_each_model_shows_replicas_rule_routing_decision_and_load_failure(staff_client: Client) -> None:
    ModelConfigFactory(name="org/qwen:8b", backend="echo", vram_bytes=8 * 1024**3, context_size=4096)
    ReplicaFactory(node__name="gpu-1", model_name="org/qwen:8b", replica_index=0, in_flight=3)
    ReplicaFactory(node__name="gpu-2", model_name="org/qwen:8b", replica_index=0, state="loading")
    RuleFactory(model_name="org/qwen:8b", min_replicas=2, max_replicas=4, node_selector={"gpu": "a100"})
    decision_record(
        model_name="org/qwen:8b",
        trigger="reconcile",
        outcome="no_capacity",
        message="cannot place org/qwen:8b: no free slot (gpu-3: 1/1 slots used)",
        candidates=[{"node": "gpu-3", "verdict": "no_free_slot", "detail": "1/1 slots used"}],
    )
    load_failure_record(attempt=LoadAttempt("org/qwen:8b"), error="LoadModel failed: no such file")
    row = row_html(staff_client.get("/ui/models/").content.decode(), "org/qwen:8b")
    assert "1 loaded · 1 loading · 3 in flight" in row
    assert 'data-replica="org/qwen:8b#0" data-state="loaded"' in row and "gpu-1" in row and "gpu-2" in row
    assert "Auto-scaling" in row and "min 2 · max 4" in row and "gpu=a100" in row
    assert "data-routing" in row  # the routing policy's place (the catalog's `routing` when present)
    assert 'data-outcome="no_capacity"' in row and "gpu-3: 1/1 slots used" in row
    assert "Load failing since" in row and "no such file" in row
    assert "8.0\xa0GB VRAM" in row and "ctx 4096" in row


def test_search_filters_by_name_backend_or_file(staff_client: Client) -> None:
    ModelConfigFactory(name="qwen-chat", backend="llama-cpp", model="qwen.gguf")
    ModelConfigFactory(name="whisper-small", backend="whisper")
    ModelConfigFactory(name="embedder", backend="echo", model="minilm.bin")

    def names(q: str) -> list[str]:
        html = staff_client.get("/ui/models/", {"q": q}, **HTMX).content.decode()
        return [n for n in ("qwen-chat", "whisper-small", "embedder") if f'data-model="{n}"' in html]

    assert names("") == ["qwen-chat", "whisper-small", "embedder"]
    assert names("QWEN") == ["qwen-chat"]
    assert names("whisper") == ["whisper-small"]
    assert names("minilm") == ["embedder"]
    assert "No model matches" in staff_client.get("/ui/models/", {"q": "zzz"}, **HTMX).content.decode()


def test_the_missing_backend_warning_follows_what_agents_offer(staff_client: Client) -> None:
    ModelConfigFactory(name="chat", backend="llama-cpp")
    ModelConfigFactory(name="echoer", backend="echo")
    NodeFactory(name="n1", backends=["echo"])
    NodeFactory(name="gone", backends=["llama-cpp"], status="offline")  # an offline node offers nothing
    html = staff_client.get("/ui/models/").content.decode()
    assert "data-missing-backends" in html and 'needs <span class="mono">llama-cpp</span>' in html
    assert "data-backend-missing" in row_html(html, "chat")
    assert "data-backend-missing" not in row_html(html, "echoer")
    NodeFactory(name="n2", backends=["echo", "llama-cpp"])
    html = staff_client.get("/ui/models/").content.decode()
    assert "data-missing-backends" not in html


def test_add_edit_and_delete(staff_client: Client) -> None:
    NodeFactory(backends=["echo", "vllm"])
    form = staff_client.get("/ui/models/form", **HTMX).content.decode()
    assert '<option value="vllm">offered by 1 node</option>' in form
    answer = staff_client.post(
        "/ui/models/save",
        {
            "name": "org/new:1",
            "backend": "vllm",
            "model": "new.gguf",
            "vram": "8GiB",
            "context_size": "2048",
            "options": '{"gpu_layers": 99}',
        },
        **HTMX,
    )
    assert answer.status_code == 200, answer.content
    assert toast_of(answer)["message"] == "Model org/new:1 added."
    assert 'id="models"' in answer.content.decode() and 'hx-swap-oob="true"' in answer.content.decode()
    config = ModelConfig.objects.get(name="org/new:1")
    assert (config.backend, config.model, config.vram_bytes, config.context_size, config.options) == (
        "vllm",
        "new.gguf",
        8 * 1024**3,
        2048,
        {"gpu_layers": 99},
    )
    # Adding the same name again is an error at the form; editing replaces.
    again = staff_client.post("/ui/models/save", {"name": "org/new:1", "backend": "echo"}, **HTMX)
    assert again.status_code == 422 and "already exists" in again.content.decode()
    edit = staff_client.get("/ui/models/form", {"id": config.pk}, **HTMX).content.decode()
    assert "readonly" in edit and "&quot;gpu_layers&quot;: 99" in edit
    saved = staff_client.post(
        "/ui/models/save", {"name": "org/new:1", "backend": "echo", "editing": "on", "vram": ""}, **HTMX
    )
    assert saved.status_code == 200 and toast_of(saved)["message"] == "Model org/new:1 saved."
    config.refresh_from_db()
    assert (config.backend, config.vram_bytes, config.options) == ("echo", 0, {})

    deleted = staff_client.post(f"/ui/models/{config.pk}/delete", **HTMX)
    assert deleted.status_code == 200 and "deleted from the catalog" in toast_of(deleted)["message"]
    assert not ModelConfig.objects.exists()
    gone = staff_client.post(f"/ui/models/{config.pk}/delete", **HTMX)
    assert gone.status_code == 404 and toast_of(gone)["level"] == "error"


def test_the_form_sets_the_routing_policy_and_an_edit_keeps_the_staged_files(staff_client: Client) -> None:
    files = [{"uri": "cp://w.bin", "sha256": "a" * 64, "size": 3, "path": "w.bin"}]
    config = ModelConfigFactory(name="m", backend="echo", files=files)
    edit = staff_client.get("/ui/models/form", {"id": config.pk}, **HTMX).content.decode()
    assert '<select id="model-routing" name="routing"' in edit
    assert '<option value="least_in_flight" selected>' in edit
    saved = staff_client.post(
        "/ui/models/save",
        {"name": "m", "backend": "echo", "editing": "on", "routing": "prefix_cache"},
        **HTMX,
    )
    assert saved.status_code == 200, saved.content
    config.refresh_from_db()
    assert (config.routing, config.files) == ("prefix_cache", files)
    assert "prefix_cache" in row_html(saved.content.decode(), "m")
    bad = staff_client.post(
        "/ui/models/save", {"name": "m", "backend": "echo", "editing": "on", "routing": "random"}, **HTMX
    )
    assert bad.status_code == 422 and "is not a valid choice" in bad.content.decode()
    config.refresh_from_db()
    assert config.routing == "prefix_cache"


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"name": "", "backend": "echo"}, "model-name", "This field may not be blank"),
        ({"name": "a#1", "backend": "echo"}, "model-name", "is not allowed in a model name"),
        ({"name": "m", "backend": "echo", "vram": "lots"}, "model-vram", "expected a size"),
        ({"name": "m", "backend": "echo", "options": "{nope"}, "model-options", "Not valid JSON"),
        ({"name": "m", "backend": "echo", "options": "[1]"}, "model-options", "Expected a JSON object"),
        (
            {"name": "m", "backend": "echo", "context_size": "-1"},
            "model-context",
            "greater than or equal to 0",
        ),
        ({"name": "m", "backend": "x" * 65}, "model-backend", "no more than 64"),
    ],
)
def test_invalid_input_comes_back_in_the_form(staff_client: Client, fields, field, message) -> None:
    answer = staff_client.post("/ui/models/save", fields, **HTMX)
    assert answer.status_code == 422
    html = answer.content.decode()
    assert f'id="{field}-error"' in html and message in html
    assert toast_of(answer)["level"] == "error"
    assert not ModelConfig.objects.exists()


def _yaml(name: str, text: str) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, text.encode(), content_type="application/yaml")


def test_yaml_upload_uses_the_import_parser(staff_client: Client) -> None:
    ModelConfigFactory(name="old", backend="echo")
    answer = staff_client.post(
        "/ui/models/import",
        {
            "files": [
                _yaml(
                    "a.yaml",
                    "name: qwen\nbackend: llama-cpp\ncontext_size: 4096\nparameters:\n  model: q.gguf\n  temperature: 0.2\n",
                ),
                _yaml("b.yaml", "- name: old\n  backend: whisper\n- name: third\n"),
            ]
        },
        **HTMX,
    )
    assert answer.status_code == 200, answer.content
    assert toast_of(answer)["message"] == "Imported 3 models: qwen (created), old (updated), third (created)."
    qwen = ModelConfig.objects.get(name="qwen")
    assert (qwen.backend, qwen.model, qwen.context_size) == ("llama-cpp", "q.gguf", 4096)
    assert qwen.options == {"parameters": {"temperature": 0.2}}
    assert ModelConfig.objects.get(name="old").backend == "whisper"
    assert ModelConfig.objects.get(name="third").backend == "llama-cpp"  # LocalAI's default


@pytest.mark.parametrize(
    "files, message",
    [
        ([], "Choose one or more"),
        ([_yaml("bad.yaml", "name: [unclosed")], "bad.yaml: not valid YAML"),
        (
            [_yaml("ok.yaml", "name: fine\n"), _yaml("nameless.yaml", "backend: echo\n")],
            "nameless.yaml: &#x27;name&#x27; must be a string",
        ),
        ([SimpleUploadedFile("bin.yaml", b"\xff\xfe\x00")], "not UTF-8"),
        (
            [
                _yaml(
                    "bomb.yaml",
                    "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                    "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nname: bomb\n",
                )
            ],
            "more than 10000 values",
        ),
        ([_yaml("nul.yaml", 'name: n\nnote: "a\\0b"\n')], "NUL"),
    ],
)
def test_a_bad_upload_imports_nothing_and_says_why_in_the_form(staff_client: Client, files, message) -> None:
    answer = staff_client.post("/ui/models/import", {"files": files} if files else {}, **HTMX)
    assert answer.status_code == 422
    assert message in answer.content.decode() and 'id="model-import-error"' in answer.content.decode()
    assert not ModelConfig.objects.exists()


def test_unload_all_never_cuts_off_requests_unless_told(staff_client: Client) -> None:
    config = ModelConfigFactory(name="m")
    ReplicaFactory(node__name="a", model_name="m", in_flight=1)
    html = staff_client.get("/ui/models/").content.decode()
    row = row_html(html, "m")
    assert "1 request in flight will be cut off" in row and 'name="force" value="1"' in row
    refused = staff_client.post(f"/ui/models/{config.pk}/unload", **HTMX)
    assert refused.status_code == 409 and "nothing was unloaded" in toast_of(refused)["message"]
    assert ModelReplica.objects.count() == 1
    done = staff_client.post(f"/ui/models/{config.pk}/unload", {"force": "1"}, **HTMX)
    assert done.status_code == 200
    assert toast_of(done)["message"] == "Unloaded 1 replica of m from 1 node; 1 request in flight cut off."
    assert not ModelReplica.objects.exists()


def test_load_one_now_refused_shows_why_in_the_row(staff_client: Client) -> None:
    config = ModelConfigFactory(name="m")
    NodeFactory(name="gpu-1", status="draining")
    answer = staff_client.post(f"/ui/models/{config.pk}/load", **HTMX)
    assert answer.status_code == 200
    toast = toast_of(answer)
    assert toast["level"] == "error" and toast["message"].startswith("m not loaded: cannot place m:")
    row = row_html(answer.content.decode(), "m")
    assert 'data-outcome="no_capacity"' in row and "gpu-1: draining" in row
    assert "admin" in row and "data-refusal>gpu-1: draining" in row


def test_load_one_now_on_nodes_that_cannot_start_the_backend_says_so_and_loads_nothing(
    staff_client: Client,
) -> None:
    config = ModelConfigFactory(name="chat", backend="llama-cpp")
    NodeFactory(name="gpu-1", backends=["echo", "whisper"])
    answer = staff_client.post(f"/ui/models/{config.pk}/load", **HTMX)
    toast = toast_of(answer)
    assert toast["level"] == "error"
    assert toast["message"].startswith("chat not loaded: cannot place chat: no node offers backend llama-cpp")
    row = row_html(answer.content.decode(), "chat")
    assert "data-backend-missing" in row  # the page's warning, and now the placement's own verdict:
    assert '<li data-verdict="backend_missing"><strong>gpu-1</strong>' in row
    assert "data-refusal>gpu-1: backend llama-cpp not offered (offers: echo, whisper)" in row
    assert not ModelReplica.objects.exists()
    decisions = staff_client.get("/ui/decisions/", {"model": "chat"}).content.decode()
    assert '<li data-verdict="backend_missing"><strong>gpu-1</strong>' in decisions
    assert "backend llama-cpp not offered (offers: echo, whisper)" in decisions


def test_the_page_is_staff_only(client, plain_client: Client) -> None:
    assert client.get("/ui/models/").status_code == 302
    assert plain_client.get("/ui/models/").status_code == 403
    config = ModelConfigFactory(name="m")
    assert plain_client.post(f"/ui/models/{config.pk}/delete").status_code == 403
    assert ModelConfig.objects.exists()


def test_the_nodes_drawer_lists_the_backends(staff_client: Client) -> None:
    node = NodeFactory(name="gpu-1", backends=["echo", "llama-cpp"])
    html = staff_client.get(f"/ui/nodes/{node.pk}/", **HTMX).content.decode()
    start = html.index("data-backends")
    assert "echo" in html[start:] and "llama-cpp" in html[start : start + 400]


def test_a_replica_staging_its_files_shows_its_progress_and_the_table_polls_faster(
    staff_client: Client,
) -> None:
    ModelConfigFactory(name="big", backend="echo")
    ReplicaFactory(node__name="gpu-1", model_name="big", replica_index=0)
    staging = ReplicaFactory(node__name="gpu-2", model_name="big", replica_index=0, state="downloading")
    ModelReplica.objects.filter(pk=staging.pk).update(
        progress=0.25, download_bytes=100 * 1024**2, download_total=400 * 1024**2, download_rate=50 * 1024**2
    )
    html = staff_client.get("/ui/models/").content.decode()
    row = row_html(html, "big")
    assert "1 loaded · 1 downloading · 0 in flight" in row
    assert row.count("data-staging ") == 1  # the loaded replica has no bar
    assert '<progress max="1" value="0.250"' in row
    assert "25% · 100.0\xa0MB of 400.0\xa0MB · 50.0\xa0MB/s" in row
    assert 'hx-trigger="every 1s' in html
    ModelReplica.objects.filter(pk=staging.pk).update(state="loaded")
    html = staff_client.get("/ui/models/", **HTMX).content.decode()
    assert "data-staging " not in html and 'hx-trigger="every 5s' in html
