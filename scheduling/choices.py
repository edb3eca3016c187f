"""Names of the placement pipeline's verdicts and of its decision records (scheduling.pipeline)."""

from django.db import models


class Verdict(models.TextChoices):
    """What placement says about one node, the first that applies in this order; a node that passes every
    check is `chosen` or `ranked_lower`."""

    NOT_APPROVED = "not_approved", "Not approved"
    DRAINING = "draining", "Draining"
    NOT_HEALTHY = "not_healthy", "Not healthy"
    SELECTOR_MISMATCH = "selector_mismatch", "Selector mismatch"
    BACKEND_MISSING = "backend_missing", "Backend not offered"
    NO_FREE_SLOT = "no_free_slot", "No free slot"
    NOT_ENOUGH_VRAM = "not_enough_vram", "Not enough VRAM"
    EVICTION_CANDIDATE = "eviction_candidate", "Room only by evicting"
    CHOSEN = "chosen", "Chosen"
    RANKED_LOWER = "ranked_lower", "Ranked lower"


class Trigger(models.TextChoices):
    """Who asked for a placement (or an eviction, a trim, a breaker trip)."""

    REQUEST = "request", "Request"
    RECONCILE = "reconcile", "Reconciler"
    BURST = "burst", "Burst"
    AUTOSCALE = "autoscale", "Autoscaler"
    ADMIN = "admin", "Admin"


class Outcome(models.TextChoices):
    PLACED = "placed", "Placed"
    NO_CAPACITY = "no_capacity", "No capacity"
    LOAD_FAILED = "load_failed", "Load failed"
    EVICTED = "evicted", "Evicted"
    TRIMMED = "trimmed", "Trimmed"
    TRIPPED = "tripped", "Breaker tripped"


class RoutingPolicy(models.TextChoices):
    """How the gateway picks among a model's loaded replicas (scheduling.routing)."""

    LEAST_IN_FLIGHT = "least_in_flight", "Least in flight"
    PREFIX_CACHE = "prefix_cache", "Prefix cache"
    SESSION = "session", "Session"
