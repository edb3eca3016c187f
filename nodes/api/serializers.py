"""Serializers of the worker self-service API (`/api/node/*`, CONTRACT §3.1), and two shapes the admin API
shares: `ReplicaSerializer` (the worker's and the admin's replica lists look the same) and `ErrorSerializer`.

Input is checked strictly: numbers must be JSON integers (not strings or booleans), labels a flat map of
strings, so a malformed body is a 400 naming the field, never a 500. Strings are bounded in length and
number; none may hold a NUL or an unpaired surrogate (PostgreSQL cannot store them), and names, label keys and
process keys no control or line-breaking character (they end up in logs, URLs and process keys).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from nodes.choices import NodeType
from nodes.models import ModelReplica

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
LABEL_MAX_LENGTH = 255
MAX_LABELS = 256  # per node, as the admin API
MAX_REPORTED_REPLICAS = 4096  # process keys in one registration or heartbeat
MAX_REPORTED_ARTIFACTS = 100_000  # sha256 in one heartbeat
REPLICA_KEY_MAX_LENGTH = 512
MAX_REPORTED_BACKENDS = 256  # backend names in one registration
BACKEND_NAME_MAX_LENGTH = 64  # as a catalog model's `backend`
CREDENTIAL_MIN_LENGTH, CREDENTIAL_MAX_LENGTH = 32, 256
# Control characters, format characters (bidi overrides, zero-width), surrogates, line and paragraph separators.
_NAME_FORBIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# In free text (label values, vendor, state): what PostgreSQL cannot store, and control characters.
_TEXT_FORBIDDEN = frozenset({"Cc", "Cs"})


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a node name, label key or process key, or None."""
    if any(unicodedata.category(ch) in _NAME_FORBIDDEN for ch in value):
        return "Control, format and line-breaking characters are not allowed."
    return None


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as free text (a label value, a vendor), or None."""
    if any(unicodedata.category(ch) in _TEXT_FORBIDDEN for ch in value):
        return "Control characters, NUL and unpaired surrogates are not allowed."
    return None


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
    """A JSON string; numbers, booleans, lists and objects are refused, and so are NUL, control characters and
    unpaired surrogates (with `name=True` also format and line-breaking characters)."""

    default_error_messages = {"invalid": "A string is required."}

    def __init__(self, *, name: bool = False, **kwargs: Any) -> None:
        self.is_name = name
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        # Checked before the length so a long value is refused without scanning it twice.
        if len(data) <= (self.max_length or len(data)):
            problem = name_problem(data) if self.is_name else text_problem(data)
            if problem:
                raise serializers.ValidationError(problem)
        return super().to_internal_value(data)


class BoundedListField(serializers.ListField):
    """A ListField whose length is checked before any item is validated (a huge list is refused cheaply)."""

    def to_internal_value(self, data: Any) -> list:
        if isinstance(data, list) and self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


def size_field(**kwargs: Any) -> StrictIntegerField:
    """Bytes: a whole number in [0, 2**63)."""
    return StrictIntegerField(min_value=0, max_value=MAX_BIGINT, **kwargs)


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": 255},
        "maxProperties": MAX_LABELS,
    }
)
class LabelsField(serializers.Field):
    """A flat `{key: value}` map of strings: at most 256 entries, keys 1–255 characters without control,
    format or line-breaking characters, values up to 255 without control characters; neither may hold NUL
    or an unpaired surrogate."""

    default_error_messages = {
        "not_a_map": "Expected an object mapping label keys to string values.",
        "too_many": f"At most {MAX_LABELS} labels are allowed.",
        "bad_key": "Label keys must be 1 to 255 characters.",
        "bad_value": "Label values must be strings of at most 255 characters.",
    }

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if not isinstance(data, dict):
            self.fail("not_a_map")
        if len(data) > MAX_LABELS:
            self.fail("too_many")
        errors: dict[str, list[str]] = {}
        for key, value in data.items():
            shown = _shown_key(key)
            if not key or len(key) > LABEL_MAX_LENGTH:
                errors[shown or "(empty)"] = [self.error_messages["bad_key"]]
            elif problem := name_problem(key):
                errors[shown] = [f"Invalid key: {problem}"]
            elif not isinstance(value, str) or len(value) > LABEL_MAX_LENGTH:
                errors[shown] = [self.error_messages["bad_value"]]
            elif problem := text_problem(value):
                errors[shown] = [f"Invalid value: {problem}"]
        if errors:
            raise serializers.ValidationError(errors)
        return dict(data)

    def to_representation(self, value: dict[str, str]) -> dict[str, str]:
        return dict(value)


def _shown_key(key: str) -> str:
    """A label key as an error message may name it: printable (an escaped repr when it is not), bounded."""
    shown = key[:64]
    return shown if shown.isprintable() else ascii(shown)


class HeartbeatReplicaField(serializers.Field):
    """One process the worker runs: `{key, address?, state?}` (a bare `"model#N"` string is accepted too)."""

    default_error_messages = {"invalid": "Expected an object with a string `key` (`model#index`)."}

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if isinstance(data, str):
            data = {"key": data}
        if not isinstance(data, dict):
            self.fail("invalid")
        key, address, state = data.get("key"), data.get("address", ""), data.get("state", "")
        if not isinstance(key, str) or not key or len(key) > REPLICA_KEY_MAX_LENGTH:
            self.fail("invalid")
        if problem := name_problem(key):
            raise serializers.ValidationError(f"Invalid `key`: {problem}")
        if not isinstance(address, str) or not isinstance(state, str):
            raise serializers.ValidationError("`address` and `state` must be strings.")
        if len(address) > 255 or len(state) > 32:
            raise serializers.ValidationError("`address` is at most 255 characters, `state` at most 32.")
        if problem := text_problem(address) or text_problem(state):
            raise serializers.ValidationError(f"Invalid `address` or `state`: {problem}")
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

    name = StrictCharField(
        name=True,
        max_length=255,
        help_text="The worker's name; a known name must also prove it is the same agent "
        "(`node_credential` or `node_token`).",
    )
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
    replicas = BoundedListField(
        child=StrictCharField(name=True, max_length=REPLICA_KEY_MAX_LENGTH),
        max_length=MAX_REPORTED_REPLICAS,
        required=False,
        default=list,
        help_text="Process keys it runs. Ignored: a registration removes every replica row (the backends hold "
        "the previous backend token), so these become orphans of the next heartbeats.",
    )
    backends = BoundedListField(
        child=StrictCharField(name=True, max_length=BACKEND_NAME_MAX_LENGTH),
        max_length=MAX_REPORTED_BACKENDS,
        required=False,
        default=list,
        help_text="Names of the backends the agent can start: the built-in `echo` plus its `--backends-config` "
        "entries. Stored sorted without duplicates; an agent that sends none reports none.",
    )
    node_credential = StrictCharField(
        min_length=CREDENTIAL_MIN_LENGTH,
        max_length=CREDENTIAL_MAX_LENGTH,
        required=False,
        default="",
        help_text="The agent's node credential (its state file). A new name records it; a known name must "
        "present it (or `node_token`), else 409.",
    )
    node_token = StrictCharField(
        max_length=CREDENTIAL_MAX_LENGTH,
        required=False,
        allow_blank=True,
        default="",
        help_text="The node's current node token: the other proof a known name may present.",
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
class HeartbeatReplicasField(BoundedListField):
    child = HeartbeatReplicaField()


class HeartbeatSerializer(serializers.Serializer):
    """`POST /api/node/{id}/heartbeat`; a resource figure left out keeps its previous value."""

    available_vram = size_field(required=False)
    total_vram = size_field(required=False)
    available_ram = size_field(required=False)
    total_ram = size_field(required=False)
    gpu_vendor = StrictCharField(max_length=64, required=False, allow_blank=True)
    replicas = HeartbeatReplicasField(
        required=False,
        max_length=MAX_REPORTED_REPLICAS,
        help_text="Every process it runs. Left out with `replica_digest` given: the set is unchanged (the "
        "answer's `send_replicas` asks for the full list when the control plane's rows differ). Left out "
        "without a digest: no process.",
    )
    replica_digest = serializers.RegexField(
        r"^[0-9a-f]{64}$",
        required=False,
        help_text="SHA-256 (hex) of the process keys it runs, distinct, sorted by code point, joined by `\\n`. "
        "When it matches the node's rows, the heartbeat costs one UPDATE and nothing is reconciled.",
    )
    artifacts = serializers.ListField(
        child=serializers.RegexField(r"^[0-9a-f]{64}$"),
        required=False,
        max_length=MAX_REPORTED_ARTIFACTS,
        help_text="sha256 of the model files the agent holds, verified (placement prefers such nodes).",
    )


class DownloadReportSerializer(serializers.Serializer):
    key = StrictCharField(max_length=300, help_text="`<model>#<index>`")
    state = serializers.ChoiceField(choices=["downloading", "loading"])
    bytes = serializers.IntegerField(min_value=0, max_value=2**63 - 1, required=False, default=0)
    total = serializers.IntegerField(min_value=0, max_value=2**63 - 1, required=False, default=0)
    rate = serializers.FloatField(min_value=0, max_value=2**62, required=False, default=0)


class DownloadsSerializer(serializers.Serializer):
    """`POST /api/node/{id}/downloads`: staging progress of the node's `downloading` replicas."""

    replicas = DownloadReportSerializer(many=True, max_length=MAX_REPORTED_REPLICAS)


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
    backend_token = serializers.CharField(
        help_text="Give to backends as LOCALAI_GRPC_AUTH_TOKEN; new at every registration (backends started "
        "before it keep the previous one, which no longer matches)."
    )


class HeartbeatResponseSerializer(serializers.Serializer):
    status = serializers.CharField()
    max_replicas_per_model = serializers.IntegerField()
    orphans = serializers.ListField(
        child=serializers.CharField(), help_text="Process keys the worker runs that have no replica row."
    )
    send_replicas = serializers.BooleanField(
        help_text="List `replicas` in full next time (the control plane's rows differ from the set reported, "
        "or only a digest that did not match was sent: then nothing was recorded, send again at once)."
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
            "progress",
            "download_bytes",
            "download_total",
            "download_rate",
        ]
        read_only_fields = fields


@extend_schema_field(OpenApiTypes.OBJECT)
class ErrorDetailsField(serializers.DictField):
    pass


class ErrorSerializer(serializers.Serializer):
    """Every `/api/*` error: one sentence, and per-field details for invalid input."""

    error = serializers.CharField()
    details = ErrorDetailsField()
