"""Operator console pages: `/ui/` (overview), `/ui/keys/`, `/ui/playground/`."""

from django.urls import path

from console import views

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
