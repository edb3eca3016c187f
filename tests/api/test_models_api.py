"""`/api/models*` and `import_models`."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import quote

import pytest
from django.core.management import CommandError, call_command

from scheduling.catalog import DEFAULT_CONTEXT_SIZE, KV_BYTES_PER_TOKEN
from scheduling.models import ModelConfig
from tests.factories import ModelConfigFactory

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures"
FIELDS = {"name", "backend", "model", "options", "vram_bytes", "context_size", "files", "routing"}


def test_create_list_get_put_patch_delete(api):
    body = {"name": "org/m:v1.5", "backend": "llama-cpp", "model": "m.gguf", "options": {"NGPULayers": 99}}
    response = api.post("/api/models", body, format="json")
    assert response.status_code == 201
    assert response.json() == {
        **body,
        "vram_bytes": 0,
        "context_size": None,
        "files": [],
        "routing": "least_in_flight",
    }
    assert [m["name"] for m in api.get("/api/models").json()["results"]] == ["org/m:v1.5"]
    url = f"/api/models/{quote(body['name'])}"
    assert set(api.get(url).json()) == FIELDS | {"load_failure"}

    response = api.patch(url, {"vram_bytes": 5 * 1024**3, "context_size": 4096}, format="json")
    assert response.status_code == 200
    assert response.json()["backend"] == "llama-cpp" and response.json()["vram_bytes"] == 5 * 1024**3

    response = api.put(url, {"backend": "echo"}, format="json")
    assert response.status_code == 200
    assert response.json() == {
        "name": "org/m:v1.5",
        "backend": "echo",
        "model": "",
        "options": {},
        "vram_bytes": 0,
        "context_size": None,
        "files": [],
        "routing": "least_in_flight",
        "load_failure": None,
    }
    assert api.delete(url).status_code == 204
    assert api.get(url).status_code == 404
    assert api.delete(url).status_code == 404
    assert api.patch(url, {"backend": "x"}, format="json").status_code == 404


def test_put_creates(api):
    response = api.put("/api/models/new/one", {"backend": "echo"}, format="json")
    assert response.status_code == 201 and ModelConfig.objects.get().name == "new/one"


def test_duplicate_and_renames_are_400(api):
    ModelConfigFactory(name="m")
    response = api.post("/api/models", {"name": "m"}, format="json")
    assert response.status_code == 400 and "name" in response.json()["details"]
    response = api.patch("/api/models/m", {"name": "other"}, format="json")
    assert response.status_code == 400 and "name" in response.json()["details"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "m", "vram_bytes": -1}, "vram_bytes"),
        ({"name": "m", "vram_bytes": 2**64}, "vram_bytes"),
        ({"name": "m", "context_size": 2**40}, "context_size"),
        ({"name": "m", "options": []}, "options"),
        ({"name": "m", "options": {"a": "\x00"}}, "options"),
        ({"name": "m", "backend": "b" * 65}, "backend"),
        ({"name": "m#1"}, "name"),
        ({"name": 3}, "name"),
        ({}, "name"),
    ],
)
def test_invalid_models_are_400(api, body, field):
    response = api.post("/api/models", body, format="json")
    assert response.status_code == 400 and field in response.json()["details"], response.content


def test_import_localai_yaml(tmp_path, monkeypatch):
    weights = tmp_path / "qwen3-8b-q4_k_m.gguf"
    weights.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("LOCALAI_MODELS_PATH", str(tmp_path))
    out = io.StringIO()
    call_command("import_models", str(FIXTURES / "qwen3-8b.yaml"), str(FIXTURES / "gallery.yaml"), stdout=out)

    qwen = ModelConfig.objects.get(name="qwen3-8b")
    assert (qwen.backend, qwen.model, qwen.context_size) == ("llama-cpp", "qwen3-8b-q4_k_m.gguf", 8192)
    assert qwen.vram_bytes == 4096 + 8192 * KV_BYTES_PER_TOKEN
    assert qwen.options["parameters"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert qwen.options["stopwords"] == ["<|im_end|>", "<|endoftext|>"] and qwen.options["f16"] is True
    assert "name" not in qwen.options and "backend" not in qwen.options

    embedder = ModelConfig.objects.get(name="org/embedder:v1.5")
    assert embedder.vram_bytes == 0 and embedder.options == {"embeddings": True}
    assert ModelConfig.objects.get(name="echo-1").vram_bytes == 1048576
    text = out.getvalue()
    assert "created qwen3-8b" in text and "estimate:" in text and "unknown" in text and "3 model(s)" in text

    # again: updates, and no local file means no estimate
    monkeypatch.setenv("LOCALAI_MODELS_PATH", str(tmp_path / "elsewhere"))
    out = io.StringIO()
    call_command("import_models", str(FIXTURES / "qwen3-8b.yaml"), stdout=out)
    assert "updated qwen3-8b" in out.getvalue()
    assert ModelConfig.objects.get(name="qwen3-8b").vram_bytes == 0
    assert ModelConfig.objects.count() == 3


def test_import_default_context_allowance(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x" * 10)
    (tmp_path / "m.yaml").write_text("name: plain\nparameters:\n  model: w.bin\n")
    call_command(
        "import_models", str(tmp_path / "m.yaml"), "--models-path", str(tmp_path), stdout=io.StringIO()
    )
    assert ModelConfig.objects.get().vram_bytes == 10 + DEFAULT_CONTEXT_SIZE * KV_BYTES_PER_TOKEN


@pytest.mark.parametrize(
    "content", ["name: [unclosed", "- 1\n- 2\n", "backend: x\n", "name: a#1\n", "name: m\ncontext_size: -4\n"]
)
def test_import_bad_files_import_nothing(tmp_path, content):
    good = tmp_path / "good.yaml"
    good.write_text("name: good\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(CommandError, match=r"bad\.yaml"):
        call_command("import_models", str(good), str(bad), stdout=io.StringIO())
    assert not ModelConfig.objects.exists()
    with pytest.raises(CommandError, match=r"missing\.yaml"):
        call_command("import_models", str(tmp_path / "missing.yaml"), stdout=io.StringIO())


def test_routing_policy_is_set_kept_and_validated(api, settings):
    response = api.post("/api/models", {"name": "r1", "routing": "prefix_cache"}, format="json")
    assert response.status_code == 201 and response.json()["routing"] == "prefix_cache"
    # A PATCH of another field keeps it; a PATCH of it changes it.
    assert api.patch("/api/models/r1", {"backend": "echo"}, format="json").json()["routing"] == "prefix_cache"
    assert api.patch("/api/models/r1", {"routing": "session"}, format="json").json()["routing"] == "session"
    assert ModelConfig.objects.get(name="r1").routing == "session"
    bad = api.patch("/api/models/r1", {"routing": "round_robin"}, format="json")
    assert bad.status_code == 400 and "routing" in bad.json()["details"]
    assert ModelConfig.objects.get(name="r1").routing == "session"  # nothing lost
    # Without one, a new entry takes LOCALAI_ROUTING_POLICY.
    settings.LOCALAI_ROUTING_POLICY = "session"
    assert api.post("/api/models", {"name": "r2"}, format="json").json()["routing"] == "session"
    assert ModelConfigFactory(name="r3").routing == "session"
