"""Receivers for the registry's signals."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from nodes.models import ModelReplica
from nodes.signals import cluster_capacity_changed
from scheduling.loadfailures import load_failures_clear_all
from scheduling.models import SchedulingRule
from scheduling.routing import forget_replica

logger = logging.getLogger(__name__)


@receiver(cluster_capacity_changed)
def clear_all_breakers(sender, reason: str = "", **kwargs) -> None:
    """Any capacity-changing event wakes every tripped rule at once (BEHAVIOUR §5.5)."""
    cleared = SchedulingRule.objects.filter(unsatisfiable_ticks__gt=0).update(
        unsatisfiable_ticks=0, unsatisfiable_until=None, unsatisfiable_reason=""
    )
    if cleared:
        logger.info("cleared %d circuit breaker(s): %r", cleared, reason or "cluster capacity changed")


@receiver(cluster_capacity_changed)
def clear_load_backoffs(sender, reason: str = "", **kwargs) -> None:
    """Any capacity-changing event (a node registered, approved, back, resumed, relabelled, its cap changed;
    also a drain or a removal, which are rare and cost one more attempt at most) lets models whose loads
    failed try again at once: the new or changed node may be the one that can load them."""
    load_failures_clear_all(reason=reason or "cluster capacity changed")


@receiver(post_delete, sender=ModelReplica)
def forget_removed_replica(sender, instance: ModelReplica, **kwargs) -> None:
    """A replica that goes away leaves its model's prefix index (scheduling.routing), once the deletion has
    committed."""
    model_name, replica_id = instance.model_name, instance.pk
    transaction.on_commit(lambda: forget_replica(model_name, replica_id))
