"""Serializers of `/api/nodes/scheduling*` and `/api/models*`."""

from __future__ import annotations

import json
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from nodes.api.admin_serializers import (
    MAX_REPLICAS_LIMIT,
    CleanCharField,
    ModelNameField,
    StringMapField,
    has_bad_text,
)
from scheduling.artifacts import FilesInvalid, files_clean
from scheduling.choices import Outcome, RoutingPolicy, Verdict
from scheduling.loadfailures import load_failure_payload
from scheduling.models import (
    LoadFailure,
    ModelConfig,
    PlacementDecision,
    SchedulingRule,
    default_routing_policy,
)

MAX_OPTIONS_BYTES = 64 * 1024
MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
MAX_DELAY = 7 * 24 * 3600  # seconds: a week
MAX_TARGET_IN_FLIGHT = 100_000


# --- scheduling rules -----------------------------------------------------------------------------------


class RuleWriteSerializer(serializers.Serializer):
    """`POST /api/nodes/scheduling`: creates the rule of `model_name` or updates it (same id)."""

    model_name = ModelNameField()
    node_selector = StringMapField(
        required=False, default=dict, help_text="Labels a node must all have (exact strings)."
    )
    min_replicas = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=MAX_REPLICAS_LIMIT
    )
    max_replicas = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=MAX_REPLICAS_LIMIT, help_text="0 = no limit."
    )
    target_in_flight = serializers.IntegerField(
        required=False,
        default=0,
        min_value=0,
        max_value=MAX_TARGET_IN_FLIGHT,
        help_text="In-flight requests per replica the autoscaler aims at; 0 = off (a replica is added only "
        "when every replica is busy).",
    )
    upscale_delay = serializers.IntegerField(
        required=False,
        default=30,
        min_value=0,
        max_value=MAX_DELAY,
        help_text="Seconds the desired count must stay above the current one before replicas are added.",
    )
    downscale_delay = serializers.IntegerField(
        required=False,
        default=None,
        allow_null=True,
        min_value=0,
        max_value=MAX_DELAY,
        help_text="Seconds the desired count must stay below the current one (and since the last scale-up) "
        "before idle replicas are unloaded; null = LOCALAI_SCALE_DOWN_DELAY.",
    )
    scale_to_zero_after = serializers.IntegerField(
        required=False,
        default=0,
        min_value=0,
        max_value=MAX_DELAY,
        help_text="With min_replicas 0: unload the last replica after this many seconds without a request; "
        "0 = never.",
    )
    prefetch = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Stage the model's files on every matching node ahead of any load (reconciler).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["max_replicas"] > 0 and attrs["min_replicas"] > attrs["max_replicas"]:
            raise serializers.ValidationError(
                {"min_replicas": ["Must not exceed max_replicas when max_replicas is above 0."]}
            )
        return attrs


class RuleSerializer(serializers.ModelSerializer):
    """A rule with its current replica count (`loading` + `loaded` rows of the model, cluster-wide)."""

    node_selector = serializers.DictField(child=serializers.CharField())
    current_replicas = serializers.IntegerField(read_only=True)

    class Meta:
        model = SchedulingRule
        fields = [
            "id",
            "model_name",
            "node_selector",
            "min_replicas",
            "max_replicas",
            "target_in_flight",
            "upscale_delay",
            "downscale_delay",
            "scale_to_zero_after",
            "prefetch",
            "unsatisfiable_until",
            "unsatisfiable_ticks",
            "current_replicas",
        ]
        read_only_fields = fields


# --- model catalog --------------------------------------------------------------------------------------


@extend_schema_field(OpenApiTypes.OBJECT)
class OptionsField(serializers.JSONField):
    """`ModelOptions` fields as a JSON object (at most 64 KiB)."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise serializers.ValidationError("Expected a JSON object.")
        if has_bad_text(data):
            raise serializers.ValidationError("NUL characters and unpaired surrogates are not allowed.")
        if len(json.dumps(data)) > MAX_OPTIONS_BYTES:
            raise serializers.ValidationError(f"At most {MAX_OPTIONS_BYTES} bytes of JSON are allowed.")
        return data


@extend_schema_field(
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "uri": {"type": "string"},
                "sha256": {"type": "string"},
                "size": {"type": "integer"},
                "path": {"type": "string"},
            },
            "required": ["uri", "path"],
        },
    }
)
class FilesField(serializers.JSONField):
    """`[{uri, sha256, size, path}]`: files staged to a worker before a load (`scheduling.artifacts`)."""

    def to_internal_value(self, data: Any) -> list[dict[str, Any]]:
        if has_bad_text(data):
            raise serializers.ValidationError("NUL characters and unpaired surrogates are not allowed.")
        try:
            return files_clean(data)
        except FilesInvalid as error:
            raise serializers.ValidationError(str(error)) from None


class ModelConfigSerializer(serializers.ModelSerializer):
    """A catalog entry. On `PUT`/`PATCH /api/models/{name}` the name comes from the URL; a `name` in the body
    must be the same."""

    name = ModelNameField()
    backend = CleanCharField(max_length=64, required=False, default="echo")
    model = CleanCharField(
        max_length=1024,
        required=False,
        allow_blank=True,
        default="",
        help_text="File, path or URI given to the backend.",
    )
    options = OptionsField(required=False, default=dict, help_text="ModelOptions fields.")
    vram_bytes = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=MAX_BIGINT, help_text="Estimate; 0 = unknown."
    )
    context_size = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=MAX_INT
    )
    files = FilesField(
        required=False,
        default=list,
        help_text="Files the agent stages under its models path before loading: uri (https://, http:// or "
        "cp://NAME), sha256, size, path.",
    )
    routing = serializers.ChoiceField(
        choices=RoutingPolicy.choices,
        required=False,
        default=default_routing_policy,
        help_text="How requests pick a replica: least_in_flight, prefix_cache or session "
        "(default LOCALAI_ROUTING_POLICY).",
    )

    class Meta:
        model = ModelConfig
        fields = ["name", "backend", "model", "options", "vram_bytes", "context_size", "files", "routing"]


class ModelConfigUpdateSerializer(ModelConfigSerializer):
    """`PUT`/`PATCH /api/models/{name}`: the name comes from the URL; when given it must be the same."""

    name = ModelNameField(required=False, help_text="Optional; must equal the name in the URL.")


class LoadFailureSerializer(serializers.Serializer):
    """The model's loads are failing: no placement path starts another backend for it before `retry_at`."""

    failures = serializers.IntegerField(
        help_text="Failed load attempts in a row (concurrent ones count once)."
    )
    last_error = serializers.CharField(
        help_text="The last failed load's error, with the backend's own message."
    )
    since = serializers.DateTimeField(help_text="When the first of these failures happened.")
    retry_at = serializers.DateTimeField(
        help_text="No load is tried before this (LOCALAI_LOAD_FAILURE_BACKOFF, doubling per failure, 5 min max)."
    )


class ModelDetailSerializer(ModelConfigSerializer):
    """A catalog entry as `GET /api/models/{name}` answers it: with its load backoff."""

    load_failure = serializers.SerializerMethodField(
        help_text="Null unless the model's last load failed and it has not loaded since."
    )

    class Meta(ModelConfigSerializer.Meta):
        fields = [*ModelConfigSerializer.Meta.fields, "load_failure"]

    @extend_schema_field(LoadFailureSerializer(allow_null=True))
    def get_load_failure(self, config: ModelConfig) -> dict[str, Any] | None:
        failure = LoadFailure.objects.filter(model_name=config.name).first()
        payload = load_failure_payload(failure)
        return None if payload is None else LoadFailureSerializer(payload).data


# --- placement decisions and the dry run ----------------------------------------------------------------


class CandidateSerializer(serializers.Serializer):
    node = serializers.CharField()
    verdict = serializers.ChoiceField(choices=Verdict.choices)
    detail = serializers.CharField()


class DecisionSerializer(serializers.ModelSerializer):
    """One placement decision record (`scheduling.PlacementDecision`)."""

    model = serializers.CharField(source="model_name")
    node = serializers.CharField(source="node_name")
    time = serializers.DateTimeField(source="created_at")
    candidates = CandidateSerializer(many=True)
    omitted = serializers.DictField(
        child=serializers.IntegerField(), help_text="Nodes not listed in `candidates`, counted per verdict."
    )

    class Meta:
        model = PlacementDecision
        fields = [
            "id",
            "time",
            "model",
            "trigger",
            "outcome",
            "node",
            "replica_index",
            "duration",
            "message",
            "candidates",
            "omitted",
        ]


class DecisionFilterSerializer(serializers.Serializer):
    """The query of `GET /api/decisions`: every filter optional."""

    model = CleanCharField(required=False, max_length=255)
    node = CleanCharField(required=False, max_length=255)
    outcome = serializers.ChoiceField(choices=Outcome.choices, required=False)
    since = serializers.DateTimeField(required=False)


class PlanSerializer(serializers.Serializer):
    """What a placement of `model` would do now (`GET /api/plan`)."""

    model = serializers.CharField()
    vram_bytes = serializers.IntegerField()
    selector = StringMapField()
    chosen = serializers.CharField(allow_null=True, help_text="The node a placement would claim on.")
    evict = serializers.CharField(
        allow_null=True, help_text="With no node eligible: the process key an eviction would unload."
    )
    evict_node = serializers.CharField(allow_null=True)
    message = serializers.CharField(help_text="The refusal a placement would answer, when nothing fits.")
    candidates = CandidateSerializer(many=True)


# --- admin actions: "load one now" and "unload all" -----------------------------------------------------


class LoadNowSerializer(serializers.Serializer):
    """`POST /api/models/{name}/load` when a replica was placed and loaded."""

    outcome = serializers.ChoiceField(choices=[Outcome.PLACED])
    node = serializers.CharField(help_text="The node chosen.")
    process_key = serializers.CharField(help_text="`model#index` of the new replica.")
    address = serializers.CharField(help_text="The backend's address.")
    load_seconds = serializers.FloatField()
    evicted = serializers.ListField(
        child=serializers.CharField(), help_text="Idle replicas unloaded to make room (process keys)."
    )
    decision = DecisionSerializer(allow_null=True, help_text="The decision record this placement wrote.")


class UnloadAllRequestSerializer(serializers.Serializer):
    """`POST /api/models/{name}/unload`; an empty body is `{"force": false}`."""

    force = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Also unload replicas serving requests (those requests are cut off). Without it, any such "
        "replica makes the call answer 409 and nothing is unloaded.",
    )


class UnloadedReplicaSerializer(serializers.Serializer):
    node = serializers.CharField(source="node_name")
    process_key = serializers.CharField()
    state = serializers.CharField()
    in_flight = serializers.IntegerField(help_text="Requests it was serving (cut off when above 0).")


class UnloadAllSerializer(serializers.Serializer):
    unloaded = UnloadedReplicaSerializer(many=True)


# --- model files -----------------------------------------------------------------------------------------


class PrefetchNodeSerializer(serializers.Serializer):
    node_name = serializers.CharField()
    downloading = serializers.ListField(child=serializers.CharField(), help_text="Paths being downloaded.")
    held = serializers.ListField(child=serializers.CharField(), help_text="Paths already present, verified.")
    error = serializers.CharField(help_text="The agent's error; empty when it was asked.")


class PrefetchSerializer(serializers.Serializer):
    model = serializers.CharField()
    nodes = PrefetchNodeSerializer(many=True)
