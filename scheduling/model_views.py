"""The model catalog page (`/ui/models/`): every catalog entry with its backend and routing policy, and the
model form that sets the policy. Thin views: the form validates with the API's serializer field rules,
`model_routing_set` writes."""

from __future__ import annotations

from django import forms
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from localai_cluster.htmx import is_htmx, outcome, staff_required, toast
from scheduling.catalog import model_routing_set
from scheduling.choices import RoutingPolicy
from scheduling.models import ModelConfig

PAGE = "scheduling/models.html"

POLICY_HINTS = {
    RoutingPolicy.LEAST_IN_FLIGHT: "Each request goes to the replica with the fewest requests in flight.",
    RoutingPolicy.PREFIX_CACHE: "Requests sharing a prompt prefix go to the replica that served it, unless it is "
    "busier than the least loaded one by more than LOCALAI_PREFIX_BALANCE_THRESHOLD.",
    RoutingPolicy.SESSION: "Requests with the same X-Session-Id header (or body 'user') stay on one replica.",
}


class ModelRoutingForm(forms.Form):
    name = forms.CharField(max_length=255)
    routing = forms.ChoiceField(choices=RoutingPolicy.choices)

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if not ModelConfig.objects.filter(name=name).exists():
            raise forms.ValidationError(f"{name} is not in the catalog.")
        return name


def _models() -> list[ModelConfig]:
    return list(ModelConfig.objects.order_by("name"))


def _context(form: ModelRoutingForm | None = None) -> dict:
    return {"models": _models(), "form": form, "hints": POLICY_HINTS, "nav": "models"}


@require_GET
@staff_required
def model_list(request: HttpRequest) -> HttpResponse:
    """The catalog table; `?model=` opens the model form for that entry."""
    name = request.GET.get("model")
    config = ModelConfig.objects.filter(name=name).first() if name else None
    form = ModelRoutingForm(initial={"name": config.name, "routing": config.routing}) if config else None
    if is_htmx(request) and form is not None:
        return render(request, f"{PAGE}#model_form", _context(form))
    return render(request, PAGE, _context(form))


@require_POST
@staff_required
def model_save(request: HttpRequest) -> HttpResponse:
    """Sets a catalog entry's routing policy; a form with errors comes back (422)."""
    form = ModelRoutingForm(request.POST)
    if not form.is_valid():
        message = "Model not saved: " + " ".join(str(m) for errors in form.errors.values() for m in errors)
        if not is_htmx(request):
            return render(request, PAGE, _context(form), status=422)
        return toast(
            render(request, f"{PAGE}#model_form", _context(form), status=422), message, level="error"
        )
    config = model_routing_set(name=form.cleaned_data["name"], routing=form.cleaned_data["routing"])
    assert config is not None
    message = f"{config.name} now routes by {config.get_routing_display().lower()}."
    if not is_htmx(request):
        return outcome(request, redirect(reverse("scheduling:models")), message)
    return toast(render(request, f"{PAGE}#model_saved", _context()), message)
