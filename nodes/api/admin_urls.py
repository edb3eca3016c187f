"""`/api/nodes/*` admin routes (the scheduling rules under `/api/nodes/scheduling*` are routed before these)."""

from django.urls import path

from nodes.api import admin

urlpatterns = [
    path("api/nodes", admin.NodeListView.as_view(), name="api-nodes"),
    path("api/nodes/<str:node_id>", admin.NodeDetailView.as_view(), name="api-node"),
    path("api/nodes/<str:node_id>/approve", admin.NodeApproveView.as_view(), name="api-node-approve"),
    path("api/nodes/<str:node_id>/drain", admin.NodeDrainView.as_view(), name="api-node-drain"),
    path("api/nodes/<str:node_id>/resume", admin.NodeResumeView.as_view(), name="api-node-resume"),
    path("api/nodes/<str:node_id>/models", admin.NodeModelsView.as_view(), name="api-node-models"),
    path("api/nodes/<str:node_id>/models/unload", admin.NodeUnloadView.as_view(), name="api-node-unload"),
    path("api/nodes/<str:node_id>/labels", admin.NodeLabelsView.as_view(), name="api-node-labels"),
    path(
        "api/nodes/<str:node_id>/labels/<path:key>",
        admin.NodeLabelDetailView.as_view(),
        name="api-node-label",
    ),
    path(
        "api/nodes/<str:node_id>/max-replicas-per-model",
        admin.NodeOverrideView.as_view(),
        name="api-node-max-replicas",
    ),
    path(
        "api/nodes/<str:node_id>/backend-logs",
        admin.NodeBackendLogKeysView.as_view(),
        name="api-node-log-keys",
    ),
    path(
        "api/nodes/<str:node_id>/backend-logs/<path:key>",
        admin.NodeBackendLogsView.as_view(),
        name="api-node-logs",
    ),
]
