"""Admin API views of the scheduling app: rules (`/api/nodes/scheduling*`) and the catalog (`/api/models*`).
Thin: parse, call a service, render."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response

from localai_cluster.api import (
    PAGE_PARAMETERS,
    Conflict,
    paginated_response,
    paginated_schema,
    with_details,
)
from nodes.api.admin_serializers import AUTH_ERRORS, error_responses, model_name_problem
from nodes.api.permissions import AdminAPIView
from scheduling.api.serializers import (
    DecisionFilterSerializer,
    DecisionSerializer,
    LoadNowSerializer,
    ModelConfigSerializer,
    ModelConfigUpdateSerializer,
    ModelDetailSerializer,
    PlanSerializer,
    PrefetchSerializer,
    RuleSerializer,
    RuleWriteSerializer,
    UnloadAllRequestSerializer,
    UnloadAllSerializer,
    UnloadedReplicaSerializer,
)
from scheduling.artifacts import files_scan
from scheduling.catalog import model_config_delete, model_config_upsert, model_files_set, model_retry_load
from scheduling.choices import Outcome
from scheduling.loadfailures import LoadBackingOff
from scheduling.models import ModelConfig, SchedulingRule
from scheduling.placement import NoCapacity, UnknownModel
from scheduling.selectors import decisions_filtered, rules_with_current_replicas
from scheduling.services import (
    ReplicasBusy,
    model_load_one,
    model_prefetch_now,
    model_unload_all,
    placement_plan,
    rule_delete,
    rule_upsert,
)

MODEL_PATH_PARAM = OpenApiParameter(
    "model_name",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="Model name; may contain `/`, `:`, `.` and unicode (percent-encoded as needed).",
)
NAME_PATH_PARAM = OpenApiParameter(
    "name",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="Model name; may contain `/`, `:`, `.` and unicode (percent-encoded as needed).",
)


def _checked_name(name: str, what: str) -> str:
    """A model name taken from the URL; one that could never be stored is simply unknown (404)."""
    if model_name_problem(name):
        raise exceptions.NotFound(f"No {what} for this model name.")
    return name


# --- scheduling rules -----------------------------------------------------------------------------------


class RuleListView(AdminAPIView):
    @extend_schema(
        operation_id="scheduling_rules_list",
        responses={200: RuleSerializer(many=True), **error_responses(*AUTH_ERRORS)},
        tags=["scheduling"],
    )
    def get(self, request: Request) -> Response:
        return Response(RuleSerializer(rules_with_current_replicas(), many=True).data)

    @extend_schema(
        operation_id="scheduling_rules_upsert",
        request=RuleWriteSerializer,
        responses={200: RuleSerializer, **error_responses(400, *AUTH_ERRORS)},
        description="Creates the rule of `model_name`, or updates it in place (same id); resets its breaker.",
        tags=["scheduling"],
    )
    def post(self, request: Request) -> Response:
        serializer = RuleWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rule = rule_upsert(**serializer.validated_data)
        return Response(RuleSerializer(rules_with_current_replicas().get(pk=rule.pk)).data)


class RuleDetailView(AdminAPIView):
    def _rule(self, model_name: str) -> SchedulingRule:
        rule = rules_with_current_replicas().filter(model_name=_checked_name(model_name, "rule")).first()
        if rule is None:
            raise exceptions.NotFound("No scheduling rule for this model.")
        return rule

    @extend_schema(
        operation_id="scheduling_rules_retrieve",
        parameters=[MODEL_PATH_PARAM],
        responses={200: RuleSerializer, **error_responses(*AUTH_ERRORS, 404)},
        tags=["scheduling"],
    )
    def get(self, request: Request, model_name: str) -> Response:
        return Response(RuleSerializer(self._rule(model_name)).data)

    @extend_schema(
        operation_id="scheduling_rules_destroy",
        parameters=[MODEL_PATH_PARAM],
        responses={204: OpenApiResponse(description="Deleted."), **error_responses(*AUTH_ERRORS, 404)},
        tags=["scheduling"],
    )
    def delete(self, request: Request, model_name: str) -> Response:
        if not rule_delete(model_name=_checked_name(model_name, "rule")):
            raise exceptions.NotFound("No scheduling rule for this model.")
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- model catalog --------------------------------------------------------------------------------------


class ModelListView(AdminAPIView):
    @extend_schema(
        operation_id="models_list",
        parameters=PAGE_PARAMETERS,
        responses={
            200: paginated_schema("PaginatedModelConfigList", ModelConfigSerializer(many=True)),
            **error_responses(404, *AUTH_ERRORS),
        },
        tags=["models"],
    )
    def get(self, request: Request) -> Response:
        return paginated_response(request, self, ModelConfig.objects.order_by("name"), ModelConfigSerializer)

    @extend_schema(
        operation_id="models_create",
        request=ModelConfigSerializer,
        responses={201: ModelConfigSerializer, **error_responses(400, *AUTH_ERRORS)},
        description="Adds a model to the catalog (400 when the name is taken: use PUT to replace).",
        tags=["models"],
    )
    def post(self, request: Request) -> Response:
        serializer = ModelConfigSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if ModelConfig.objects.filter(name=serializer.validated_data["name"]).exists():
            raise exceptions.ValidationError({"name": ["A model with this name already exists."]})
        config, _ = model_config_upsert(**serializer.validated_data)
        return Response(ModelConfigSerializer(config).data, status=status.HTTP_201_CREATED)


class ModelDetailView(AdminAPIView):
    def _config(self, name: str) -> ModelConfig:
        config = ModelConfig.objects.filter(name=_checked_name(name, "model")).first()
        if config is None:
            raise exceptions.NotFound("No model with this name in the catalog.")
        return config

    def _write(self, request: Request, name: str, *, partial: bool) -> Response:
        existing = None if not partial else self._config(name)
        data = request.data
        if not isinstance(data, dict):
            raise exceptions.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        if "name" in data and data["name"] != name:
            raise exceptions.ValidationError(
                {"name": ["Must be the name in the URL (renaming is not supported)."]}
            )
        serializer = ModelConfigUpdateSerializer(existing, data={**data, "name": name}, partial=partial)
        serializer.is_valid(raise_exception=True)
        fields = {**(ModelConfigSerializer(existing).data if existing else {}), **serializer.validated_data}
        config, created = model_config_upsert(**fields)
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(ModelDetailSerializer(config).data, status=code)

    @extend_schema(
        operation_id="models_retrieve",
        parameters=[NAME_PATH_PARAM],
        responses={200: ModelDetailSerializer, **error_responses(*AUTH_ERRORS, 404)},
        tags=["models"],
    )
    def get(self, request: Request, name: str) -> Response:
        return Response(ModelDetailSerializer(self._config(name)).data)

    @extend_schema(
        operation_id="models_replace",
        parameters=[NAME_PATH_PARAM],
        request=ModelConfigUpdateSerializer,
        responses={
            200: ModelDetailSerializer,
            201: ModelDetailSerializer,
            **error_responses(400, *AUTH_ERRORS),
        },
        description="Replaces the model (fields not given take their defaults), or creates it (201).",
        tags=["models"],
    )
    def put(self, request: Request, name: str) -> Response:
        if model_name_problem(name):
            raise exceptions.ValidationError({"name": [model_name_problem(name)]})
        return self._write(request, name, partial=False)

    @extend_schema(
        operation_id="models_partial_update",
        parameters=[NAME_PATH_PARAM],
        request=ModelConfigUpdateSerializer(partial=True),
        responses={200: ModelDetailSerializer, **error_responses(400, *AUTH_ERRORS, 404)},
        tags=["models"],
    )
    def patch(self, request: Request, name: str) -> Response:
        return self._write(request, name, partial=True)

    @extend_schema(
        operation_id="models_destroy",
        parameters=[NAME_PATH_PARAM],
        responses={204: OpenApiResponse(description="Deleted."), **error_responses(*AUTH_ERRORS, 404)},
        tags=["models"],
    )
    def delete(self, request: Request, name: str) -> Response:
        if not model_config_delete(name=_checked_name(name, "model")):
            raise exceptions.NotFound("No model with this name in the catalog.")
        return Response(status=status.HTTP_204_NO_CONTENT)


RETRY_SUFFIX = "/retry-load"


class ModelRetryLoadView(ModelDetailView):
    """`POST /api/models/{name}/retry-load`: "retry now" — forgets the model's failed loads, so the next
    request (or reconciler tick) loads it at once. The other methods of this URL are those of a model whose
    name ends in `/retry-load`."""

    @extend_schema(
        operation_id="models_retry_load",
        parameters=[NAME_PATH_PARAM],
        request=None,
        responses={200: ModelDetailSerializer, **error_responses(*AUTH_ERRORS, 404)},
        description="Clears the model's load backoff (`load_failure` becomes null): the next request or "
        "reconciler tick tries to load it again. Answers the model.",
        tags=["models"],
    )
    def post(self, request: Request, name: str) -> Response:
        config = self._config(name)
        model_retry_load(name=config.name)
        return Response(ModelDetailSerializer(config).data)

    @extend_schema(exclude=True)
    def get(self, request: Request, name: str) -> Response:
        return super().get(request, name + RETRY_SUFFIX)

    @extend_schema(exclude=True)
    def put(self, request: Request, name: str) -> Response:
        return super().put(request, name + RETRY_SUFFIX)

    @extend_schema(exclude=True)
    def patch(self, request: Request, name: str) -> Response:
        return super().patch(request, name + RETRY_SUFFIX)

    @extend_schema(exclude=True)
    def delete(self, request: Request, name: str) -> Response:
        return super().delete(request, name + RETRY_SUFFIX)


class _ModelActionView(ModelDetailView):
    """A `POST` action under `/api/models/{name}/<suffix>`; the other methods of such a URL are those of a
    model whose name ends in `/<suffix>` (as for `retry-load`)."""

    suffix = ""

    @extend_schema(exclude=True)
    def get(self, request: Request, name: str) -> Response:
        return super().get(request, name + self.suffix)

    @extend_schema(exclude=True)
    def put(self, request: Request, name: str) -> Response:
        return super().put(request, name + self.suffix)

    @extend_schema(exclude=True)
    def patch(self, request: Request, name: str) -> Response:
        return super().patch(request, name + self.suffix)

    @extend_schema(exclude=True)
    def delete(self, request: Request, name: str) -> Response:
        return super().delete(request, name + self.suffix)


class PlacementRefused(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "No capacity."
    default_code = "no_capacity"


class LoadFailedError(exceptions.APIException):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "The load failed."
    default_code = "load_failed"


class ModelLoadView(_ModelActionView):
    """`POST /api/models/{name}/load`: "load one now"."""

    suffix = "/load"

    @extend_schema(
        operation_id="models_load_one",
        parameters=[NAME_PATH_PARAM],
        request=None,
        responses={200: LoadNowSerializer, **error_responses(*AUTH_ERRORS, 404, 409, 502, 503)},
        description="Places and loads one more replica of the model now, through the placement pipeline "
        "(trigger `admin`: the same verdicts, ranking, eviction of an idle replica and decision record as a "
        "request's cold load), and answers when it is loaded, with the decision record. 503: no node can take "
        "it (`error` lists each node's verdict, `details.decision` the record). 502: the load failed "
        "(`details.decision`). 409: the model's load cooldown is running (`details.retry_after`, seconds; "
        "`retry-load` clears it).",
        tags=["models"],
    )
    def post(self, request: Request, name: str) -> Response:
        config = self._config(name)
        try:
            result = model_load_one(model_name=config.name)
        except UnknownModel:
            raise exceptions.NotFound("No model with this name in the catalog.") from None
        decision = DecisionSerializer(result.decision).data if result.decision is not None else None
        if result.placed is not None:
            placed = result.placed
            body = {
                "outcome": result.outcome,
                "node": placed.node_name,
                "process_key": placed.process_key,
                "address": placed.address,
                "load_seconds": placed.load_seconds,
                "evicted": placed.evicted,
                "decision": result.decision,
            }
            return Response(LoadNowSerializer(body).data)
        error = result.error
        reason = error.reason if error is not None else "Not placed."
        if isinstance(error, LoadBackingOff):
            raise with_details(Conflict(reason), {"retry_after": error.retry_after})
        if isinstance(error, NoCapacity):
            raise with_details(PlacementRefused(reason), {"decision": decision})
        raise with_details(LoadFailedError(reason), {"decision": decision})


class ModelUnloadView(_ModelActionView):
    """`POST /api/models/{name}/unload`: "unload all"."""

    suffix = "/unload"

    @extend_schema(
        operation_id="models_unload_all",
        parameters=[NAME_PATH_PARAM],
        request=UnloadAllRequestSerializer,
        responses={200: UnloadAllSerializer, **error_responses(400, *AUTH_ERRORS, 404, 409)},
        description="Unloads every replica of the model on every node: the rows go at once, then each agent "
        "is asked to stop exactly those process keys. A replica serving requests is never cut off silently: "
        "without `force`, 409 lists the busy replicas (`details.busy`) and nothing is unloaded. 404: the "
        "model is neither in the catalog nor running anywhere. A rule's minimum places replicas again on the "
        "reconciler's next tick.",
        tags=["models"],
    )
    def post(self, request: Request, name: str) -> Response:
        name = _checked_name(name, "model")
        body = UnloadAllRequestSerializer(data=request.data if request.data else {})
        body.is_valid(raise_exception=True)
        try:
            removed = model_unload_all(model_name=name, force=body.validated_data["force"])
        except ReplicasBusy as busy:
            raise with_details(
                Conflict(str(busy)), {"busy": UnloadedReplicaSerializer(busy.busy, many=True).data}
            ) from None
        if not removed and not ModelConfig.objects.filter(name=name).exists():
            raise exceptions.NotFound("No model with this name in the catalog, and no replica of it.")
        return Response(UnloadAllSerializer({"unloaded": removed}).data)


class ModelFilesScanView(_ModelActionView):
    """`POST /api/models/{name}/files/scan`: fills `sha256` and `size` of the model's `cp://` files from the
    files under `LOCALAI_ARTIFACTS_PATH`."""

    suffix = "/files/scan"

    @extend_schema(
        operation_id="models_files_scan",
        parameters=[NAME_PATH_PARAM],
        request=None,
        responses={200: ModelDetailSerializer, **error_responses(400, *AUTH_ERRORS, 404)},
        description="Computes sha256 and size of every `cp://` file of the model from LOCALAI_ARTIFACTS_PATH "
        "and saves them; 400 naming the files that are not there (nothing saved). Answers the model.",
        tags=["models"],
    )
    def post(self, request: Request, name: str) -> Response:
        config = self._config(name)
        files, missing = files_scan(list(config.files or []))
        if missing:
            raise exceptions.ValidationError(
                {"files": [f"not found under LOCALAI_ARTIFACTS_PATH: {', '.join(missing)}"]}
            )
        config = model_files_set(name=config.name, files=files)
        return Response(ModelDetailSerializer(config).data)


class ModelPrefetchView(_ModelActionView):
    """`POST /api/models/{name}/prefetch`: asks every matching node to stage the model's files now."""

    suffix = "/prefetch"

    @extend_schema(
        operation_id="models_prefetch",
        parameters=[NAME_PATH_PARAM],
        request=None,
        responses={200: PrefetchSerializer, **error_responses(400, *AUTH_ERRORS, 404)},
        description="Asks every schedulable node matching the model's rule to stage its files ahead of any "
        "load (the agents download in the background). Answers per node what it is downloading and what it "
        "holds, or the error; 400 for a model without files.",
        tags=["models"],
    )
    def post(self, request: Request, name: str) -> Response:
        config = self._config(name)
        if not config.files:
            raise exceptions.ValidationError({"files": ["The model has no files to prefetch."]})
        results = model_prefetch_now(model_name=config.name)
        return Response(PrefetchSerializer({"model": config.name, "nodes": results}).data)


# --- placement decisions and the dry run ----------------------------------------------------------------


class DecisionListView(AdminAPIView):
    @extend_schema(
        operation_id="decisions_list",
        parameters=[
            OpenApiParameter("model", OpenApiTypes.STR, description="Only this model's records."),
            OpenApiParameter(
                "node", OpenApiTypes.STR, description="Only records placing on (or naming) this node."
            ),
            OpenApiParameter(
                "outcome", OpenApiTypes.STR, enum=Outcome.values, description="Only this outcome."
            ),
            OpenApiParameter(
                "since", OpenApiTypes.DATETIME, description="Only records at or after this time."
            ),
            *PAGE_PARAMETERS,
        ],
        responses={
            200: paginated_schema("PaginatedDecisionList", DecisionSerializer(many=True)),
            **error_responses(400, 404, *AUTH_ERRORS),
        },
        description="Placement decision records, newest first: every placement attempt (request cold path, "
        "reconciler, burst), eviction, trim and breaker trip, with every node's verdict.",
        tags=["scheduling"],
    )
    def get(self, request: Request) -> Response:
        query = DecisionFilterSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return paginated_response(
            request, self, decisions_filtered(**query.validated_data), DecisionSerializer
        )


class PlanView(AdminAPIView):
    @extend_schema(
        operation_id="plan_retrieve",
        parameters=[
            OpenApiParameter(
                "model",
                OpenApiTypes.STR,
                required=True,
                description="A catalog model name (may contain `/`).",
            )
        ],
        responses={200: PlanSerializer, **error_responses(400, 404, *AUTH_ERRORS)},
        description="A dry run: what placing one replica of the model would do now — every node's verdict, "
        "the node it would claim on, or the replica an eviction would unload. Claims and loads nothing.",
        tags=["scheduling"],
    )
    def get(self, request: Request) -> Response:
        name = request.query_params.get("model", "")
        if not name:
            raise exceptions.ValidationError({"model": ["This query parameter is required."]})
        try:
            plan = placement_plan(model_name=_checked_name(name, "model"))
        except UnknownModel:
            raise exceptions.NotFound("No model with this name in the catalog.") from None
        return Response(PlanSerializer(plan.as_dict()).data)
