"""`/api/node/*`: the worker self-service API (CONTRACT §3.1). Node ids are matched as strings so that a
malformed id answers the JSON 404 of the API rather than Django's page."""

from django.urls import path

from nodes.api import worker

urlpatterns = [
    path("api/node/register", worker.RegisterView.as_view(), name="node-register"),
    path("api/node/<str:node_id>/heartbeat", worker.HeartbeatView.as_view(), name="node-heartbeat"),
    path("api/node/<str:node_id>/drain", worker.DrainView.as_view(), name="node-drain"),
    path("api/node/<str:node_id>/deregister", worker.DeregisterView.as_view(), name="node-deregister"),
    path("api/node/<str:node_id>/models", worker.ModelsView.as_view(), name="node-models"),
    path("api/node/<str:node_id>/downloads", worker.DownloadsView.as_view(), name="node-downloads"),
    path("api/node/<str:node_id>/artifacts/<path:name>", worker.ArtifactView.as_view(), name="node-artifact"),
]
