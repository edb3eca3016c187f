"""Serializers of the admin API (`/api/nodes/*`) and the pieces other admin APIs share: the error shape,
string validation that keeps NUL bytes and control characters out of PostgreSQL, and flat string maps."""

from __future__ import annotations

import unicodedata
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers

from nodes.api.serializers import ErrorSerializer
from nodes.models import Node

MAX_KEY_LENGTH = 255
MAX_VALUE_LENGTH = 255
MAX_MAP_ENTRIES = 256
MAX_REPLICAS_LIMIT = 10_000


# --- shared -----------------------------------------------------------------------------------------------


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    """OpenAPI responses of the error shape for the given status codes."""
    descriptions = {
        400: "Invalid input (details per field).",
        401: "No or bad credentials.",
        403: "Authenticated but not allowed (inference-only key, node token, non-staff user).",
        404: "Unknown object.",
        409: "State conflict.",
        502: "The node's agent could not be reached or failed.",
        503: "No capacity.",
    }
    return {code: OpenApiResponse(ErrorSerializer, description=descriptions[code]) for code in codes}


AUTH_ERRORS = (401, 403)


def text_problem(value: str, *, allow_empty: bool = False) -> str | None:
    """Why `value` cannot be stored as a name, key or label value, or None. PostgreSQL refuses NUL bytes, and
    control characters have no business in names that end up in URLs, logs and process keys."""
    if not value and not allow_empty:
        return "This field may not be blank."
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        return "Control characters are not allowed."
    if value != value.strip():
        return "Leading or trailing whitespace is not allowed."
    return None


def has_bad_text(value: Any) -> bool:
    """Whether a JSON value holds a string PostgreSQL's jsonb cannot store (NUL) or an unpaired surrogate."""
    if isinstance(value, str):
        return "\x00" in value or any(unicodedata.category(ch) == "Cs" for ch in value)
    if isinstance(value, dict):
        return any(has_bad_text(k) or has_bad_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_bad_text(v) for v in value)
    return False


class CleanCharField(serializers.CharField):
    """A CharField that refuses control characters and surrounding whitespace instead of trimming it."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        value = super().to_internal_value(data)
        problem = text_problem(value, allow_empty=self.allow_blank)
        if problem:
            raise serializers.ValidationError(problem)
        return value


class ModelNameField(CleanCharField):
    """A model name: 1-255 characters, `/`, `:`, `.` and unicode welcome; `#` is refused because
    `<model>#<index>` is a replica's process key."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 255)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        if "#" in value:
            raise serializers.ValidationError(
                "'#' is not allowed in a model name (it separates the replica index)."
            )
        return value


def model_name_problem(value: str) -> str | None:
    """Why `value` is not a valid model name, or None (for names taken from URLs)."""
    if len(value) > 255:
        return "Ensure this field has no more than 255 characters."
    if "#" in value:
        return "'#' is not allowed in a model name."
    return text_problem(value)


class StringMapField(serializers.DictField):
    """A flat `{string: string}` map (labels, node selectors): keys 1-255 characters, values 0-255, both
    strings exactly (numbers are refused, not coerced: selectors match exact strings)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", serializers.CharField(allow_blank=True, max_length=MAX_VALUE_LENGTH))
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if not isinstance(data, dict):
            raise serializers.ValidationError("Expected an object of string keys to string values.")
        if len(data) > MAX_MAP_ENTRIES:
            raise serializers.ValidationError(f"At most {MAX_MAP_ENTRIES} entries are allowed.")
        errors: dict[str, str] = {}
        for key, value in data.items():
            if problem := text_problem(key):
                errors[key] = f"Invalid key: {problem}"
            elif len(key) > MAX_KEY_LENGTH:
                errors[key[:64]] = f"Keys are at most {MAX_KEY_LENGTH} characters."
            elif not isinstance(value, str):
                errors[key] = "Values must be strings."
            elif len(value) > MAX_VALUE_LENGTH:
                errors[key] = f"Values are at most {MAX_VALUE_LENGTH} characters."
            elif problem := text_problem(value, allow_empty=True):
                errors[key] = f"Invalid value: {problem}"
        if errors:
            raise serializers.ValidationError(errors)
        return dict(data)


# --- nodes --------------------------------------------------------------------------------------------------


class NodeSerializer(serializers.ModelSerializer):
    """One node. Expects `model_count` and `in_flight_count` annotations and prefetched labels
    (`nodes.api.admin.node_queryset`)."""

    labels = serializers.SerializerMethodField()
    label_sources = serializers.SerializerMethodField()
    max_replicas_per_model = serializers.IntegerField(source="effective_max_replicas", read_only=True)
    max_replicas_per_model_manually_set = serializers.SerializerMethodField()
    model_count = serializers.IntegerField(read_only=True, help_text="Replica rows on this node, any state.")
    in_flight_count = serializers.IntegerField(
        read_only=True, help_text="Requests in flight on its replicas."
    )
    backends = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="Backends the agent can start (built-in `echo` plus its `--backends-config` entries), as "
        "reported at its last registration.",
    )

    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "node_type",
            "address",
            "status",
            "labels",
            "label_sources",
            "max_replicas_per_model",
            "max_replicas_per_model_manually_set",
            "worker_max_replicas_per_model",
            "total_vram",
            "available_vram",
            "reserved_vram",
            "total_ram",
            "available_ram",
            "gpu_vendor",
            "backends",
            "last_heartbeat",
            "approved_at",
            "model_count",
            "in_flight_count",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(
        serializers.DictField(child=serializers.CharField(), help_text="Auto-labels included.")
    )
    def get_labels(self, node: Node) -> dict[str, str]:
        return {label.key: label.value for label in node.labels.all()}

    @extend_schema_field(
        serializers.DictField(
            child=serializers.ChoiceField(choices=["admin", "worker", "auto"]),
            help_text="Who set each label: `admin` (never overwritten by the worker), `worker` (refreshed at "
            "each registration) or `auto` (the control plane).",
        )
    )
    def get_label_sources(self, node: Node) -> dict[str, str]:
        return {label.key: label.source for label in node.labels.all()}

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_max_replicas_per_model_manually_set(self, node: Node) -> bool:
        return node.max_replicas_override is not None


class UnloadRequestSerializer(serializers.Serializer):
    model_name = ModelNameField()
    replica_index = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=MAX_REPLICAS_LIMIT
    )


class UnloadResponseSerializer(serializers.Serializer):
    unloaded = serializers.ListField(child=serializers.CharField(), help_text="Process keys removed.")


# `GET`/`PUT`/`PATCH /labels`: the body is the flat map itself, e.g. `{"env": "prod"}`.
LABELS_SCHEMA = {"type": "object", "additionalProperties": {"type": "string", "maxLength": MAX_VALUE_LENGTH}}


class OverrideRequestSerializer(serializers.Serializer):
    value = serializers.IntegerField(min_value=1, max_value=MAX_REPLICAS_LIMIT)


class LogLineSerializer(serializers.Serializer):
    timestamp = serializers.DateTimeField()
    stream = serializers.ChoiceField(choices=["stdout", "stderr"])
    text = serializers.CharField()
    process_key = serializers.CharField()


class LogsQuerySerializer(serializers.Serializer):
    tail = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=100_000, help_text="Last N lines; 0 = all buffered."
    )
