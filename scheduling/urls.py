"""Operator page of the scheduling rules: `/ui/scheduling/` (CONTRACT §3.6). Model names, which may contain
`/`, travel as query or form parameters."""

from django.urls import path

from scheduling import model_views, views

app_name = "scheduling"

urlpatterns = [
    path("ui/scheduling/", views.rule_list, name="rules"),
    path("ui/scheduling/form", views.rule_form, name="form"),
    path("ui/scheduling/save", views.rule_save, name="save"),
    path("ui/scheduling/delete", views.rule_delete, name="delete"),
    path("ui/scheduling/load-failures", views.load_failures, name="load-failures"),
    path("ui/scheduling/retry-load", views.retry_load, name="retry-load"),
    path("ui/decisions/", views.decision_list, name="decisions"),
    path("ui/models/", model_views.model_list, name="models"),
    path("ui/models/save", model_views.model_save, name="model-save"),
]
