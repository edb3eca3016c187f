"""`python manage.py create_api_key --name NAME [--admin]`: prints a new key once, alone on its last line."""

from __future__ import annotations

from django.core.management.base import CommandError

from audit.context import AuditedCommand
from nodes.apikeys import api_key_create


class Command(AuditedCommand):
    help = "Create an API key. Every key may call /v1/*; --admin keys may also use /api/nodes/* and /api/models/*."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", required=True, help="what the key is for (shown in the admin)")
        parser.add_argument("--admin", action="store_true", help="also allow the admin API")

    def handle(self, *args, name: str, admin: bool, **options) -> None:
        name = name.strip()
        if not name or len(name) > 255 or "\x00" in name:
            raise CommandError("--name must be 1 to 255 characters")
        api_key, raw = api_key_create(name=name, is_admin=admin)
        kind = "admin" if api_key.is_admin else "inference-only"
        self.stderr.write(
            f"Created {kind} API key {api_key.name!r} ({api_key.prefix}…). It is shown only once:"
        )
        self.stdout.write(raw)
