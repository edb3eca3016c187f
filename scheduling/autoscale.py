"""Load-based autoscaling per scheduling rule (README "Autoscaling").

Input: `InFlightSample` rows in PostgreSQL. `inflight_sample_take` (the Celery beat task
`autoscale_sample_tick`, every `LOCALAI_AUTOSCALE_SAMPLE_INTERVAL`, at most 5 s) stores, for every rule with
`target_in_flight` > 0 or `scale_to_zero_after` > 0, the model's in-flight requests summed over its replicas
and its live replica count, in one INSERT … SELECT, and deletes the rows older than `LOCALAI_AUTOSCALE_WINDOW`
(and those of models no longer autoscaled) in one DELETE: the table holds about window / interval rows per
autoscaled model, whatever the traffic.

Decision (pure, `autoscale_decide`, called by the reconciler's tick for each rule with `target_in_flight` >
0): desired = ceil(average in-flight over the window / target), clamped to [min, max] and to the cluster's
free slots. A desired count above the current one must hold for `upscale_delay` seconds before replicas are
placed; below it, for `downscale_delay` seconds, and never within `downscale_delay` of the last scale-up, before
idle replicas (in-flight 0; none while a replica is still loading) are unloaded. Busy replicas above the
desired count are never unloaded with requests on them: they are retired (`unloading`: no new request
goes to them) and unloaded by a later tick once their requests have ended. Scale to zero: with `min_replicas` = 0 and
`scale_to_zero_after` > 0, the last replica goes once no request used it for that long and the window saw no
in-flight request; the next request loads one through the gateway's cold path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Avg, Count, Q

from localai_cluster import locks
from nodes.choices import ReplicaState
from nodes.models import ModelReplica
from scheduling.models import InFlightSample, SchedulingRule
from scheduling.pipeline import LIVE_STATES, ReplicaView, RuleView

logger = logging.getLogger(__name__)

AUTOSCALE_SAMPLER = 3  # advisory lock key in `locks.NAMESPACE_LOOPS`


# --- the samples (PostgreSQL) -----------------------------------------------------------------------------


def _sampled_rules() -> Q:
    return Q(target_in_flight__gt=0) | Q(scale_to_zero_after__gt=0)


def inflight_sample_take(*, now: datetime) -> int:
    """Stores one sample per autoscaled model at `now` and prunes the old ones; answers how many were stored.
    A fault is logged and 0 answered: the next tick samples again."""
    try:
        with locks.singleton(locks.NAMESPACE_LOOPS, AUTOSCALE_SAMPLER) as acquired:
            if not acquired:
                return 0
            return _take(now)
    except Exception:
        logger.exception("in-flight samples not taken")
        return 0


def _take(now: datetime) -> int:
    window = timedelta(seconds=settings.LOCALAI_AUTOSCALE_WINDOW)
    rules = SchedulingRule._meta.db_table
    replicas = ModelReplica._meta.db_table
    samples = InFlightSample._meta.db_table
    live = [state.value for state in LIVE_STATES]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {samples} (model_name, at, in_flight, replicas)
            SELECT s.model_name, %(now)s,
                   COALESCE(SUM(r.in_flight) FILTER (WHERE r.state = %(loaded)s), 0),
                   COUNT(r.id)
            FROM {rules} s
            LEFT JOIN {replicas} r ON r.model_name = s.model_name AND r.state = ANY(%(live)s)
            WHERE s.target_in_flight > 0 OR s.scale_to_zero_after > 0
            GROUP BY s.model_name
            """,
            {"now": now, "loaded": ReplicaState.LOADED.value, "live": live},
        )
        stored = cursor.rowcount
        cursor.execute(
            f"""
            DELETE FROM {samples} x
            WHERE x.at < %(cutoff)s
               OR NOT EXISTS (SELECT 1 FROM {rules} s WHERE s.model_name = x.model_name
                              AND (s.target_in_flight > 0 OR s.scale_to_zero_after > 0))
            """,
            {"cutoff": now - window},
        )
    return stored


@dataclass(frozen=True)
class Load:
    """A model's average in-flight over the window, from `samples` samples."""

    average: float
    samples: int


def inflight_averages(*, model_names: Iterable[str], now: datetime) -> dict[str, Load]:
    """The average in-flight over the last `LOCALAI_AUTOSCALE_WINDOW` per model (one query); a model without
    any sample in the window is absent."""
    names = list(model_names)
    if not names:
        return {}
    since = now - timedelta(seconds=settings.LOCALAI_AUTOSCALE_WINDOW)
    rows = (
        InFlightSample.objects.filter(model_name__in=names, at__gt=since, at__lte=now)
        .values("model_name")
        .annotate(average=Avg("in_flight"), samples=Count("id"))
        .values_list("model_name", "average", "samples")
    )
    return {name: Load(float(average or 0.0), samples) for name, average, samples in rows}


# --- the decision (pure) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoscaleState:
    """What the autoscaler remembers of a rule between ticks (columns of `SchedulingRule`)."""

    scale_up_since: datetime | None = None
    scale_down_since: datetime | None = None
    scaled_up_at: datetime | None = None


@dataclass
class AutoscaleDecision:
    desired: int | None  # None without samples (nothing decided)
    place: int = 0
    trim: list[ReplicaView] = field(default_factory=list)
    # Busy replicas above the desired count once the scale-down is due: out of routing now, unloaded when
    # their requests end (`scheduling.services.replica_retire`).
    retire: list[ReplicaView] = field(default_factory=list)
    state: AutoscaleState = field(default_factory=AutoscaleState)
    reason: str = ""
    to_zero: bool = False


def desired_replicas(average: float, target: int, *, minimum: int, maximum: int) -> int:
    """ceil(average / target) clamped to [minimum, maximum] (maximum 0 = no limit)."""
    if target <= 0:
        raise ValueError("target must be above 0")
    wanted = math.ceil(round(average / target, 6)) if average > 0 else 0
    wanted = max(wanted, minimum)
    if maximum > 0:
        wanted = min(wanted, maximum)
    return wanted


def _trim_order(replica: ReplicaView) -> tuple[int, datetime]:
    """Highest replica index first, then the oldest last use (the reconciler's order)."""
    return (-replica.replica_index, replica.idle_since or datetime.min.replace(tzinfo=UTC))


def _seconds(value: float) -> str:
    return f"{value:g} s"


def zero_candidate(
    rule: RuleView, live: Sequence[ReplicaView], *, now: datetime, load: Load | None
) -> ReplicaView | None:
    """The last replica when the rule scales to zero and it may go now: `min_replicas` 0,
    `scale_to_zero_after` > 0, one live replica, loaded with no request in flight, no request claimed it for
    `scale_to_zero_after` seconds, and no in-flight request in the window's samples (when there are any)."""
    if rule.min_replicas != 0 or rule.scale_to_zero_after <= 0 or len(live) != 1:
        return None
    replica = live[0]
    if replica.state != ReplicaState.LOADED or replica.in_flight > 0:
        return None
    if load is not None and load.average > 0:
        return None
    idle_since = replica.idle_since
    if idle_since is not None and idle_since > now - timedelta(seconds=rule.scale_to_zero_after):
        return None
    return replica


def autoscale_decide(
    rule: RuleView,
    live: Sequence[ReplicaView],
    *,
    now: datetime,
    load: Load | None,
    free_slots: int | None = None,
    window: float,
    default_downscale_delay: float,
) -> AutoscaleDecision:
    """One tick of one autoscaled rule (`target_in_flight` > 0). `live`: its loading and loaded replicas;
    `free_slots`: how many more replicas the cluster could take (None: unlimited); `load`: the window's
    average (None: no samples yet, nothing changes)."""
    state = AutoscaleState(rule.scale_up_since, rule.scale_down_since, rule.scaled_up_at)
    current = len(live)
    if load is None:
        return AutoscaleDecision(None, state=state, reason="no in-flight samples yet")
    target = rule.target_in_flight
    desired = desired_replicas(load.average, target, minimum=rule.min_replicas, maximum=rule.max_replicas)
    scales_to_zero = rule.min_replicas == 0 and rule.scale_to_zero_after > 0
    if desired == 0 and current > 0 and not scales_to_zero:
        desired = 1  # without scale to zero the last replica stays, as with the burst rule
    reason = f"avg in-flight {load.average:.1f} over {_seconds(window)} / target {target} → desired {desired}"
    down_delay = rule.downscale_delay if rule.downscale_delay is not None else default_downscale_delay

    if desired > current:
        room = desired - current if free_slots is None else min(desired - current, free_slots)
        since = state.scale_up_since or now
        waited = (now - since).total_seconds()
        if room <= 0:
            return AutoscaleDecision(
                desired,
                state=AutoscaleState(since, None, state.scaled_up_at),
                reason=f"{reason}; no free slot",
            )
        if waited < rule.upscale_delay:
            return AutoscaleDecision(
                desired,
                state=AutoscaleState(since, None, state.scaled_up_at),
                reason=f"{reason}; scale-up in {_seconds(rule.upscale_delay - waited)}",
            )
        return AutoscaleDecision(
            desired,
            place=room,
            state=AutoscaleState(None, None, now),
            reason=f"{reason}; above {current} for {_seconds(round(waited))}",
        )

    if desired < current:
        since = state.scale_down_since or now
        waited = (now - since).total_seconds()
        kept = AutoscaleState(None, since, state.scaled_up_at)
        if state.scaled_up_at is not None:
            after_up = (now - state.scaled_up_at).total_seconds()
            if after_up < down_delay:
                return AutoscaleDecision(
                    desired,
                    state=kept,
                    reason=f"{reason}; no scale-down within {_seconds(down_delay)} of a scale-up",
                )
        if any(r.state != ReplicaState.LOADED for r in live):
            return AutoscaleDecision(desired, state=kept, reason=f"{reason}; waiting for a replica to load")
        trim: list[ReplicaView] = []
        floor = max(desired, 1)
        if waited >= down_delay and current > floor:
            idle = sorted(
                (r for r in live if r.state == ReplicaState.LOADED and r.in_flight == 0), key=_trim_order
            )
            trim = idle[: current - floor]
        retire: list[ReplicaView] = []
        if waited >= down_delay and current - len(trim) > floor:
            busy = sorted((r for r in live if r not in trim), key=lambda r: (r.in_flight, _trim_order(r)))
            retire = busy[: current - len(trim) - floor]
        to_zero = False
        if desired == 0:
            rest = [r for r in live if r not in trim]
            last = zero_candidate(rule, rest, now=now, load=load)
            if last is not None:
                trim.append(last)
                to_zero = True
        if not trim and not retire:
            left = max(down_delay - waited, 0)
            wait = f"scale-down in {_seconds(round(left))}" if left else "waiting for idle replicas"
            return AutoscaleDecision(desired, state=kept, reason=f"{reason}; {wait}")
        if to_zero:
            reason = f"{reason}; scale to zero: no request for {_seconds(rule.scale_to_zero_after)}"
        else:
            reason = f"{reason}; below {current} for {_seconds(round(waited))}"
        return AutoscaleDecision(
            desired, trim=trim, retire=retire, state=kept, reason=reason, to_zero=to_zero
        )

    return AutoscaleDecision(desired, state=AutoscaleState(None, None, state.scaled_up_at), reason=reason)


def state_changes(rule: RuleView, state: AutoscaleState) -> Mapping[str, datetime | None]:
    """The rule's columns to write for `state` (empty when nothing changed)."""
    changes = {
        "scale_up_since": state.scale_up_since,
        "scale_down_since": state.scale_down_since,
        "scaled_up_at": state.scaled_up_at,
    }
    return {key: value for key, value in changes.items() if getattr(rule, key) != value}
