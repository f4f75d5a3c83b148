"""The worker's in-memory schedule of profile deadlines (when a profile must be evaluated again without new data)."""

from __future__ import annotations

import heapq

from pipeline.observability import metrics


class Deadlines:
    """A min-heap of (due ms, profile id), one live entry per profile; rebuilt from the table when a partition
    is assigned. A profile's deadline is noted on every write, mostly unchanged: only a new due time is pushed,
    and entries left behind by a moved deadline are skipped when they come up (or dropped when they outnumber
    the live ones), so the heap stays the size of the profiles with a deadline, however many writes there are.
    Firing is at-least-once and harmless when stale: a tick re-checks the stored deadline before evaluating."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, str]] = []
        self._due: dict[str, int] = {}  # profile id -> its live due time

    def __len__(self) -> int:
        return len(self._due)

    def note(self, pid: str, due: int | None) -> None:
        """Called after each write of a profile: schedule its deadline (None: keep what is scheduled, the
        tick then finds nothing due)."""
        if due is None or self._due.get(pid) == due:
            return
        self._due[pid] = due
        heapq.heappush(self.heap, (due, pid))
        if len(self.heap) > 2 * len(self._due) + 1024:
            self.heap = [(d, p) for p, d in self._due.items()]
            heapq.heapify(self.heap)
        metrics.DEADLINES_PENDING.set(len(self._due))

    def due(self, now_ms: int) -> list[str]:
        """The profiles whose deadline has come, once each, in id order; they leave the schedule."""
        out: list[str] = []
        while self.heap and self.heap[0][0] <= now_ms:
            due, pid = heapq.heappop(self.heap)
            if self._due.get(pid) == due:
                del self._due[pid]
                out.append(pid)
        if out:
            metrics.DEADLINES_PENDING.set(len(self._due))
        return sorted(out)
