"""Forms of the operator console pages."""

from __future__ import annotations

import unicodedata
from typing import Any

from django import forms

from scheduling.choices import RoutingPolicy

SCOPE_INFERENCE = "inference"
SCOPE_ADMIN = "admin"


class ApiKeyForm(forms.Form):
    """A new API key: a name the operator recognises and its scope (`inference`: `/v1/*` only; `admin`: also
    `/api/nodes/*` and `/api/models/*`)."""

    name = forms.CharField(
        max_length=255,
        strip=True,
        error_messages={"required": "Give the key a name (who or what uses it)."},
    )
    scope = forms.ChoiceField(
        choices=[(SCOPE_INFERENCE, "Inference (/v1)"), (SCOPE_ADMIN, "Admin (/v1 and /api)")],
        initial=SCOPE_INFERENCE,
    )

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
            raise forms.ValidationError("Control characters are not allowed in a key's name.")
        return name


class ModelConfigForm(forms.Form):
    """A catalog entry to add or edit on the models page. The field rules are the API's
    (`scheduling.api.serializers.ModelConfigSerializer`); this form adds what only the page has: VRAM typed
    as a size (`8GiB`), options as a JSON text, and `editing` (the name is then fixed)."""

    name = forms.CharField(required=False, strip=True)
    backend = forms.CharField(required=False, strip=True)
    model = forms.CharField(required=False, strip=True)
    vram = forms.CharField(required=False, strip=True)
    context_size = forms.CharField(required=False, strip=True)
    options = forms.CharField(required=False, strip=True, widget=forms.Textarea)
    routing = forms.CharField(required=False, strip=True)
    routing_choices = RoutingPolicy.choices  # the select's options
    editing = forms.BooleanField(required=False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validated: dict = {}

    def clean(self) -> dict[str, Any]:
        import json

        from localai_cluster.env import parse_bytes
        from scheduling.api.serializers import ModelConfigSerializer

        super().clean()
        cleaned = self.cleaned_data  # what `Form.clean` returns
        data: dict = {"name": self.data.get("name", "").strip(), "model": cleaned.get("model") or ""}
        if cleaned.get("backend"):
            data["backend"] = cleaned["backend"]  # left empty: the API's default, `echo`
        vram = cleaned.get("vram") or ""
        try:
            data["vram_bytes"] = parse_bytes(vram) if vram else 0
        except ValueError as exc:
            self.add_error("vram", str(exc))
        if cleaned.get("context_size"):
            data["context_size"] = cleaned["context_size"]
        if cleaned.get("routing"):
            data["routing"] = cleaned["routing"]  # left empty: LOCALAI_ROUTING_POLICY
        options = cleaned.get("options") or ""
        try:
            data["options"] = json.loads(options) if options else {}
        except ValueError as exc:
            self.add_error("options", f"Not valid JSON: {exc}")
        if self.errors:
            return cleaned
        serializer = ModelConfigSerializer(data=data)
        if serializer.is_valid():
            self.validated = dict(serializer.validated_data)
            return cleaned
        fields = {"vram_bytes": "vram"}
        for field, errors in serializer.errors.items():
            target = fields.get(field, field)
            for message in errors if isinstance(errors, list) else [errors]:
                self.add_error(target if target in self.fields else None, str(message))
        return cleaned
