"""Forms of the operator console pages."""

from __future__ import annotations

import unicodedata

from django import forms

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
