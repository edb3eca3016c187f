"""Operator pages of the registry: `/ui/nodes/…` (CONTRACT §3.6)."""

from django.urls import path

from nodes import views

app_name = "nodes"

urlpatterns = [
    path("ui/nodes/", views.node_list, name="list"),
    path("ui/nodes/<uuid:node_id>/", views.node_detail, name="detail"),
    path("ui/nodes/<uuid:node_id>/replicas", views.node_replicas, name="replicas"),
    path("ui/nodes/<uuid:node_id>/audit", views.node_audit, name="audit"),
    path("ui/nodes/<uuid:node_id>/approve", views.node_approve, name="approve"),
    path("ui/nodes/<uuid:node_id>/drain", views.node_drain, name="drain"),
    path("ui/nodes/<uuid:node_id>/resume", views.node_resume, name="resume"),
    path("ui/nodes/<uuid:node_id>/delete", views.node_delete, name="delete"),
    path("ui/nodes/<uuid:node_id>/capacity", views.node_capacity, name="capacity"),
    path("ui/nodes/<uuid:node_id>/capacity/reset", views.node_capacity_reset, name="capacity-reset"),
    path("ui/nodes/<uuid:node_id>/labels", views.node_label_add, name="label-add"),
    path("ui/nodes/<uuid:node_id>/labels/remove", views.node_label_remove, name="label-remove"),
    path("ui/nodes/<uuid:node_id>/replicas/<int:replica_id>/unload", views.replica_unload, name="unload"),
    # `key` is `model#N` (sent as `model%23N`) or a bare model name, which may contain `/`.
    path("ui/nodes/<uuid:node_id>/logs/<path:key>", views.replica_logs, name="logs"),
    path("ui/nodes/<uuid:node_id>/staging", views.replica_staging, name="staging"),
]
