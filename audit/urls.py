"""`/api/audit` and the audit page `/ui/audit/`."""

from django.urls import path

from audit import views
from audit.api.views import AuditListView

app_name = "audit"

urlpatterns = [
    path("api/audit", AuditListView.as_view(), name="api-list"),
    path("ui/audit/", views.audit_list, name="list"),
]
