"""The model catalog's writes: admin API upserts and `import_models` (LocalAI model YAML).

VRAM estimate for an imported model that does not give `vram_bytes`: when `parameters.model` names a local
file (an absolute path, or a path relative to the models directory: `LOCALAI_MODELS_PATH`, default `./models`)
that exists, `file size + context_size × 128 KiB` (`context_size` defaults to 2048 when the YAML has none;
128 KiB per token is an fp16 KV cache of an 8B-class model with grouped-query attention); otherwise 0
("unknown": the node's slots alone limit placement). An explicit `vram_bytes` in the YAML wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import transaction

from scheduling.loadfailures import load_failure_clear
from scheduling.models import ModelConfig

KV_BYTES_PER_TOKEN = 128 * 1024
DEFAULT_CONTEXT_SIZE = 2048
DEFAULT_BACKEND = "llama-cpp"
MAX_VRAM_BYTES = 2**63 - 1
# `scheme://…` (http, https, huggingface, oci, ollama, file is handled as a path).
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Top-level YAML keys that map onto catalog columns; everything else goes into `options`.
_COLUMN_KEYS = frozenset({"name", "backend", "context_size", "vram_bytes"})


def models_path() -> Path:
    """The directory relative model files are resolved against (`LOCALAI_MODELS_PATH`, default ./models)."""
    return Path(os.environ.get("LOCALAI_MODELS_PATH") or "./models")


def model_config_upsert(
    *,
    name: str,
    backend: str,
    model: str = "",
    options: Mapping[str, Any] | None = None,
    vram_bytes: int = 0,
    context_size: int | None = None,
    routing: str | None = None,
) -> tuple[ModelConfig, bool]:
    """Creates or replaces the catalog entry `name`; answers it and whether it was created. `routing` None
    keeps an existing entry's policy (a new one gets `LOCALAI_ROUTING_POLICY`). Clears the model's load
    backoff: the edit may be the fix."""
    defaults: dict[str, Any] = {
        "backend": backend,
        "model": model,
        "options": dict(options or {}),
        "vram_bytes": vram_bytes,
        "context_size": context_size,
    }
    if routing is not None:
        defaults["routing"] = routing
    with transaction.atomic():
        config, created = ModelConfig.objects.update_or_create(name=name, defaults=defaults)
        load_failure_clear(model_name=name, reason="catalog entry edited")
    return config, created


def model_routing_set(*, name: str, routing: str) -> ModelConfig | None:
    """Sets the routing policy of the catalog entry `name` (the operator pages' model form); None when there
    is no such entry. Takes effect on the next claim of every web process (the claim reads it)."""
    config = ModelConfig.objects.filter(name=name).first()
    if config is None:
        return None
    config.routing = routing
    config.save(update_fields=["routing", "updated_at"])
    return config


def model_config_delete(*, name: str) -> bool:
    """Deletes the catalog entry `name`; True when there was one. Running replicas are not touched."""
    with transaction.atomic():
        deleted, _ = ModelConfig.objects.filter(name=name).delete()
        load_failure_clear(model_name=name, reason="catalog entry deleted")
    return deleted > 0


@dataclass(frozen=True)
class ImportedModel:
    """What `models_import_yaml` did with one model: `action` is "created" or "updated"; `vram_source` says
    where `vram_bytes` came from ("yaml", "estimate: <file>", "unknown")."""

    name: str
    action: str
    config: ModelConfig
    vram_source: str


def _local_model_file(model: str, base: Path) -> Path | None:
    if not model or (_URI.match(model) and not model.startswith("file://")):
        return None
    path = Path(model.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = base / path
    return path if path.is_file() else None


def estimate_vram(*, model: str, context_size: int | None, base: Path | None = None) -> tuple[int, str]:
    """(bytes, source) by the formula of this module's docstring."""
    path = _local_model_file(model, base or models_path())
    if path is None:
        return 0, "unknown (not a local file)"
    allowance = (context_size or DEFAULT_CONTEXT_SIZE) * KV_BYTES_PER_TOKEN
    return min(path.stat().st_size + allowance, MAX_VRAM_BYTES), f"estimate: {path}"


def _as_int(value: Any, field: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{source}: {field} must be a non-negative integer")
    return value


def _parse_entry(entry: Any, source: str, base: Path) -> dict[str, Any]:
    """Catalog fields of one LocalAI model config mapping."""
    if not isinstance(entry, dict):
        raise ValidationError(f"{source}: a model config must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or "#" in name or len(name) > 255:
        raise ValidationError(f"{source}: 'name' must be a string of 1-255 characters without '#'")
    backend = entry.get("backend") or DEFAULT_BACKEND
    if not isinstance(backend, str) or len(backend) > 64:
        raise ValidationError(f"{source}: {name}: 'backend' must be a string of at most 64 characters")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValidationError(f"{source}: {name}: 'parameters' must be a mapping")
    model = parameters.get("model") or ""
    if not isinstance(model, str) or len(model) > 1024:
        raise ValidationError(f"{source}: {name}: 'parameters.model' must be a string")
    context_size = _as_int(entry.get("context_size"), "context_size", f"{source}: {name}")
    options = {key: value for key, value in entry.items() if key not in _COLUMN_KEYS}
    rest = {key: value for key, value in parameters.items() if key != "model"}
    if rest:
        options["parameters"] = rest
    else:
        options.pop("parameters", None)
    vram = _as_int(entry.get("vram_bytes"), "vram_bytes", f"{source}: {name}")
    if vram is not None:
        vram_source = "yaml"
    else:
        vram, vram_source = estimate_vram(model=model, context_size=context_size, base=base)
    return {
        "name": name.strip(),
        "backend": backend,
        "model": model,
        "options": options,
        "vram_bytes": min(vram, MAX_VRAM_BYTES),
        "context_size": context_size,
        "vram_source": vram_source,
    }


def models_import_yaml(*, paths: Iterable[str | Path], base: Path | None = None) -> list[ImportedModel]:
    """Adds or updates catalog entries from LocalAI model YAML files (each a mapping, or a list of mappings).
    Every file is parsed before anything is written; then all entries are written in one transaction, so a
    bad file imports nothing. Raises `ValidationError` naming the file and the problem."""
    base = base or models_path()
    entries: list[dict[str, Any]] = []
    for path in map(Path, paths):
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ValidationError(f"{path}: {exc.strerror or exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValidationError(f"{path}: not valid YAML: {exc}") from None
        for document in documents:
            if document is None:
                continue
            for entry in document if isinstance(document, list) else [document]:
                entries.append(_parse_entry(entry, str(path), base))
    imported: list[ImportedModel] = []
    with transaction.atomic():
        for fields in entries:
            vram_source = fields.pop("vram_source")
            config, created = model_config_upsert(**fields)
            imported.append(
                ImportedModel(config.name, "created" if created else "updated", config, vram_source)
            )
    return imported
