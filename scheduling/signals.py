"""Receivers for the registry's signals."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from nodes.signals import cluster_capacity_changed
from scheduling.models import SchedulingRule

logger = logging.getLogger(__name__)


@receiver(cluster_capacity_changed)
def clear_all_breakers(sender, reason: str = "", **kwargs) -> None:
    """Any capacity-changing event wakes every tripped rule at once (BEHAVIOUR §5.5)."""
    cleared = SchedulingRule.objects.filter(unsatisfiable_ticks__gt=0).update(
        unsatisfiable_ticks=0, unsatisfiable_until=None, unsatisfiable_reason=""
    )
    if cleared:
        logger.info("cleared %d circuit breaker(s): %r", cleared, reason or "cluster capacity changed")
