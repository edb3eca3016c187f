"""The models page (`/ui/models/`): the catalog with search, add, edit, delete and LocalAI YAML import, and
per model its replicas on every node, rule, routing policy, last placement decision and load failure, with
the actions "load one now" and "unload all".

Thin views, as on the other pages: parse, call one service or selector, render. An HTMX action answers the
models table (`#models`) and an `HX-Trigger` toast; a plain form post is redirected back with a flash message.
Models are addressed by their catalog id in these URLs (names may contain `/`).
"""

from __future__ import annotations

import json

from django.conf import settings
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from console.forms import ModelConfigForm
from localai_cluster.htmx import is_htmx, outcome, staff_required, toast
from scheduling.catalog import model_config_delete, model_config_upsert, models_import_texts
from scheduling.models import ModelConfig
from scheduling.page_selectors import model_rows, offered_backends
from scheduling.placement import UnknownModel
from scheduling.services import ReplicasBusy, model_load_one, model_unload_all

PAGE = "console/models.html"
# An uploaded YAML file larger than this is refused (a LocalAI model config is a few KiB).
MAX_IMPORT_FILE_BYTES = 1024 * 1024
MAX_IMPORT_FILES = 50
QUERY_MAX_LENGTH = 255


def _query(request: HttpRequest) -> str:
    return (request.GET.get("q") or request.POST.get("q") or "").strip()[:QUERY_MAX_LENGTH]


def _table_context(query: str, **extra) -> dict:
    offered = offered_backends()
    rows = model_rows(query=query, offered=offered)
    return {
        "rows": rows,
        "query": query,
        "offered": offered,
        "missing": [row for row in rows if not row.backend_offered],
        "downloading": any(row.downloading for row in rows),  # the table polls every second meanwhile
        **extra,
    }


def _table(request: HttpRequest, message: str = "", *, level: str = "success", **extra) -> HttpResponse:
    """The models table for the current search (the action's answer), with a toast when `message`."""
    response = render(request, f"{PAGE}#models", _table_context(_query(request), **extra))
    return toast(response, message, level=level) if message else response


def _back(request: HttpRequest) -> HttpResponse:
    return redirect(reverse("console:models"))


def _done(request: HttpRequest, message: str, *, level: str = "success", **extra) -> HttpResponse:
    if not is_htmx(request):
        return outcome(request, _back(request), message, level=level)
    return _table(request, message, level=level, **extra)


def _failed(request: HttpRequest, message: str, *, status: int) -> HttpResponse:
    if not is_htmx(request):
        return outcome(request, _back(request), message, level="error")
    return toast(HttpResponse(status=status), message, level="error")


def _config(model_id: int) -> ModelConfig | None:
    return ModelConfig.objects.filter(pk=model_id).first()


# --- the page -------------------------------------------------------------------------------------------


@require_GET
@staff_required
def model_list(request: HttpRequest) -> HttpResponse:
    """The page; for HTMX (the search box, the 5 s poll) only the models table."""
    if is_htmx(request):
        return _table(request)
    context = {**_table_context(_query(request)), "nav": "models"}
    return render(request, PAGE, context)


def _form_for(config: ModelConfig | None) -> ModelConfigForm:
    if config is None:
        return ModelConfigForm(initial={"backend": "echo", "routing": settings.LOCALAI_ROUTING_POLICY})
    return ModelConfigForm(
        initial={
            "name": config.name,
            "backend": config.backend,
            "model": config.model,
            "vram": str(config.vram_bytes) if config.vram_bytes else "",
            "context_size": "" if config.context_size is None else str(config.context_size),
            "options": json.dumps(config.options, indent=2) if config.options else "",
            "routing": config.routing,
            "editing": True,
        }
    )


def _form_response(request: HttpRequest, form: ModelConfigForm, *, status: int = 200) -> HttpResponse:
    context = {"form": form, "offered": offered_backends(), "query": _query(request)}
    return render(request, f"{PAGE}#model_form", context, status=status)


@require_GET
@staff_required
def model_form(request: HttpRequest) -> HttpResponse:
    """The add form (no `?id=`) or the edit form of catalog model `?id=`."""
    model_id = request.GET.get("id", "")
    config = _config(int(model_id)) if model_id.isdigit() else None
    if model_id and config is None:
        return _failed(request, "That model is no longer in the catalog.", status=404)
    form = _form_for(config)
    if not is_htmx(request):
        context = {**_table_context(_query(request)), "nav": "models", "form": form}
        return render(request, PAGE, context)
    return _form_response(request, form)


@require_POST
@staff_required
def model_save(request: HttpRequest) -> HttpResponse:
    """Adds a model (a taken name is an error) or, from the edit form, replaces it; errors come back in the
    form (422), each by its field."""
    form = ModelConfigForm(request.POST)
    adding = form.is_valid() and not form.cleaned_data.get("editing")
    if adding and ModelConfig.objects.filter(name=form.validated["name"]).exists():
        form.add_error("name", "A model with this name already exists: edit it instead.")
    if not form.is_valid():
        message = "Model not saved: " + " ".join(
            str(message) for errors in form.errors.values() for message in errors
        )
        if not is_htmx(request):
            return outcome(request, _back(request), message, level="error")
        return toast(_form_response(request, form, status=422), message, level="error")
    fields = dict(form.validated)
    if form.cleaned_data.get("editing"):
        # The page does not edit staged files (the API does): an edit keeps the entry's `files`.
        existing = ModelConfig.objects.filter(name=fields["name"]).values_list("files", flat=True).first()
        fields["files"] = existing or []
    config, created = model_config_upsert(**fields)
    message = f"Model {config.name} {'added' if created else 'saved'}."
    if not is_htmx(request):
        return outcome(request, _back(request), message)
    # The form's panel empties; the table follows out of band.
    context = _table_context(_query(request), saved=config.pk)
    return toast(render(request, f"{PAGE}#model_saved", context), message)


@require_POST
@staff_required
def model_import(request: HttpRequest) -> HttpResponse:
    """Imports LocalAI model YAML files (`scheduling.catalog.models_import_texts`, the `import_models`
    parser): all files parsed first, then written in one transaction, so a bad file imports nothing."""
    files = request.FILES.getlist("files")
    error = ""
    texts: list[tuple[str, str]] = []
    if not files:
        error = "Choose one or more LocalAI model YAML files."
    elif len(files) > MAX_IMPORT_FILES:
        error = f"At most {MAX_IMPORT_FILES} files at once."
    for upload in files if not error else []:
        if upload.size is not None and upload.size > MAX_IMPORT_FILE_BYTES:
            error = f"{upload.name}: larger than {MAX_IMPORT_FILE_BYTES // 1024} KiB."
            break
        try:
            texts.append((upload.name or "upload", upload.read().decode("utf-8")))
        except UnicodeDecodeError:
            error = f"{upload.name}: not UTF-8 text."
            break
    imported = []
    if not error:
        try:
            imported = models_import_texts(texts=texts)
        except ValidationError as exc:
            error = " ".join(exc.messages)
    if error:
        message = f"Nothing imported: {error}"
        if not is_htmx(request):
            return outcome(request, _back(request), message, level="error")
        response = render(request, f"{PAGE}#import_form", {"import_error": error}, status=422)
        return toast(response, message, level="error")
    listed = ", ".join(f"{item.name} ({item.action})" for item in imported) or "no model in these files"
    message = f"Imported {len(imported)} model{'s' if len(imported) != 1 else ''}: {listed}."
    if not is_htmx(request):
        return outcome(request, _back(request), message)
    # A fresh import form in its panel; the table follows out of band.
    return toast(render(request, f"{PAGE}#imported", _table_context(_query(request))), message)


@require_POST
@staff_required
def model_delete(request: HttpRequest, model_id: int) -> HttpResponse:
    """Deletes the catalog entry; its running replicas are not touched (the confirm says so)."""
    config = _config(model_id)
    if config is None or not model_config_delete(name=config.name):
        return _failed(request, "That model is no longer in the catalog.", status=404)
    return _done(request, f"Model {config.name} deleted from the catalog.")


# --- actions --------------------------------------------------------------------------------------------


@require_POST
@staff_required
def model_load(request: HttpRequest, model_id: int) -> HttpResponse:
    """ "Load one now": one more replica through the placement pipeline; answers when it is loaded (or why
    not), with the decision record shown in the model's row."""
    config = _config(model_id)
    if config is None:
        return _failed(request, "That model is no longer in the catalog.", status=404)
    try:
        result = model_load_one(model_name=config.name)
    except UnknownModel:
        return _failed(request, "That model is no longer in the catalog.", status=404)
    if result.placed is not None:
        placed = result.placed
        evicted = f"; evicted {', '.join(placed.evicted)} to make room" if placed.evicted else ""
        message = (
            f"Loaded {placed.process_key} on {placed.node_name} in {placed.load_seconds:.1f} s{evicted}."
        )
        return _done(request, message, acted=config.pk)
    reason = result.error.reason if result.error is not None else "not placed"
    return _done(request, f"{config.name} not loaded: {reason}", level="error", acted=config.pk)


@require_POST
@staff_required
def model_unload(request: HttpRequest, model_id: int) -> HttpResponse:
    """ "Unload all": every replica of the model on every node. A replica serving requests is cut off only
    when the form says so (`force`, set by a confirm that named the requests); otherwise 409."""
    config = _config(model_id)
    if config is None:
        return _failed(request, "That model is no longer in the catalog.", status=404)
    force = request.POST.get("force") in ("1", "on", "true")
    try:
        removed = model_unload_all(model_name=config.name, force=force)
    except ReplicasBusy as busy:
        return _failed(request, str(busy), status=409)
    if not removed:
        return _done(request, f"{config.name} had no replica to unload.")
    cut = sum(replica.in_flight for replica in removed)
    nodes = len({replica.node_name for replica in removed})
    message = (
        f"Unloaded {len(removed)} replica{'s' if len(removed) != 1 else ''} of {config.name} from "
        f"{nodes} node{'s' if nodes != 1 else ''}"
        + (f"; {cut} request{'s' if cut != 1 else ''} in flight cut off." if cut else ".")
    )
    return _done(request, message, acted=config.pk)
