"""System checks for configuration that would make a cluster unsafe or broken."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Warning, register


@register()
def check_secret_key(app_configs, **kwargs):
    if settings.USING_INSECURE_SECRET_KEY and not settings.DEBUG:
        return [
            Error(
                "DJANGO_SECRET_KEY is not set and DJANGO_DEBUG is off.",
                hint="Set DJANGO_SECRET_KEY to a long random value, or DJANGO_DEBUG=true for development.",
                id="localai_cluster.E001",
            )
        ]
    return []


@register()
def check_registration_token(app_configs, **kwargs):
    if not settings.LOCALAI_REGISTRATION_TOKEN:
        return [
            Warning(
                "LOCALAI_REGISTRATION_TOKEN is empty: any worker that can reach the control plane may register.",
                hint="Set LOCALAI_REGISTRATION_TOKEN and give the same value to every worker agent.",
                id="localai_cluster.W001",
            )
        ]
    return []


@register()
def check_allowed_hosts(app_configs, **kwargs):
    if not settings.DEBUG and not settings.ALLOWED_HOSTS_FROM_ENV:
        return [
            Warning(
                "DJANGO_ALLOWED_HOSTS is not set: only localhost, 127.0.0.1 and [::1] are served.",
                hint="Set DJANGO_ALLOWED_HOSTS to the host names clients and agents use, comma-separated.",
                id="localai_cluster.W002",
            )
        ]
    return []
