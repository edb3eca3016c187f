"""Backoff after a failed load, cluster-wide (issue 12 item 3).

A catalog model whose load failed (the backend's `LoadModel` said no, it exited, or it was not ready within
`LOCALAI_LOAD_TIMEOUT`) is not loaded again before its `LoadFailure.retry_at`: every placement path (the
router's cold path through `replica_place`, the reconciler) asks `load_attempt_begin` first, which raises
`LoadBackingOff` — a `LoadFailed` carrying the last error and the seconds left — instead of starting another
backend process. The cooldown is `LOCALAI_LOAD_FAILURE_BACKOFF` (10 s) after the first failed attempt and
doubles per further failed attempt, up to 5 minutes (`backoff_seconds`).

Concurrent failures of one attempt count once: an attempt remembers the row's `last_failed_at` it saw when
it began, and a failure is counted only when that is still the row's value (the reconciler loading three
replicas of a broken model in parallel makes one failed attempt, not three). Times are the database's clock,
so a test (or an operator) moves `retry_at` to let the next request try at once.

The row goes away on a successful load, on a catalog edit of the model (`scheduling.catalog`, the Django
admin), on any cluster capacity change (`scheduling.signals`: a node registered, approved, back, resumed,
relabelled...), and on an admin "retry now" (`POST /api/models/{name}/retry-load`, the pages' button).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models.functions import Now

from scheduling.models import LoadFailure
from scheduling.placement import LoadFailed
from worker_client.errors import WorkerError

logger = logging.getLogger("scheduling.placement")

MAX_BACKOFF_SECONDS = 300.0


def backoff_seconds(failures: int, *, base: float, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """The cooldown after `failures` failed attempts in a row: `base`, then doubling, at most `cap` (or
    `base` when that is larger). 0 when `base` is 0 (backoff off) or nothing failed."""
    if failures <= 0 or base <= 0:
        return 0.0
    return min(base * 2 ** min(failures - 1, 30), max(cap, base))


def retry_after_seconds(remaining: float) -> int:
    """A `Retry-After` value (whole seconds, at least 1) for `remaining` seconds of cooldown."""
    return max(1, math.ceil(remaining))


class LoadBackingOff(LoadFailed):
    """The model's last load failed and its cooldown is running: nothing was started."""

    def __init__(self, failure: LoadFailure, remaining: float) -> None:
        self.failure = failure
        since = failure.first_failed_at.strftime("%H:%M:%S")
        super().__init__(
            f"{failure.last_error} (load failing since {since} UTC, {failure.failures} failed "
            f"attempt{'s' if failure.failures != 1 else ''}; next try in {retry_after_seconds(remaining)} s)"
        )
        self.retry_after = retry_after_seconds(remaining)


@dataclass(frozen=True)
class LoadAttempt:
    """Permission to load `model_name` once; `seen_failed_at` is the failure row's `last_failed_at` when the
    attempt began (None: no row), so concurrent failures of the same attempt are counted once."""

    model_name: str
    seen_failed_at: datetime | None = None
    failures: int = 0

    @property
    def is_retry(self) -> bool:
        """The model failed before (its cooldown is over): try one replica, not many."""
        return self.failures > 0


def _backing_off(row: LoadFailure, db_now: datetime) -> LoadBackingOff | None:
    remaining = (row.retry_at - db_now).total_seconds()
    return LoadBackingOff(row, remaining) if remaining > 0 else None


def load_attempts_begin(*, model_names: list[str]) -> dict[str, LoadAttempt | LoadBackingOff]:
    """For each model, a `LoadAttempt` (it may be loaded now) or the `LoadBackingOff` to report: one query."""
    result: dict[str, LoadAttempt | LoadBackingOff] = {name: LoadAttempt(name) for name in model_names}
    for row in LoadFailure.objects.filter(model_name__in=model_names).annotate(db_now=Now()):
        blocked = _backing_off(row, row.db_now)
        result[row.model_name] = blocked or LoadAttempt(row.model_name, row.last_failed_at, row.failures)
    return result


def load_attempt_begin(*, model_name: str) -> LoadAttempt:
    """A `LoadAttempt` for `model_name`; raises `LoadBackingOff` while its cooldown runs (one query)."""
    outcome = load_attempts_begin(model_names=[model_name])[model_name]
    if isinstance(outcome, LoadBackingOff):
        raise outcome
    return outcome


def counts_as_load_failure(error: LoadFailed) -> bool:
    """A failure of the model's load itself: the agent answered `LoadReplica` with an error (not: the agent
    could not be reached, or the replica row went away meanwhile)."""
    cause = error.__cause__
    return isinstance(cause, WorkerError) and not cause.connect_failed


def load_failure_record(*, attempt: LoadAttempt, error: str) -> LoadFailure:
    """Records a failed load of `attempt` and answers the row (its `retry_at` is when the next attempt may
    start). Counted (failures + 1, a new cooldown from now) only when no other failure was recorded since the
    attempt began; otherwise only the error text is updated."""
    base = float(settings.LOCALAI_LOAD_FAILURE_BACKOFF)
    error = error[:4000]
    with transaction.atomic():
        row = LoadFailure.objects.select_for_update().filter(model_name=attempt.model_name).first()
        # The clock is read once the row is locked (not the transaction's start, `now()`): a failure that waited
        # for the lock must not write a `last_failed_at` older than the one it overwrites.
        with connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            now = cursor.fetchone()[0]
        if row is None:
            try:
                with transaction.atomic():
                    row = LoadFailure.objects.create(
                        model_name=attempt.model_name,
                        failures=1,
                        last_error=error,
                        first_failed_at=now,
                        last_failed_at=now,
                        retry_at=now + timedelta(seconds=backoff_seconds(1, base=base)),
                    )
                    counted = True
            except IntegrityError:  # another process recorded the same attempt's failure first
                row = LoadFailure.objects.select_for_update().get(model_name=attempt.model_name)
                counted = _count_into(row, attempt, error, now, base)
        else:
            counted = _count_into(row, attempt, error, now, base)
    logger.warning(
        "load of %s failed (%s, %d failed attempt(s)): no new attempt before %s",
        attempt.model_name,
        "counted" if counted else "same attempt",
        row.failures,
        row.retry_at.isoformat(),
    )
    return row


def _count_into(row: LoadFailure, attempt: LoadAttempt, error: str, now: datetime, base: float) -> bool:
    counted = row.last_failed_at == attempt.seen_failed_at
    if counted:
        row.failures += 1
        row.retry_at = now + timedelta(seconds=backoff_seconds(row.failures, base=base))
    row.last_error = error
    row.last_failed_at = max(row.last_failed_at, now)
    row.save(update_fields=["failures", "retry_at", "last_error", "last_failed_at"])
    return counted


def load_failure_note(*, attempt: LoadAttempt, error: LoadFailed) -> None:
    """After `replica_load` raised `error`: records it when it was the model's own failure, and gives the
    error the `retry_after` its client should wait."""
    if not counts_as_load_failure(error) or settings.LOCALAI_LOAD_FAILURE_BACKOFF <= 0:
        return
    row = load_failure_record(attempt=attempt, error=error.reason)
    error.retry_after = retry_after_seconds((row.retry_at - row.last_failed_at).total_seconds())


def load_failure_clear(*, model_name: str, reason: str) -> bool:
    """Forgets the model's failed loads (the next request or tick may load it at once); True when there
    were some."""
    deleted, _ = LoadFailure.objects.filter(model_name=model_name).delete()
    if deleted:
        logger.info("load backoff of %s cleared: %s", model_name, reason)
    return deleted > 0


def load_failures_clear(*, model_names: list[str], reason: str) -> int:
    """`load_failure_clear` of many models in one statement; answers how many had failed loads."""
    deleted, _ = LoadFailure.objects.filter(model_name__in=model_names).delete()
    if deleted:
        logger.info("load backoff of %d model(s) cleared: %s", deleted, reason)
    return deleted


def load_failures_clear_all(*, reason: str) -> int:
    """Forgets every model's failed loads; answers how many models had some."""
    deleted, _ = LoadFailure.objects.all().delete()
    if deleted:
        logger.info("load backoff of %d model(s) cleared: %s", deleted, reason)
    return deleted


def load_failure_payload(failure: LoadFailure | None) -> dict[str, Any] | None:
    """The API's `load_failure` object of a model (None when its loads are not failing)."""
    if failure is None:
        return None
    return {
        "failures": failure.failures,
        "last_error": failure.last_error,
        "since": failure.first_failed_at,
        "retry_at": failure.retry_at,
    }
