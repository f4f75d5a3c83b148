"""Kafka outages: noticed from the clients' errors and the output's acknowledgements, waited out, reported on
/readyz, and logged in a few lines (when it starts, now and then with backoff while it lasts, when it ends)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from pipeline.backoff import Backoff
from pipeline.observability import metrics
from pipeline.observability.logs import log_client_error
from pipeline.observability.readiness import Readiness

log = logging.getLogger(__name__)

# A flush (before a commit) still waiting after this long means the output cannot be delivered.
STALL_AFTER_S = 10.0
# While a client says every broker is down: how often the broker is asked again (1 s, 2 s, 4 s, then every
# 5 s), so the outage's end is noticed within ~5 s even when nothing waits to be delivered.
PROBE_FIRST_S, PROBE_MAX_S = 1.0, 5.0
# "Still waiting" lines: 15 s, 30 s, 60 s ... into the outage, then every 5 min.
REPORT_FIRST_S, REPORT_MAX_S = 15.0, 300.0
# librdkafka errors that only say a connection failed: counted, not logged (its throttled FAIL line says it)
CONNECTION_ERRORS = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE,
                               KafkaError._TIMED_OUT})
READINESS_REASON = "kafka"


class KafkaWatch:
    """Whether Kafka is reachable, from what the worker's clients see:
    1. a librdkafka client reports all brokers down (`error_cb`): suspected, confirmed by a probe (a metadata
       request, in a thread) that fails, and over when a probe succeeds (probes back off, 1 s to 5 s);
    2. a flush of the output producer (every commit waits for one) has waited STALL_AFTER_S: the output
       cannot be delivered, whatever the clients say; over when the flush completes.
    While either holds the worker is not ready (`Readiness`, reason "kafka") and `tick` logs a line at
    backoff intervals; nothing else is logged per failure (the clients' own lines are throttled)."""

    def __init__(self, readiness: Readiness, unacknowledged: Callable[[], int], waiting_s: Callable[[], float],
                 probe: Callable[[], Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.readiness = readiness
        self._unacknowledged, self._waiting_s, self._probe, self._clock = unacknowledged, waiting_s, probe, clock
        self._suspected_at: float | None = None  # a client reported all brokers down, no probe succeeded since
        self._confirmed = False  # a probe failed since
        self._next_probe = 0.0
        self._probes = Backoff(PROBE_FIRST_S, PROBE_MAX_S)
        self._reports = Backoff(REPORT_FIRST_S, REPORT_MAX_S)
        self._next_report = 0.0
        self.since: float | None = None  # the outage in progress started then (monotonic)
        self.errors = 0  # connection errors the clients reported during the outage in progress
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    @property
    def unreachable(self) -> bool:
        """Down, or reported down by a client and not disproved yet: not the time for a blocking request."""
        return self.since is not None or self._suspected_at is not None

    def error_cb(self, err: KafkaError) -> None:
        """The `error_cb` of the worker's librdkafka clients (run by their poll, on the event loop's thread)."""
        if err.fatal() or err.code() not in CONNECTION_ERRORS:
            log_client_error(err)
            return
        self.errors += 1
        if err.code() == KafkaError._ALL_BROKERS_DOWN and self._suspected_at is None:
            self._suspected_at = self._clock()
            self._next_probe = self._suspected_at  # at the next tick

    async def tick(self) -> None:
        """Called every second or so: probe if due, then start, report or end the outage."""
        now = self._clock()
        if self._suspected_at is not None and now >= self._next_probe:
            if await self._reachable():
                self._suspected_at, self._confirmed = None, False
                self._probes.reset()
            else:
                self._confirmed = True
                self._next_probe = self._clock() + self._probes.next()
        now = self._clock()
        waiting = self._waiting_s()
        stalled = waiting >= STALL_AFTER_S
        if (self._confirmed or stalled) and self.since is None:
            self._begin(now, waiting, stalled)
        elif self.since is not None and not (self._confirmed or stalled):
            self._end(now)
        elif self.since is not None:
            self.readiness.set(READINESS_REASON, self._detail(now))
            if now >= self._next_report:
                self._next_report = now + self._reports.next()
                log.warning("Kafka still unreachable after %.0f s: %d output messages unacknowledged, %d "
                            "connection errors (their lines are throttled); still waiting",
                            now - self.since, self._unacknowledged(), self.errors)

    async def _reachable(self) -> bool:
        try:
            await asyncio.to_thread(self._probe)
        except Exception:  # noqa: BLE001 - any failure to get metadata: still unreachable
            return False
        return True

    def _detail(self, now: float) -> str:
        assert self.since is not None
        return f"unreachable for {now - self.since:.0f} s, {self._unacknowledged()} output messages unacknowledged"

    def _begin(self, now: float, waiting: float, stalled: bool) -> None:
        starts = [now - waiting] if stalled else []
        if self._suspected_at is not None:
            starts.append(self._suspected_at)
        self.since = min(starts) if starts else now
        self.outages += 1
        metrics.KAFKA_OUTAGES.inc()
        self._reports.reset()
        self._next_report = now + self._reports.next()
        self.readiness.set(READINESS_REASON, self._detail(now))
        why = (f"the output has waited {waiting:.0f} s for acknowledgements" if stalled
               else "every broker is down")
        log.warning("Kafka unreachable (%s): waiting for it with backoff. The worker stays up and reports not "
                    "ready on /readyz; nothing is committed until what was produced is acknowledged", why)

    def _end(self, now: float) -> None:
        assert self.since is not None
        log.warning("Kafka reachable again after %.0f s (%d connection errors meanwhile); resuming",
                    now - self.since, self.errors)
        self.since = None
        self.errors = 0
        self._probes.reset()
        self.readiness.clear(READINESS_REASON)
