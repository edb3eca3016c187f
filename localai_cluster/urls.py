from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from localai_cluster import metrics, ops

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include("nodes.api.worker_urls")),  # /api/node/*  worker self-service
    path("", include("scheduling.api.urls")),  # /api/models/*, /api/nodes/scheduling*
    path("", include("nodes.api.admin_urls")),  # /api/nodes/*
    path("", include("scheduling.gateway_urls")),  # /v1/*
    path("", include("nodes.urls")),  # /ui/nodes/*
    path("", include("scheduling.urls")),  # /ui/scheduling/*
    path("", include("audit.urls")),  # /api/audit, /ui/audit/
    path("", include("console.urls")),  # /ui/ (overview), /ui/keys/*, /ui/playground/*
]
