"""Serializers of the worker self-service API (`/api/node/*`, CONTRACT §3.1), and two shapes the admin API
shares: `ReplicaSerializer` (the worker's and the admin's replica lists look the same) and `ErrorSerializer`.

Input is checked strictly: numbers must be JSON integers (not strings or booleans), labels a flat map of
strings, so a malformed body is a 400 naming the field, never a 500.
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from nodes.choices import NodeType
from nodes.models import ModelReplica

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
LABEL_MAX_LENGTH = 255
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer (an integral float such as `1e9` is accepted); strings and booleans are refused."""

    default_error_messages = {"invalid": "A whole number is required."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        if isinstance(data, float):
            if not data.is_integer():
                self.fail("invalid")
            data = int(data)
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A JSON string; numbers, booleans, lists and objects are refused."""

    default_error_messages = {"invalid": "A string is required."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def size_field(**kwargs: Any) -> StrictIntegerField:
    """Bytes: a whole number in [0, 2**63)."""
    return StrictIntegerField(min_value=0, max_value=MAX_BIGINT, **kwargs)


@extend_schema_field({"type": "object", "additionalProperties": {"type": "string", "maxLength": 255}})
class LabelsField(serializers.Field):
    """A flat `{key: value}` map of strings (keys 1–255 characters, values up to 255)."""

    default_error_messages = {
        "not_a_map": "Expected an object mapping label keys to string values.",
        "bad_key": "Label keys must be 1 to 255 characters.",
        "bad_value": "Label values must be strings of at most 255 characters.",
    }

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if not isinstance(data, dict):
            self.fail("not_a_map")
        errors: dict[str, list[str]] = {}
        for key, value in data.items():
            if not key or len(key) > LABEL_MAX_LENGTH:
                errors[key[:LABEL_MAX_LENGTH] or "(empty)"] = [self.error_messages["bad_key"]]
            elif not isinstance(value, str) or len(value) > LABEL_MAX_LENGTH:
                errors[key] = [self.error_messages["bad_value"]]
        if errors:
            raise serializers.ValidationError(errors)
        return dict(data)

    def to_representation(self, value: dict[str, str]) -> dict[str, str]:
        return dict(value)


class HeartbeatReplicaField(serializers.Field):
    """One process the worker runs: `{key, address?, state?}` (a bare `"model#N"` string is accepted too)."""

    default_error_messages = {"invalid": "Expected an object with a string `key` (`model#index`)."}

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if isinstance(data, str):
            data = {"key": data}
        if not isinstance(data, dict):
            self.fail("invalid")
        key, address, state = data.get("key"), data.get("address", ""), data.get("state", "")
        if not isinstance(key, str) or not key or len(key) > 512:
            self.fail("invalid")
        if not isinstance(address, str) or not isinstance(state, str):
            raise serializers.ValidationError("`address` and `state` must be strings.")
        return {"key": key, "address": address, "state": state}

    def to_representation(self, value: dict[str, str]) -> dict[str, str]:
        return value


class HeartbeatReplicaSchema(serializers.Serializer):
    """Documentation shape of one heartbeat replica entry."""

    key = serializers.CharField(help_text="Process key `model#index`.")
    address = serializers.CharField(required=False)
    state = serializers.CharField(required=False, help_text="`loading` or `running`.")


# --- requests -----------------------------------------------------------------------------------------------


class RegisterSerializer(serializers.Serializer):
    """`POST /api/node/register`."""

    name = StrictCharField(max_length=255, help_text="The worker's identity across restarts.")
    node_type = serializers.ChoiceField(choices=NodeType.choices, default=NodeType.BACKEND)
    address = StrictCharField(
        max_length=255,
        required=False,
        allow_blank=True,
        default="",
        help_text="host:port of the agent's WorkerControl service (required for backend nodes).",
    )
    total_vram = size_field(default=0)
    available_vram = size_field(default=0)
    total_ram = size_field(default=0)
    available_ram = size_field(default=0)
    gpu_vendor = StrictCharField(max_length=64, required=False, allow_blank=True, default="")
    labels = LabelsField(required=False, default=dict)
    max_replicas_per_model = StrictIntegerField(min_value=1, max_value=MAX_INT, default=1)
    replicas = serializers.ListField(
        child=StrictCharField(max_length=512), required=False, default=list, help_text="Process keys it runs."
    )

    def validate_address(self, value: str) -> str:
        if value and not _HOST_PORT.match(value):
            raise serializers.ValidationError("Expected host:port.")
        if value and not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise serializers.ValidationError("The port must be between 1 and 65535.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("node_type", NodeType.BACKEND) == NodeType.BACKEND and not attrs.get("address"):
            raise serializers.ValidationError({"address": ["Required for a backend node (host:port)."]})
        return attrs


@extend_schema_field(HeartbeatReplicaSchema(many=True))
class HeartbeatReplicasField(serializers.ListField):
    child = HeartbeatReplicaField()


class HeartbeatSerializer(serializers.Serializer):
    """`POST /api/node/{id}/heartbeat`; a resource figure left out keeps its previous value."""

    available_vram = size_field(required=False)
    total_vram = size_field(required=False)
    available_ram = size_field(required=False)
    total_ram = size_field(required=False)
    gpu_vendor = StrictCharField(max_length=64, required=False, allow_blank=True)
    replicas = HeartbeatReplicasField(required=False, default=list)


# --- responses ----------------------------------------------------------------------------------------------


class RegisterResponseSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    status = serializers.CharField()
    node_token = serializers.CharField(help_text="Present as `Authorization: Bearer` on every later call.")
    max_replicas_per_model = serializers.IntegerField(
        help_text="The effective cap (override or worker value)."
    )
    heartbeat_interval = serializers.FloatField(help_text="Seconds between heartbeats.")
    backend_token = serializers.CharField(help_text="Give to backends as LOCALAI_GRPC_AUTH_TOKEN.")


class HeartbeatResponseSerializer(serializers.Serializer):
    status = serializers.CharField()
    max_replicas_per_model = serializers.IntegerField()
    orphans = serializers.ListField(
        child=serializers.CharField(), help_text="Process keys the worker runs that have no replica row."
    )


class NodeStatusSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()


class ReplicaSerializer(serializers.ModelSerializer):
    """A replica as both the worker's and the admin's lists show it."""

    process_key = serializers.CharField(read_only=True, help_text="`<model_name>#<replica_index>`")

    class Meta:
        model = ModelReplica
        fields = [
            "id",
            "model_name",
            "replica_index",
            "process_key",
            "state",
            "address",
            "in_flight",
            "last_used",
            "loaded_at",
            "backend",
            "vram_bytes",
        ]
        read_only_fields = fields


@extend_schema_field(OpenApiTypes.OBJECT)
class ErrorDetailsField(serializers.DictField):
    pass


class ErrorSerializer(serializers.Serializer):
    """Every `/api/*` error: one sentence, and per-field details for invalid input."""

    error = serializers.CharField()
    details = ErrorDetailsField()
