"""Audience sizes: the number of current members (realized or existing) per audience, kept per partition by
the worker that owns the partition, and summed over partitions (and workers) on request.

Why here and not from `activation.membership-state`: an exact count from the compacted topic needs every key's
latest status (a read of the whole topic per request, or every member key held in memory by each worker), and a
count from the change messages alone double-counts redelivered ones. The owner of a partition already reads
every profile of it when it is assigned (`pipeline.profiles.walks.restore_partition`): counting active
memberships in the same pass is nearly free, and each membership change the owner publishes (a transition decided
once: realized from nothing or exited, exited from realized or existing) moves the count by one. An outbox sent again is not a transition and
does not count. The count lives in memory only: a worker that dies takes it along and the next owner counts again
from the store. A handling that fails after publishing (dead-lettered, the profile rebuilt without it) leaves its
transitions counted until the partition is next assigned: rare, and a size is a figure, not a member list.

Flows: the same transitions, counted per audience and minute of publication (entries, exits) for the last 24
hours, in memory: each worker counts what it published since it started, and the audience's answer sums them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from pipeline.model import MembershipChange

ACTIVE = frozenset({"realized", "existing"})
MINUTE_MS = 60_000
FLOW_WINDOW_MINUTES = 24 * 60


def delta(status: str, previous: str | None) -> int:
    """+1 when a change makes a member, -1 when it ends one, 0 otherwise."""
    was, now = previous in ACTIVE, status in ACTIVE
    return int(now) - int(was)


class AudienceSizes:
    """Per partition held: audience id -> current members. `scan(partition)` counts a partition from its store
    (set by the profile agent); a partition without a count is counted on first use."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter[str]] = {}
        self.scan: Callable[[int], Counter[str]] | None = None
        self._flows: dict[str, dict[int, list[int]]] = {}  # audience -> minute -> [entries, exits]

    def set(self, partition: int, counts: Counter[str]) -> None:
        """The partition's counts as read from its store (when it is assigned)."""
        self._counts[partition] = counts

    def drop(self, partition: int) -> None:
        """The partition was revoked: its next owner counts it."""
        self._counts.pop(partition, None)

    def apply(self, partition: int, changes: Iterable[MembershipChange]) -> None:
        """Membership changes the owner published; ignored for a partition not counted yet (its scan reads the
        store, which then holds them already)."""
        counts = self._counts.get(partition)
        for change in changes:
            d = delta(change.status, change.previous_status)
            if d:
                if counts is not None:
                    counts[change.audience_id] += d
                self._flow(change.audience_id, change.emit_time_ms // MINUTE_MS, d)

    def _flow(self, audience_id: str, minute: int, d: int) -> None:
        buckets = self._flows.setdefault(audience_id, {})
        if minute not in buckets:
            for old in [m for m in buckets if m <= minute - FLOW_WINDOW_MINUTES]:
                del buckets[old]
            buckets[minute] = [0, 0]
        buckets[minute][0 if d > 0 else 1] += 1

    def flows(self, audience_id: str, now_ms: int) -> dict[int, list[int]]:
        """minute (ms) -> [entries, exits] of the audience in the last 24 hours, minutes without any left out."""
        first = now_ms // MINUTE_MS - FLOW_WINDOW_MINUTES
        return {m * MINUTE_MS: list(v) for m, v in sorted(self._flows.get(audience_id, {}).items()) if m > first}

    def of(self, audience_id: str, partitions: Iterable[int]) -> dict[int, int]:
        """partition -> current members of the audience, for the partitions given (those held now)."""
        out: dict[int, int] = {}
        for p in sorted(partitions):
            counts = self._counts.get(p)
            if counts is None:
                if self.scan is None:
                    continue
                counts = self._counts[p] = self.scan(p)
            out[p] = max(0, counts.get(audience_id, 0))
        return out
