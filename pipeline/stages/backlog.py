"""How far behind its stage topics a worker is: what its ingest loop waits on (backpressure).

Ingest hands a record for a person it cannot place yet (no owner of its home identity) to the identity topic, and
moves on. Without a brake, an overloaded worker keeps taking new records, and the event loop's time goes to them
(the in-process path of known people is cheaper) while the identity and profile-op topics pile up: records of
new people then wait minutes, memberships with them, and the lag is where no one looks (measured: 70,000
identity messages behind after 30 s at twice capacity, ingest lag near 0). With the brake, ingest stops taking
records while the stage topics are more than `limit` messages behind, so the worker finishes older work first
and its lag shows on the ingest topics, where producers and operators watch it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# A partition not reported for this long (its partitions revoked, Faust rebalancing) no longer counts:
# the brake must never hold ingest on a figure no one updates.
STALE_S = 5.0


class StageBacklog:
    """Per stage-topic partition this worker consumes: the messages after those its stage last handled
    (the partition's high watermark, as the consumer last fetched it, minus the next offset to handle)."""

    def __init__(self, limit: int, stale_s: float = STALE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit  # 0: no brake
        self._stale_s = stale_s
        self._clock = clock
        self._behind: dict[tuple[str, int], tuple[int, float]] = {}  # (topic, partition) -> (messages, when)

    def note(self, topic: str, partition: int, behind: int) -> None:
        """Called by the stage consumer after each batch, per partition in it."""
        self._behind[(topic, partition)] = (max(0, behind), self._clock())

    def forget(self, topic: str, partition: int) -> None:
        """Called when the partition is no longer consumed here (its next owner reports it)."""
        self._behind.pop((topic, partition), None)

    def behind(self) -> int:
        """Messages behind, summed over the partitions reported within STALE_S."""
        now = self._clock()
        return sum(n for n, when in self._behind.values() if now - when <= self._stale_s)

    def over(self) -> bool:
        """Whether ingest should wait (the brake is on and the stages are more than `limit` behind)."""
        return self.limit > 0 and self.behind() > self.limit
