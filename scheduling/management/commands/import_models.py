"""`python manage.py import_models FILE...`: add or update catalog entries from LocalAI model YAML."""

from __future__ import annotations

from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from audit.context import AuditedCommand
from scheduling.catalog import models_import_yaml
from scheduling.catalog import models_path as default_models_path


def _size(n: float) -> str:
    if n == 0:
        return "0 (unknown)"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


class Command(AuditedCommand):
    help = (
        "Add or update model catalog entries from LocalAI model YAML files (name, backend, parameters.model, "
        "context_size; other fields go into options). VRAM is estimated from a local model file when not given."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE")
        parser.add_argument(
            "--models-path",
            default=None,
            help="directory relative model files are resolved against (default: $LOCALAI_MODELS_PATH or ./models)",
        )

    def handle(self, *args, files: list[str], models_path: str | None, **options) -> None:
        base = Path(models_path) if models_path else default_models_path()
        try:
            imported = models_import_yaml(paths=files, base=base)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        for item in imported:
            config = item.config
            self.stdout.write(
                f"{item.action} {config.name}: backend={config.backend} model={config.model or '-'} "
                f"context_size={config.context_size if config.context_size is not None else '-'} "
                f"vram={_size(config.vram_bytes)} [{item.vram_source}]"
            )
        self.stdout.write(f"{len(imported)} model(s) imported.")
