"""Placement's errors. How a replica is placed — snapshot, verdicts, ranking, claim — is
`scheduling.pipeline`."""

from __future__ import annotations


class PlacementError(Exception):
    """A replica could not be placed or loaded; `reason` is one sentence for the operator or the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoCapacity(PlacementError):
    """Nothing fits, even after eviction: no node matches, no free slot, or not enough VRAM."""


class UnknownModel(PlacementError):
    """The model is not in the catalog, so there is nothing to load."""


class LoadFailed(PlacementError):
    """The agent could not start the replica (or it did not become ready in time); nothing was left behind.
    `retry_after`: seconds before the model's next load attempt (`scheduling.loadfailures`), when known."""

    retry_after: int | None = None
