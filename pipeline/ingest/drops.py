"""Identities left out of ingest records: counted (`cdp_identities_dropped_total`) and logged, rate-limited,
never with their values."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from pipeline.identity.namespaces import Dropped
from pipeline.observability import metrics

log = logging.getLogger(__name__)

# At most one log line this often (the first drop is logged at once), with the counts since the last line.
LOG_EVERY_S = 60.0


class DropReporter:
    """`Decoder.on_drop` for a worker: every dropped identity counted by namespace and reason in the batch's
    tally, and a summary line at most every LOG_EVERY_S."""

    def __init__(self, tally: metrics.Tally, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.tally, self.clock, self.log = tally, clock, logger
        self.pending: Counter[tuple[str, str]] = Counter()
        self.next_line = float("-inf")

    def __call__(self, dropped: list[Dropped]) -> None:
        for d in dropped:
            self.tally.add(metrics.IDENTITIES_DROPPED, d.namespace, d.reason)
            self.pending[(d.namespace, d.reason)] += 1
        now = self.clock()
        if now >= self.next_line:
            self.next_line = now + LOG_EVERY_S
            self.flush_line()

    def flush_line(self) -> None:
        """Log what was dropped since the last line (namespaces and reasons: configuration vocabulary)."""
        if not self.pending:
            return
        counts, self.pending = self.pending, Counter()
        self.log.warning("ingest: %d identities left out of records (%s; values not logged; "
                         "cdp_identities_dropped_total counts them; at most one such line every %.0f s)",
                         sum(counts.values()),
                         ", ".join(f"{ns} {reason}: {n}" for (ns, reason), n in sorted(counts.items())),
                         LOG_EVERY_S)
