"""The scheduling rule form. The field rules are the API's (`RuleWriteSerializer`): min ≥ 0, max ≥ 0 (0 = no
limit), min ≤ max when max > 0, a valid model name, a selector of string labels, the autoscaling target and
delays as whole seconds ≥ 0 (empty: the API's default). This form adds what only the page has: the mode
switch and the selector typed as `key=value` chips."""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.conf import settings
from django.http import QueryDict

from scheduling.api.serializers import RuleWriteSerializer

MODE_PIN = "pin"
MODE_AUTOSCALE = "autoscale"


def _messages(errors: Any) -> list[str]:
    """DRF errors (lists, dicts of lists) as flat strings."""
    if isinstance(errors, dict):
        return [f"{key}: {message}" for key, value in errors.items() for message in _messages(value)]
    if isinstance(errors, list | tuple):
        return [message for item in errors for message in _messages(item)]
    return [str(errors)]


class RuleForm(forms.Form):
    """A rule to create or update. `selector` holds `key=value` strings (one per chip); `selector_key` and
    `selector_value` a chip being typed, taken as one more chip when its key is filled in."""

    model_name = forms.CharField(required=False, strip=True)
    mode = forms.ChoiceField(
        choices=[(MODE_PIN, "Pin to nodes"), (MODE_AUTOSCALE, "Auto-scale")], initial=MODE_AUTOSCALE
    )
    min_replicas = forms.CharField(required=False, strip=True)
    max_replicas = forms.CharField(required=False, strip=True)
    target_in_flight = forms.CharField(required=False, strip=True)
    upscale_delay = forms.CharField(required=False, strip=True)
    downscale_delay = forms.CharField(required=False, strip=True)
    scale_to_zero_after = forms.CharField(required=False, strip=True)
    selector_key = forms.CharField(required=False, strip=True)
    selector_value = forms.CharField(required=False, strip=True)
    editing = forms.BooleanField(required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validated: dict[str, Any] = {}
        # Bound to `request.POST`: a QueryDict, whose `getlist` keeps every chip.
        items = (
            cast(QueryDict, self.data).getlist("selector")
            if self.is_bound
            else self.initial.get("selector", [])
        )
        self.selector_items = [str(item) for item in items]

    @property
    def autoscale_window(self) -> str:
        return f"{settings.LOCALAI_AUTOSCALE_WINDOW:g}"

    def scaling_fields(self) -> list[tuple[forms.BoundField, str, str, str, str]]:
        """The load-based scaling inputs: (field, input id, label, placeholder, hint)."""
        down = f"{settings.LOCALAI_SCALE_DOWN_DELAY:g}"
        return [
            (
                self["target_in_flight"],
                "rule-target",
                "Target in-flight per replica",
                "0 = off",
                "0: add a replica only when all are busy.",
            ),
            (
                self["upscale_delay"],
                "rule-upscale-delay",
                "Upscale delay (s)",
                "30",
                "Demand must last this long before replicas are added.",
            ),
            (
                self["downscale_delay"],
                "rule-downscale-delay",
                "Downscale delay (s)",
                down,
                f"Empty: LOCALAI_SCALE_DOWN_DELAY ({down} s). Never sooner after a scale-up.",
            ),
            (
                self["scale_to_zero_after"],
                "rule-zero-after",
                "Scale to zero after (s)",
                "0 = never",
                "With min 0: unload the last replica after this long without a request.",
            ),
        ]

    def selector_pairs(self) -> list[tuple[str, str]]:
        """The chips to show again (valid or not), in the order given."""
        return [(key, value) for key, _, value in (item.partition("=") for item in self.selector_items)]

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data  # what `Form.clean` returns
        mode = cleaned.get("mode") or MODE_AUTOSCALE
        if cleaned.get("selector_key"):
            self.selector_items.append(f"{cleaned['selector_key']}={cleaned.get('selector_value', '')}")
        selector: dict[str, str] = {}
        for item in self.selector_items:
            key, separator, value = item.partition("=")
            if not key or not separator:
                self.add_error(None, f"Selector entries are key=value; {item!r} is not.")
            elif key in selector and selector[key] != value:
                self.add_error(None, f"The selector names {key} twice.")
            selector[key] = value
        # Empty scaling fields take the API's defaults (downscale_delay: LOCALAI_SCALE_DOWN_DELAY).
        scaling: dict[str, Any] = {
            name: cleaned.get(name)
            for name in ("target_in_flight", "upscale_delay", "downscale_delay", "scale_to_zero_after")
            if cleaned.get(name)
        }
        if mode == MODE_PIN:
            minimum, maximum = "0", "0"
            scaling = {}  # pinning loads on demand only: no load-based scaling
            if not selector:
                self.add_error(None, "Pin to nodes needs at least one key=value label in the selector.")
        else:
            minimum = cleaned.get("min_replicas") or "0"
            maximum = cleaned.get("max_replicas") or "0"
        serializer = RuleWriteSerializer(
            data={
                "model_name": self.data.get("model_name", "").strip(),
                "node_selector": selector,
                "min_replicas": minimum,
                "max_replicas": maximum,
                **scaling,
            }
        )
        if serializer.is_valid():
            self.validated = dict(serializer.validated_data)
        else:
            for field, errors in serializer.errors.items():
                target = {"node_selector": None, "non_field_errors": None}.get(field, field)
                if target is not None and target not in self.fields:
                    target = None
                for message in _messages(errors):
                    self.add_error(target, message)
        return cleaned
