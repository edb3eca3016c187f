"""`/api/nodes/scheduling*` (included before `nodes.api.admin_urls`, so `scheduling` is never a node id) and
`/api/models*`. Model names may contain `/`: the `path` converter takes the rest of the URL."""

from django.urls import path

from scheduling.api import views

urlpatterns = [
    path("api/nodes/scheduling", views.RuleListView.as_view(), name="api-scheduling-rules"),
    path(
        "api/nodes/scheduling/<path:model_name>", views.RuleDetailView.as_view(), name="api-scheduling-rule"
    ),
    path("api/models", views.ModelListView.as_view(), name="api-models"),
    path("api/decisions", views.DecisionListView.as_view(), name="api-decisions"),
    path("api/plan", views.PlanView.as_view(), name="api-plan"),
    path(
        "api/models/<path:name>/retry-load", views.ModelRetryLoadView.as_view(), name="api-model-retry-load"
    ),
    path("api/models/<path:name>/load", views.ModelLoadView.as_view(), name="api-model-load"),
    path("api/models/<path:name>/unload", views.ModelUnloadView.as_view(), name="api-model-unload"),
    path(
        "api/models/<path:name>/files/scan", views.ModelFilesScanView.as_view(), name="api-model-files-scan"
    ),
    path("api/models/<path:name>/prefetch", views.ModelPrefetchView.as_view(), name="api-model-prefetch"),
    path("api/models/<path:name>", views.ModelDetailView.as_view(), name="api-model"),
]
