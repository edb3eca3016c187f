"""The nodes page (`/ui/nodes/`), a node's drawer and actions, and the replica logs page.

Thin views: parse, call one registry service or selector, render. One view answers the full page or, for an
HTMX request, only its fragment. Every action answers with the fragment it changed and an `HX-Trigger`
toast saying what happened (or the server's error); without HTMX it redirects back with a flash message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from localai_cluster.db_router import replica_page
from localai_cluster.htmx import is_htmx, outcome, staff_required, toast
from nodes import services
from nodes.choices import ReplicaState
from nodes.exceptions import InvalidTransition, InvalidValue
from nodes.forms import CapacityForm, LabelForm, LabelRemoveForm
from nodes.models import ModelReplica, Node, process_key
from nodes.page_selectors import (
    cluster_stats,
    drawer_replicas,
    model_replicas_on_node,
    most_replicas_of_one_model,
    node_row,
    node_rows_decorated,
)

PAGE = "nodes/nodes.html"


# --- contexts -------------------------------------------------------------------------------------------


def _drawer_context(node: Node) -> dict:
    from scheduling.selectors import decisions_for_replicas

    replicas = drawer_replicas(node=node)
    placed = decisions_for_replicas(
        node_name=node.name,
        replicas=[(item.replica.model_name, item.replica.replica_index) for item in replicas],
    )

    def placed_by(replica: ModelReplica) -> Any:
        record = placed.get((replica.model_name, replica.replica_index))
        started = replica.load_started_at or replica.loaded_at
        # Not an older replica's record at the same index.
        return record if record is not None and (started is None or record.created_at >= started) else None

    replicas = [replace(item, placed_by=placed_by(item.replica)) for item in replicas]
    most, most_model = most_replicas_of_one_model(replicas)
    downloading = any(item.replica.state == ReplicaState.DOWNLOADING for item in replicas)
    return {
        "node": node,
        "replicas": replicas,
        "most_replicas": most,
        "most_replicas_model": most_model,
        "downloading": downloading,
    }


AUDIT_IN_DRAWER = 8


def _audit_context(node: Node) -> dict:
    """The node's latest audit entries (the drawer's "Recent changes"): one query."""
    from audit.presentation import entry_rows
    from audit.selectors import audit_for_target

    return {
        "audit_rows": entry_rows(
            audit_for_target(target_type="node", target_id=str(node.pk), limit=AUDIT_IN_DRAWER)
        )
    }


def _row(node_id: uuid.UUID) -> Node:
    node = node_row(node_id=node_id)
    if node is None:
        raise Http404("No such node.")
    return node


def _back(request: HttpRequest, node_id: uuid.UUID | None = None) -> HttpResponse:
    """Where a plain (non-HTMX) form post lands: the page, with the node's drawer open when given."""
    return redirect(reverse("nodes:detail", args=[node_id]) if node_id else reverse("nodes:list"))


def _error(
    request: HttpRequest, message: str, *, status: int, node_id: uuid.UUID | None = None
) -> HttpResponse:
    if is_htmx(request):
        return toast(HttpResponse(status=status), message, level="error")
    return outcome(request, _back(request, node_id), message, level="error")


# --- pages ----------------------------------------------------------------------------------------------


@replica_page
@require_GET
@staff_required
def node_list(request: HttpRequest) -> HttpResponse:
    """The nodes page; for HTMX (the 5 s poll) only the stat cards and the rows. Open drawers are kept by the
    page (`hx-preserve`), so the poll never closes one nor touches an edit in progress."""
    context = {"stats": cluster_stats(), "nodes": node_rows_decorated(), "open_node_id": None, "nav": "nodes"}
    if is_htmx(request):
        return render(request, f"{PAGE}#live", context)
    return render(request, PAGE, context)


@replica_page
@require_GET
@staff_required
def node_detail(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """A node's drawer (HTMX), or the nodes page with that drawer open."""
    node = _row(node_id)
    if is_htmx(request):
        return render(request, f"{PAGE}#drawer", {**_drawer_context(node), **_audit_context(node)})
    nodes = node_rows_decorated()
    context = {
        "stats": cluster_stats(),
        "nodes": nodes,
        "open_node_id": node.pk,
        "nav": "nodes",
        **_drawer_context(node),
        **_audit_context(node),
    }
    return render(request, PAGE, context)


@replica_page
@require_GET
@staff_required
def node_audit(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """The drawer's "Recent changes" (it asks again after every action's toast while the drawer is open)."""
    if not is_htmx(request):
        return redirect(f"{reverse('audit:list')}?target_type=node&target_id={node_id}")
    node = Node(pk=node_id)
    return render(request, f"{PAGE}#audit_recent", {"node": node, **_audit_context(node)})


@require_GET
@staff_required
def node_replicas(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """The drawer's loaded-replicas table (it refreshes itself while the drawer is open)."""
    node = get_object_or_404(Node, pk=node_id)
    if not is_htmx(request):
        return _back(request, node.pk)
    return render(request, f"{PAGE}#replicas", _drawer_context(node))


# --- node actions ---------------------------------------------------------------------------------------


def _transition(
    request: HttpRequest, node_id: uuid.UUID, action: Callable[..., Node], done: str
) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    try:
        action(node=node)
    except InvalidTransition as exc:
        return _error(request, str(exc), status=409, node_id=node.pk)
    message = f"Node {node.name} {done}."
    if not is_htmx(request):
        return outcome(request, _back(request), message)
    context = {"node": _row(node.pk), "stats": cluster_stats(), "open_node_id": None}
    return toast(render(request, f"{PAGE}#node_changed", context), message)


@require_POST
@staff_required
def node_approve(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    return _transition(request, node_id, services.node_approve, "approved")


@require_POST
@staff_required
def node_drain(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    return _transition(request, node_id, services.node_drain, "is draining: no new placements or requests")


@require_POST
@staff_required
def node_resume(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    return _transition(request, node_id, services.node_resume, "resumed")


@require_POST
@staff_required
def node_delete(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    stopped = services.node_delete(node=node)
    message = f"Node {node.name} removed" + (
        f"; its agent was asked to stop {len(stopped)} replica(s)." if stopped else "."
    )
    if not is_htmx(request):
        return outcome(request, _back(request), message)
    # The row is removed by the page (hx-swap="delete"); the stat cards follow out of band.
    return toast(render(request, f"{PAGE}#stats_oob", {"stats": cluster_stats()}), message)


# --- capacity -------------------------------------------------------------------------------------------


def _capacity_response(
    request: HttpRequest, node_id: uuid.UUID, *, form: CapacityForm | None = None, status: int = 200
) -> HttpResponse:
    context = {**_drawer_context(_row(node_id)), "cap_form": form, "editing": form is not None}
    return render(request, f"{PAGE}#capacity_changed", context, status=status)


@require_POST
@staff_required
def node_capacity(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """Sets the admin override of the node's replicas-per-model cap."""
    node = get_object_or_404(Node, pk=node_id)
    form = CapacityForm(request.POST)
    error = ""
    if form.is_valid():
        try:
            node = services.node_override_set(node=node, value=form.cleaned_data["value"])
        except InvalidValue as exc:
            form.add_error("value", str(exc))
            error = str(exc)
    else:
        error = "; ".join(str(message) for message in form.errors.get("value", ["Invalid value."]))
    if error:
        if not is_htmx(request):
            return outcome(request, _back(request, node.pk), f"Capacity not saved: {error}", level="error")
        response = _capacity_response(request, node.pk, form=form, status=422)
        return toast(response, f"Capacity not saved: {error}", level="error")
    message = f"{node.name}: {node.effective_max_replicas} replica slot(s) per model (override)."
    if not is_htmx(request):
        return outcome(request, _back(request, node.pk), message)
    return toast(_capacity_response(request, node.pk), message)


@require_POST
@staff_required
def node_capacity_reset(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """Drops the override: the worker's own value applies at once."""
    node = services.node_override_reset(node=get_object_or_404(Node, pk=node_id))
    message = f"{node.name}: back to the worker's {node.effective_max_replicas} replica slot(s) per model."
    if not is_htmx(request):
        return outcome(request, _back(request, node.pk), message)
    return toast(_capacity_response(request, node.pk), message)


# --- labels ---------------------------------------------------------------------------------------------


def _labels_response(
    request: HttpRequest, node_id: uuid.UUID, *, form: LabelForm | None = None, status: int = 200
) -> HttpResponse:
    context = {"node": _row(node_id), "label_form": form}
    return render(request, f"{PAGE}#labels_changed", context, status=status)


@require_POST
@staff_required
def node_label_add(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """Sets one `key=value` label (other labels are kept)."""
    node = get_object_or_404(Node, pk=node_id)
    form = LabelForm(request.POST)
    error = ""
    if form.is_valid():
        key, value = form.cleaned_data["key"], form.cleaned_data["value"]
        try:
            services.node_labels_merge(node=node, labels={key: value})
        except InvalidValue as exc:
            form.add_error("key", str(exc))
            error = str(exc)
    else:
        error = "; ".join(str(message) for messages in form.errors.values() for message in messages)
    if error:
        if not is_htmx(request):
            return outcome(request, _back(request, node.pk), f"Label not saved: {error}", level="error")
        return toast(
            _labels_response(request, node.pk, form=form, status=422),
            f"Label not saved: {error}",
            level="error",
        )
    message = f"{node.name}: label {key}={value} set."
    if not is_htmx(request):
        return outcome(request, _back(request, node.pk), message)
    return toast(_labels_response(request, node.pk), message)


@require_POST
@staff_required
def node_label_remove(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    form = LabelRemoveForm(request.POST)
    if not form.is_valid():
        return _error(request, "Which label? No key was given.", status=400, node_id=node.pk)
    key = form.cleaned_data["key"]
    try:
        removed = services.node_label_remove(node=node, key=key)
    except InvalidValue as exc:
        return _error(request, str(exc), status=400, node_id=node.pk)
    message = f"{node.name}: label {key} removed." if removed else f"{node.name} had no label {key}."
    if not is_htmx(request):
        return outcome(request, _back(request, node.pk), message)
    return toast(_labels_response(request, node.pk), message)


# --- replicas -------------------------------------------------------------------------------------------


@require_POST
@staff_required
def replica_unload(request: HttpRequest, node_id: uuid.UUID, replica_id: int) -> HttpResponse:
    """Unloads exactly one replica: its row goes at once (no new request reaches it), then its agent is asked
    to stop exactly its process key. Requests in flight on it are cut off (the confirm says so)."""
    node = get_object_or_404(Node, pk=node_id)
    removed = services.replica_unload(
        node=node, replicas=ModelReplica.objects.filter(pk=replica_id, node=node)
    )
    if not removed:
        return _error(request, "That replica is already gone.", status=404, node_id=node.pk)
    message = f"Unloaded {removed[0]} from {node.name}."
    if not is_htmx(request):
        return outcome(request, _back(request, node.pk), message)
    context = {**_drawer_context(node), "stats": cluster_stats()}
    return toast(render(request, f"{PAGE}#replicas_changed", context), message)


# --- logs -----------------------------------------------------------------------------------------------


@require_GET
@staff_required
def replica_logs(request: HttpRequest, node_id: uuid.UUID, key: str) -> HttpResponse:
    """Live logs of one replica (`model#N`) or of all replicas of a model on the node merged (`model`)."""
    node = get_object_or_404(Node, pk=node_id)
    model_name, separator, index_text = key.partition("#")
    if not model_name or (separator and not index_text.isdigit()):
        raise Http404("Not a process key.")
    index = int(index_text) if separator else None
    indexes = sorted(
        {replica.replica_index for replica in model_replicas_on_node(node=node, model_name=model_name)}
        | ({index} if index is not None else set())
    )
    scopes = [
        {"label": f"Replica {i}", "key": process_key(model_name, i), "current": i == index} for i in indexes
    ] + [{"label": "All merged", "key": model_name, "current": index is None}]
    for scope in scopes:
        scope["url"] = reverse("nodes:logs", args=[node.pk, scope["key"]])
    context = {
        "nav": "nodes",
        "node": node,
        "key": key,
        "model_name": model_name,
        "replica_index": index,
        "replica_count": len(indexes),
        "scopes": scopes if len(indexes) > 1 else [],
        "ws_path": f"/ws/nodes/{node.pk}/backend-logs/{quote(key, safe='')}",
        "staging_url": f"{reverse('nodes:staging', args=[node.pk])}?key={quote(key, safe='')}"
        if separator
        else "",
    }
    return render(request, "nodes/logs.html", context)


@require_GET
@staff_required
def replica_staging(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """The logs page's download progress of one replica (`?key=model#N`): a bar and the rate while its files
    download; it polls itself until the replica is loaded."""
    node = get_object_or_404(Node, pk=node_id)
    model_name, _, index_text = request.GET.get("key", "").partition("#")
    if not model_name or not index_text.isdigit():
        raise Http404("Not a process key.")
    replica = ModelReplica.objects.filter(
        node=node, model_name=model_name, replica_index=int(index_text)
    ).first()
    context = {
        "node": node,
        "replica": replica,
        "key": process_key(model_name, int(index_text)),
        "staging_url": request.get_full_path(),
    }
    return render(request, "nodes/logs.html#staging_panel", context)
