"""Forms of the nodes page: the capacity editor and the label chips editor."""

from __future__ import annotations

import unicodedata

from django import forms

from nodes.choices import AUTO_LABELS, LABEL_REPLICA_SLOTS

MAX_INT = 2**31 - 1
LABEL_MAX_LENGTH = 255


def _text_problem(value: str) -> str | None:
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        return "Control characters are not allowed."
    return None


class CapacityForm(forms.Form):
    """The admin override of a node's replicas-per-model cap."""

    value = forms.IntegerField(
        min_value=1,
        max_value=MAX_INT,
        error_messages={"required": "Enter a number of replica slots (at least 1)."},
    )


class LabelForm(forms.Form):
    """One `key=value` label to set on a node. Auto-labels are the control plane's: refused here."""

    key = forms.CharField(max_length=LABEL_MAX_LENGTH, strip=True)
    value = forms.CharField(max_length=LABEL_MAX_LENGTH, required=False, strip=True)

    def clean_key(self) -> str:
        key = self.cleaned_data["key"]
        if key == LABEL_REPLICA_SLOTS:
            raise forms.ValidationError(f"{key} follows the capacity editor; set the capacity instead.")
        if key in AUTO_LABELS:
            raise forms.ValidationError(f"{key} is set by the control plane.")
        if "=" in key:
            raise forms.ValidationError("A key cannot contain '='.")
        problem = _text_problem(key)
        if problem:
            raise forms.ValidationError(problem)
        return key

    def clean_value(self) -> str:
        value = self.cleaned_data["value"]
        problem = _text_problem(value)
        if problem:
            raise forms.ValidationError(problem)
        return value


class LabelRemoveForm(forms.Form):
    key = forms.CharField(max_length=LABEL_MAX_LENGTH, strip=False)
