"""Prepare a local cluster for the quick start: an admin user and the demo model `echo-1`."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model

from audit.context import AuditedCommand

DEMO_MODEL = "echo-1"


class Command(AuditedCommand):
    help = "Create the admin user (from DJANGO_SUPERUSER_* or generated) and add echo-1 to the catalog."
    requires_system_checks: list = []  # `migrate` has just reported them

    def handle(self, *args, **options) -> None:
        self._ensure_admin()
        self._ensure_demo_model()

    def _ensure_admin(self) -> None:
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME") or "admin"
        password_file = Path(settings.STATE_DIR) / "admin-password"
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        if not password and password_file.exists():
            password = password_file.read_text().strip()
        if not password:
            password = secrets.token_urlsafe(12)
            password_file.parent.mkdir(parents=True, exist_ok=True)
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
        users = get_user_model().objects
        user = users.filter(username=username).first()
        if user is None:
            users.create_superuser(username, os.environ.get("DJANGO_SUPERUSER_EMAIL", ""), password)
            self.stdout.write(f"admin user created: {username} / {password}")
        elif user.check_password(password):
            self.stdout.write(f"admin user: {username} / {password}")
        else:
            self.stdout.write(f"admin user: {username} (exists; password unchanged)")

    def _ensure_demo_model(self) -> None:
        from scheduling.catalog import model_config_upsert
        from scheduling.models import ModelConfig

        if ModelConfig.objects.filter(name=DEMO_MODEL).exists():
            self.stdout.write(f"catalog: {DEMO_MODEL} (exists)")
            return
        model_config_upsert(
            name=DEMO_MODEL, backend="echo", model=DEMO_MODEL, options={"Options": ["delay_ms:10"]}
        )
        self.stdout.write(f"catalog: {DEMO_MODEL} added (backend echo)")
