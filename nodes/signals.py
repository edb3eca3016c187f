"""Signals the registry sends so other apps can react without `nodes` importing them."""

from django.dispatch import Signal

# Sent (after commit) when something that changes where models can go happened: a node registered, was
# approved, drained, resumed or deregistered, its labels or its capacity override changed.
# Keyword argument: `reason` (str).
cluster_capacity_changed = Signal()
