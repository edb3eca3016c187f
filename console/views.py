"""The operator console: the overview with live charts (`/ui/`), the API keys page (`/ui/keys/`) and the
playground (`/ui/playground/`).

Thin views, as on the nodes page: parse, call one service or selector, render; an HTMX request gets the
fragment it changed and an `HX-Trigger` toast, a plain form post is redirected back with a flash message.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import F
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from console.forms import SCOPE_ADMIN, ApiKeyForm
from console.samples import overview_series
from localai_cluster.db_router import replica_page
from localai_cluster.htmx import is_htmx, outcome, staff_required, toast
from nodes import apikeys
from nodes.models import ApiKey
from nodes.page_selectors import cluster_stats
from scheduling import gateway
from scheduling.gateway import GatewayError
from scheduling.models import ModelConfig

KEYS_PAGE = "console/keys.html"


# --- API keys -------------------------------------------------------------------------------------------


def _keys_context(**extra) -> dict:
    # One query: every key (revoked ones too: they stay listed, keys are never deleted).
    keys = list(ApiKey.objects.order_by(F("revoked_at").desc(nulls_first=True), "-created_at", "name"))
    return {"nav": "keys", "keys": keys, "form": ApiKeyForm(), **extra}


@require_GET
@staff_required
def key_list(request: HttpRequest) -> HttpResponse:
    return render(request, KEYS_PAGE, _keys_context())


@require_POST
@staff_required
def key_create(request: HttpRequest) -> HttpResponse:
    """Creates a key and shows it once (only its hash is kept)."""
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        error = "; ".join(str(message) for messages in form.errors.values() for message in messages)
        if not is_htmx(request):
            return outcome(
                request, redirect(reverse("console:keys")), f"Key not created: {error}", level="error"
            )
        response = render(request, f"{KEYS_PAGE}#create", {"form": form}, status=422)
        return toast(response, f"Key not created: {error}", level="error")
    api_key, raw = apikeys.api_key_create(
        name=form.cleaned_data["name"], is_admin=form.cleaned_data["scope"] == SCOPE_ADMIN
    )
    message = f"Key {api_key.name} created: copy it now, it is not shown again."
    if not is_htmx(request):
        # Without HTMX the key is rendered in the answer itself (never put in a redirect or a session).
        return render(request, KEYS_PAGE, _keys_context(created=api_key, raw_key=raw))
    context = _keys_context(created=api_key, raw_key=raw)
    return toast(render(request, f"{KEYS_PAGE}#created", context), message)


@require_POST
@staff_required
def key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    """Revokes a key (idempotent); the gateway refuses it from the next request on."""
    api_key = ApiKey.objects.filter(pk=key_id).first()
    if api_key is None:
        message = "No such key."
        if not is_htmx(request):
            return outcome(request, redirect(reverse("console:keys")), message, level="error")
        return toast(HttpResponse(status=404), message, level="error")
    already = api_key.revoked_at is not None
    apikeys.api_key_revoke(api_key=api_key)
    message = f"Key {api_key.name} was already revoked." if already else f"Key {api_key.name} revoked."
    if not is_htmx(request):
        return outcome(request, redirect(reverse("console:keys")), message)
    return toast(render(request, f"{KEYS_PAGE}#keys", _keys_context()), message)


# --- overview -------------------------------------------------------------------------------------------


@replica_page
@require_GET
@staff_required
def overview(request: HttpRequest) -> HttpResponse:
    """`/ui/`: the cluster's stat cards and the last hour's charts (the data comes from `overview_samples`)."""
    context = {
        "nav": "overview",
        "stats": cluster_stats(),
        "refresh_seconds": max(5, round(settings.LOCALAI_HEALTH_CHECK_INTERVAL)),
        "retention_hours": round(settings.LOCALAI_METRICS_RETENTION / 3600, 1),
    }
    return render(request, "console/overview.html", context)


@replica_page
@require_GET
@staff_required
def overview_samples(request: HttpRequest) -> JsonResponse:
    """The last hour of samples as chart columns (`console.samples.overview_series`)."""
    response = JsonResponse(overview_series(now=timezone.now()))
    response["Cache-Control"] = "no-store"
    return response


# --- playground -----------------------------------------------------------------------------------------


@require_GET
@staff_required
def playground(request: HttpRequest) -> HttpResponse:
    """`/ui/playground/`: chat (streamed) and embeddings against a catalog model, through the gateway."""
    models = list(ModelConfig.objects.order_by("name").values_list("name", flat=True))
    return render(request, "console/playground.html", {"nav": "playground", "models": models})


def _forbidden() -> JsonResponse:
    return GatewayError(
        403, "Staff session required.", type="invalid_request_error", code="forbidden"
    ).response()


@require_POST
async def playground_chat(request: HttpRequest) -> HttpResponseBase:
    """The playground's chat: a staff session, with Django's CSRF check (this view is not exempt), runs the
    gateway's own `/v1/chat/completions` path (`scheduling.gateway.staff_chat_completions`)."""
    user = await request.auser()
    if not (user.is_active and user.is_staff):
        return _forbidden()
    return await gateway.staff_chat_completions(request)


@require_POST
async def playground_embeddings(request: HttpRequest) -> HttpResponseBase:
    """The playground's embeddings, on the same terms as `playground_chat`."""
    user = await request.auser()
    if not (user.is_active and user.is_staff):
        return _forbidden()
    return await gateway.staff_embeddings(request)
