"""`/v1/*`: the OpenAI-compatible gateway (CONTRACT §3.4)."""

from django.urls import path, re_path

from scheduling import gateway

urlpatterns = [
    path("v1/models", gateway.list_models, name="v1-models"),
    path("v1/chat/completions", gateway.chat_completions, name="v1-chat-completions"),
    path("v1/completions", gateway.completions, name="v1-completions"),
    path("v1/embeddings", gateway.embeddings, name="v1-embeddings"),
    re_path(r"^v1/(?P<path>.*)$", gateway.not_found, name="v1-not-found"),
]
