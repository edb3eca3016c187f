"""The scheduling rules page (`/ui/scheduling/`): the rules table and the rule form. Thin views: the form
validates with the API's serializer, `rule_upsert` / `rule_delete` write."""

from __future__ import annotations

from urllib.parse import urlencode

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from localai_cluster.db_router import replica_page
from localai_cluster.htmx import is_htmx, outcome, staff_required, toast
from scheduling import services
from scheduling.api.serializers import DecisionFilterSerializer
from scheduling.catalog import model_retry_load
from scheduling.choices import Outcome
from scheduling.forms import MODE_AUTOSCALE, MODE_PIN, RuleForm
from scheduling.models import SchedulingRule
from scheduling.page_selectors import autoscales, catalog_model_names, load_failure_rows, rule_rows
from scheduling.selectors import decisions_filtered

PAGE = "scheduling/rules.html"


def _form_for(model_name: str | None) -> RuleForm:
    """A blank form, or one filled with the rule of `model_name` (an unknown name starts a new rule for it)."""
    rule = SchedulingRule.objects.filter(model_name=model_name).first() if model_name else None
    if rule is None:
        return RuleForm(initial={"model_name": model_name or "", "mode": MODE_AUTOSCALE, "min_replicas": "1"})
    selector = rule.node_selector if isinstance(rule.node_selector, dict) else {}
    autoscale = autoscales(rule) or not selector
    return RuleForm(
        initial={
            "model_name": rule.model_name,
            "mode": MODE_AUTOSCALE if autoscale else MODE_PIN,
            "min_replicas": str(rule.min_replicas),
            "max_replicas": str(rule.max_replicas),
            "target_in_flight": str(rule.target_in_flight),
            "upscale_delay": str(rule.upscale_delay),
            "downscale_delay": "" if rule.downscale_delay is None else str(rule.downscale_delay),
            "scale_to_zero_after": str(rule.scale_to_zero_after),
            "selector": [f"{key}={value}" for key, value in sorted(selector.items())],
            "editing": True,
        }
    )


def _page(request: HttpRequest, form: RuleForm | None = None) -> HttpResponse:
    load_failures = load_failure_rows()
    context = {
        "rules": rule_rows(load_failures=load_failures),
        "form": form,
        "catalog": catalog_model_names(),
        "load_failures": load_failures,
        "nav": "scheduling",
    }
    return render(request, PAGE, context)


@replica_page
@require_GET
@staff_required
def rule_list(request: HttpRequest) -> HttpResponse:
    """The page; for HTMX only the rules table (it refreshes itself)."""
    if is_htmx(request):
        return render(request, f"{PAGE}#rules", {"rules": rule_rows()})
    return _page(request)


@require_GET
@staff_required
def rule_form(request: HttpRequest) -> HttpResponse:
    """The rule form, blank (`?model=` absent) or filled for editing the rule of `?model=`."""
    form = _form_for(request.GET.get("model"))
    if is_htmx(request):
        return render(request, f"{PAGE}#rule_form", {"form": form, "catalog": catalog_model_names()})
    return _page(request, form)


@require_POST
@staff_required
def rule_save(request: HttpRequest) -> HttpResponse:
    """Creates or updates a rule; a form with errors comes back (422) with each error by its field."""
    form = RuleForm(request.POST)
    if not form.is_valid():
        message = "Rule not saved: " + " ".join(
            str(message) for errors in form.errors.values() for message in errors
        )
        if not is_htmx(request):
            return _page(request, form)
        response = render(
            request, f"{PAGE}#rule_form", {"form": form, "catalog": catalog_model_names()}, status=422
        )
        return toast(response, message, level="error")
    rule = services.rule_upsert(
        model_name=form.validated["model_name"],
        node_selector=form.validated["node_selector"],
        min_replicas=form.validated["min_replicas"],
        max_replicas=form.validated["max_replicas"],
        target_in_flight=form.validated["target_in_flight"],
        upscale_delay=form.validated["upscale_delay"],
        downscale_delay=form.validated["downscale_delay"],
        scale_to_zero_after=form.validated["scale_to_zero_after"],
    )
    message = f"Rule for {rule.model_name} saved."
    if not is_htmx(request):
        return outcome(request, redirect(reverse("scheduling:rules")), message)
    return toast(render(request, f"{PAGE}#rule_saved", {"rules": rule_rows()}), message)


@require_POST
@staff_required
def rule_delete(request: HttpRequest) -> HttpResponse:
    model_name = request.POST.get("model_name", "")
    deleted = services.rule_delete(model_name=model_name) if model_name else False
    message = (
        f"Rule for {model_name} deleted." if deleted else f"There was no rule for {model_name or '(none)'}."
    )
    level = "success" if deleted else "error"
    if not is_htmx(request):
        return outcome(request, redirect(reverse("scheduling:rules")), message, level=level)
    response = render(request, f"{PAGE}#rules", {"rules": rule_rows()}, status=200 if deleted else 404)
    return toast(response, message, level=level)


# --- load backoff (scheduling.loadfailures): shown here and on the nodes page ---------------------------


@replica_page
@require_GET
@staff_required
def load_failures(request: HttpRequest) -> HttpResponse:
    """The "models failing to load" banner (a fragment; the nodes page loads it, and it refreshes itself)."""
    if not is_htmx(request):
        return redirect(reverse("scheduling:rules"))
    return render(request, f"{PAGE}#load_failures", {"load_failures": load_failure_rows()})


@require_POST
@staff_required
def retry_load(request: HttpRequest) -> HttpResponse:
    """ "Retry now": forgets the model's failed loads, so the next request or reconciler tick loads it."""
    model_name = request.POST.get("model_name", "")
    cleared = bool(model_name) and model_retry_load(name=model_name)
    message = (
        f"{model_name} will be loaded again on its next request."
        if cleared
        else f"{model_name or '(none)'} was not waiting to retry a load."
    )
    level = "success" if cleared else "error"
    if not is_htmx(request):
        return outcome(request, redirect(reverse("scheduling:rules")), message, level=level)
    context: dict = {"load_failures": load_failure_rows(), "rules": None}
    if request.headers.get("HX-Current-URL", "").split("?")[0].endswith(reverse("scheduling:rules")):
        context["rules"] = rule_rows()  # the rules table's status column changes too
    return toast(render(request, f"{PAGE}#retry_done", context), message, level=level)


# --- placement decisions (`/ui/decisions/`) -------------------------------------------------------------

DECISIONS_PAGE = "scheduling/decisions.html"
DECISIONS_PER_PAGE = 50


@replica_page
@require_GET
@staff_required
def decision_list(request: HttpRequest) -> HttpResponse:
    """Placement decision records, newest first, filtered by model, node, outcome and time; each with every
    node's verdict. For HTMX only the table (the filters re-ask it as they change)."""
    query = DecisionFilterSerializer(data={k: v for k, v in request.GET.items() if v and k != "page"})
    errors = {} if query.is_valid() else query.errors
    filters = query.validated_data if not errors else {}
    page = Paginator(decisions_filtered(**filters), DECISIONS_PER_PAGE).get_page(request.GET.get("page"))
    params = {k: v for k, v in request.GET.items() if v and k != "page"}
    context = {
        "page": page,
        "decisions": page.object_list,
        "filters": params,
        "query": urlencode(params),
        "errors": errors,
        "outcomes": Outcome.choices,
        "nav": "decisions",
    }
    if is_htmx(request):
        return render(request, f"{DECISIONS_PAGE}#table", context)
    return render(request, DECISIONS_PAGE, context)
