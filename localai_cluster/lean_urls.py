"""The URLs the lean handler serves (`localai_cluster.lean_asgi`): the gateway and the probes only, so resolving
a `/v1` request does not walk every admin and API pattern first. The same views are in the root urlconf."""

from django.urls import include, path

from localai_cluster import metrics, ops
from localai_cluster.lean_asgi import with_connection_health

urlpatterns = [
    path("", include("scheduling.gateway_urls")),
    path("healthz", ops.healthz),
    path("readyz", ops.readyz),
    path("metrics", with_connection_health(metrics.metrics_view)),
]
