"""Operator console pages: `/ui/` (overview), `/ui/keys/`, `/ui/playground/`, `/ui/models/`."""

from django.urls import path

from console import model_views, views

app_name = "console"

urlpatterns = [
    path("ui/keys/", views.key_list, name="keys"),
    path("ui/keys/create", views.key_create, name="key-create"),
    path("ui/keys/<int:key_id>/revoke", views.key_revoke, name="key-revoke"),
]

urlpatterns += [
    path("ui/", views.overview, name="overview"),
    path("ui/overview/samples", views.overview_samples, name="overview-samples"),
    path("ui/playground/", views.playground, name="playground"),
    path("ui/playground/chat", views.playground_chat, name="playground-chat"),
    path("ui/playground/embeddings", views.playground_embeddings, name="playground-embeddings"),
]

urlpatterns += [
    path("ui/models/", model_views.model_list, name="models"),
    path("ui/models/form", model_views.model_form, name="model-form"),
    path("ui/models/save", model_views.model_save, name="model-save"),
    path("ui/models/import", model_views.model_import, name="model-import"),
    path("ui/models/<int:model_id>/delete", model_views.model_delete, name="model-delete"),
    path("ui/models/<int:model_id>/load", model_views.model_load, name="model-load"),
    path("ui/models/<int:model_id>/unload", model_views.model_unload, name="model-unload"),
]
