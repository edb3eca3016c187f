"""`load_failure` on `GET /api/models/{name}` and `POST /api/models/{name}/retry-load` (issue 12 item 3)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from scheduling.loadfailures import LoadAttempt, load_failure_record
from scheduling.models import LoadFailure
from tests.factories import ModelConfigFactory

pytestmark = pytest.mark.django_db


def test_a_failing_model_shows_its_failure_and_retry_now_clears_it(api, settings):
    settings.LOCALAI_LOAD_FAILURE_BACKOFF = 10
    ModelConfigFactory(name="org/broken:v1")
    url = f"/api/models/{quote('org/broken:v1')}"
    assert api.get(url).json()["load_failure"] is None
    row = load_failure_record(attempt=LoadAttempt("org/broken:v1"), error="LoadModel failed: no such file")

    failure = api.get(url).json()["load_failure"]
    assert failure["failures"] == 1
    assert failure["last_error"] == "LoadModel failed: no such file"
    assert failure["since"] and failure["retry_at"]
    assert failure["retry_at"].startswith(row.retry_at.isoformat()[:19])

    answer = api.post(f"{url}/retry-load")
    assert answer.status_code == 200
    assert answer.json()["name"] == "org/broken:v1"
    assert answer.json()["load_failure"] is None
    assert not LoadFailure.objects.exists()
    assert api.post(f"{url}/retry-load").status_code == 200  # nothing to clear: still the model


def test_retry_load_of_an_unknown_model_is_404(api):
    answer = api.post("/api/models/nope/retry-load")
    assert answer.status_code == 404
    assert set(answer.json()) == {"error", "details"}


def test_retry_load_needs_an_admin_key(inference_client):
    ModelConfigFactory(name="m")
    assert inference_client.post("/api/models/m/retry-load").status_code == 403


def test_a_model_named_like_the_route_is_still_reachable(api):
    ModelConfigFactory(name="x/retry-load")
    assert api.get("/api/models/x/retry-load").json()["name"] == "x/retry-load"
    assert api.patch("/api/models/x/retry-load", {"vram_bytes": 7}, format="json").json()["vram_bytes"] == 7
    assert api.post("/api/models/x/retry-load/retry-load").json()["name"] == "x/retry-load"
    assert api.delete("/api/models/x/retry-load").status_code == 204


def test_a_put_clears_the_backoff(api):
    ModelConfigFactory(name="m")
    load_failure_record(attempt=LoadAttempt("m"), error="boom")
    answer = api.put("/api/models/m", {"backend": "echo", "model": "fixed.bin"}, format="json")
    assert answer.status_code == 200
    assert answer.json()["load_failure"] is None
    assert not LoadFailure.objects.exists()


def test_the_schema_documents_the_route_and_the_field(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert "post" in schema["paths"]["/api/models/{name}/retry-load"]
    assert set(schema["paths"]["/api/models/{name}/retry-load"]) <= {"post", "parameters"}
    assert "load_failure" in schema["components"]["schemas"]["ModelDetail"]["properties"]
