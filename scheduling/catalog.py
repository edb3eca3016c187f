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

from audit import services as audit
from audit.models import Action
from scheduling.artifacts import FilesInvalid, files_clean
from scheduling.loadfailures import load_failure_clear, load_failure_payload
from scheduling.models import LoadFailure, ModelConfig

KV_BYTES_PER_TOKEN = 128 * 1024
DEFAULT_CONTEXT_SIZE = 2048
DEFAULT_BACKEND = "llama-cpp"
MAX_VRAM_BYTES = 2**63 - 1
# `scheme://…` (http, https, huggingface, oci, ollama, file is handled as a path).
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Top-level YAML keys that map onto catalog columns; everything else goes into `options`.
_COLUMN_KEYS = frozenset({"name", "backend", "context_size", "vram_bytes", "download_files"})


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
    files: list[dict[str, Any]] | None = None,
    routing: str | None = None,
) -> tuple[ModelConfig, bool]:
    """Creates or replaces the catalog entry `name`; answers it and whether it was created. `routing` None
    keeps an existing entry's policy (a new one gets `LOCALAI_ROUTING_POLICY`). Clears the model's load
    backoff: the edit may be the fix. Audited as `model.create` / `model.update`."""
    defaults: dict[str, Any] = {
        "backend": backend,
        "model": model,
        "options": dict(options or {}),
        "vram_bytes": vram_bytes,
        "context_size": context_size,
        "files": list(files or []),
    }
    if routing is not None:
        defaults["routing"] = routing
    with transaction.atomic():
        previous = ModelConfig.objects.select_for_update().filter(name=name).first()
        config, created = ModelConfig.objects.update_or_create(name=name, defaults=defaults)
        load_failure_clear(model_name=name, reason="catalog entry edited")
        model_audit(
            Action.MODEL_CREATE if created else Action.MODEL_UPDATE,
            name=name,
            before=model_state(previous),
            after=model_state(config),
        )
    return config, created


def model_state(config: ModelConfig | None) -> dict[str, Any] | None:
    """A catalog entry as the audit trail records it (None: no entry)."""
    if config is None:
        return None
    return {
        "backend": config.backend,
        "model": config.model,
        "options": config.options,
        "vram_bytes": config.vram_bytes,
        "context_size": config.context_size,
        "files": config.files,
        "routing": config.routing,
    }


def model_audit(action: str, *, name: str, before: Any, after: Any) -> None:
    """An audit entry about the model `name` (catalog changes, load retries, the models page's actions)."""
    audit.record(
        action=action, target_type="model", target_id=name, target_name=name, before=before, after=after
    )


def model_files_set(*, name: str, files: list[dict[str, Any]]) -> ModelConfig:
    """Replaces the `files` of catalog entry `name` (the scan's result); clears its load backoff. Audited as
    `model.update` (nothing when the files did not change)."""
    with transaction.atomic():
        config = ModelConfig.objects.select_for_update().get(name=name)
        before = model_state(config)
        config.files = files
        config.save(update_fields=["files", "updated_at"])
        load_failure_clear(model_name=name, reason="catalog entry edited")
        model_audit(Action.MODEL_UPDATE, name=name, before=before, after=model_state(config))
    return config


def model_config_delete(*, name: str) -> bool:
    """Deletes the catalog entry `name`; True when there was one. Running replicas are not touched. Audited
    as `model.delete`."""
    with transaction.atomic():
        previous = ModelConfig.objects.select_for_update().filter(name=name).first()
        deleted, _ = ModelConfig.objects.filter(name=name).delete()
        load_failure_clear(model_name=name, reason="catalog entry deleted")
        if deleted:
            model_audit(Action.MODEL_DELETE, name=name, before=model_state(previous), after=None)
    return deleted > 0


def model_retry_load(*, name: str) -> bool:
    """ "Retry now": forgets the model's failed loads, so the next request or reconciler tick loads it at once;
    True when it was backing off. Audited as `model.retry_load` (the failure record before, none after)."""
    with transaction.atomic():
        failure = LoadFailure.objects.select_for_update().filter(model_name=name).first()
        if failure is None:
            return False
        load_failure_clear(model_name=name, reason="retry requested by an admin")
        model_audit(Action.MODEL_RETRY_LOAD, name=name, before=load_failure_payload(failure), after=None)
    return True


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


# An entry's other fields (its `options`) hold at most this many values: YAML aliases can make a small
# file describe a huge structure, which storing it as JSON would expand.
MAX_OPTION_VALUES = 10_000


def _option_values_within(value: Any, budget: int) -> int:
    """`budget` minus the values in `value` (lists and mappings counted with their contents); stops below
    0 without walking further. NUL and unpaired surrogates (PostgreSQL's JSON cannot store them) raise."""
    budget -= 1
    if isinstance(value, str) and ("\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value)):
        raise ValueError("NUL characters and unpaired surrogates are not allowed")
    children = list(value.items()) if isinstance(value, dict) else value if isinstance(value, list) else []
    for child in children:
        if budget < 0:
            break
        if isinstance(value, dict):
            budget = _option_values_within(child[0], budget)
            child = child[1]
        budget = _option_values_within(child, budget)
    return budget


def _parse_entry(entry: Any, source: str, base: Path) -> dict[str, Any]:
    """Catalog fields of one LocalAI model config mapping."""
    if not isinstance(entry, dict):
        raise ValidationError(f"{source}: a model config must be a mapping")
    name = entry.get("name")
    if (
        not isinstance(name, str)
        or not name.strip()
        or "#" in name
        or len(name) > 255
        or not name.strip().isprintable()
    ):
        raise ValidationError(f"{source}: 'name' must be a string of 1-255 printable characters without '#'")
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
    try:
        if _option_values_within(options, MAX_OPTION_VALUES) < 0:
            raise ValueError(f"more than {MAX_OPTION_VALUES} values")
    except ValueError as exc:
        raise ValidationError(f"{source}: {name}: {exc}") from None
    files = _download_files(entry.get("download_files"), f"{source}: {name}")
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
        "files": files,
        "vram_source": vram_source,
    }


def huggingface_url(uri: str) -> str:
    """LocalAI's `huggingface://org/repo/path/file[@branch]` as its https download URL."""
    rest = uri.removeprefix("huggingface://").removeprefix("hf://")
    branch = "main"
    if "@" in rest:
        rest, branch = rest.rsplit("@", 1)
    org, repo, path = [*rest.split("/", 2), "", ""][:3]
    return f"https://huggingface.co/{org}/{repo}/resolve/{branch}/{path}"


def _download_files(value: Any, source: str) -> list[dict[str, Any]]:
    """LocalAI's `download_files` (`filename`, `uri`, `sha256`) as catalog `files` (`path`, `uri`, `sha256`,
    `size` 0: the agent takes the server's). `huggingface://` URIs become their https URL."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(f"{source}: 'download_files' must be a list")
    files = []
    for item in value:
        if not isinstance(item, dict):
            raise ValidationError(f"{source}: each of 'download_files' must be a mapping")
        uri = str(item.get("uri") or "")
        if uri.startswith(("huggingface://", "hf://")):
            uri = huggingface_url(uri)
        files.append(
            {"uri": uri, "sha256": item.get("sha256") or "", "size": 0, "path": item.get("filename")}
        )
    try:
        return files_clean(files)
    except FilesInvalid as error:
        raise ValidationError(f"{source}: download_files: {error}") from None


def models_import_yaml(*, paths: Iterable[str | Path], base: Path | None = None) -> list[ImportedModel]:
    """Adds or updates catalog entries from LocalAI model YAML files (each a mapping, or a list of mappings).
    Every file is parsed before anything is written; then all entries are written in one transaction, so a
    bad file imports nothing. Raises `ValidationError` naming the file and the problem."""
    texts: list[tuple[str, str]] = []
    for path in map(Path, paths):
        try:
            texts.append((str(path), path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ValidationError(f"{path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ValidationError(f"{path}: not valid YAML: {exc}") from None
    return models_import_texts(texts=texts, base=base)


def models_import_texts(*, texts: Iterable[tuple[str, str]], base: Path | None = None) -> list[ImportedModel]:
    """`models_import_yaml` for YAML already read: `(source name, text)` pairs (the models page's upload).
    The same parser and guarantees: everything parsed first, one transaction, `ValidationError` naming the
    source and the problem."""
    base = base or models_path()
    entries: list[dict[str, Any]] = []
    for source, text in texts:
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise ValidationError(f"{source}: not valid YAML: {exc}") from None
        for document in documents:
            if document is None:
                continue
            for entry in document if isinstance(document, list) else [document]:
                entries.append(_parse_entry(entry, source, base))
    imported: list[ImportedModel] = []
    with transaction.atomic():
        for fields in entries:
            vram_source = fields.pop("vram_source")
            config, created = model_config_upsert(**fields)
            imported.append(
                ImportedModel(config.name, "created" if created else "updated", config, vram_source)
            )
    return imported
