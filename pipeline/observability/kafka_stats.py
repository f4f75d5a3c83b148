"""Consumer lag, assignments, rebalances, broker round-trip times and queue depths as Prometheus gauges: from
librdkafka's statistics (ingest and destination consumers, the output producer) and from the group's
committed offsets (Faust's aiokafka group, which has no statistics callback)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.observability import metrics

log = logging.getLogger(__name__)

# librdkafka's statistics every 5 s: cheap (one JSON document per client), fine-grained enough for a 15 s scrape
STATS_INTERVAL_MS = 5000


@dataclass(frozen=True)
class ClientStats:
    """What a librdkafka statistics document says that the metrics show."""

    lag: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> records, assigned only
    rtt_s: dict[str, float] = field(default_factory=dict)  # broker "host:port/id" -> average round trip
    queued: int = 0  # producer: msg_cnt; consumer: fetched records not consumed yet
    rebalances: int | None = None  # cumulative, consumers only


def partition_lag(high: int, committed: int, low: int) -> int | None:
    """Records of a partition the group has not committed: high watermark minus committed offset; with no
    commit yet (a negative offset), everything still on the partition (the group starts at the earliest)."""
    if high < 0:
        return None
    start = committed if committed >= 0 else max(low, 0)
    return max(high - start, 0)


def parse_stats(document: str | Mapping[str, Any]) -> ClientStats:
    """Read one librdkafka statistics document (STATISTICS.md): per assigned partition its consumer lag,
    per broker the average rtt (only brokers with a node id and measured requests), the queue depth and the
    consumer group's rebalance count."""
    doc = json.loads(document) if isinstance(document, str) else document
    consumer = doc.get("type") == "consumer"
    lag: dict[tuple[str, int], int] = {}
    fetched = 0
    for topic, t in (doc.get("topics") or {}).items():
        for p in (t.get("partitions") or {}).values():
            partition = int(p.get("partition", -1))
            # -1 is librdkafka's internal "unassigned" partition; fetch_state "none": not consumed here
            if not consumer or partition < 0 or p.get("fetch_state", "none") == "none":
                continue
            fetched += int(p.get("fetchq_cnt", 0))
            n = p.get("consumer_lag", -1)
            if n is None or n < 0:
                n = partition_lag(int(p.get("hi_offset", -1)), int(p.get("committed_offset", -1)),
                                  int(p.get("lo_offset", -1)))
            if n is not None:
                lag[(topic, partition)] = int(n)
    rtt: dict[str, float] = {}
    for name, b in (doc.get("brokers") or {}).items():
        r = b.get("rtt") or {}
        if int(b.get("nodeid", -1)) >= 0 and r.get("cnt", 0) > 0:
            rtt[name] = r.get("avg", 0) / 1e6  # librdkafka reports microseconds
    cgrp = doc.get("cgrp")
    return ClientStats(lag=lag, rtt_s=rtt, queued=fetched if consumer else int(doc.get("msg_cnt", 0)),
                       rebalances=int(cgrp["rebalance_cnt"]) if consumer and cgrp else None)


class GroupLag:
    """The lag gauges of one consumer group in this process: each report replaces the previous one, so a
    partition that moved to another worker stops being reported here (its new owner reports it)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._shown: set[tuple[str, int]] = set()

    def report(self, lag: Mapping[tuple[str, int], int]) -> None:
        for topic, partition in self._shown - set(lag):
            metrics.CONSUMER_LAG.remove(self.group, topic, str(partition))
        for (topic, partition), n in lag.items():
            metrics.CONSUMER_LAG.labels(self.group, topic, str(partition)).set(n)
        self._shown = set(lag)
        metrics.PARTITIONS_ASSIGNED.labels(self.group).set(len(lag))


class LibrdkafkaStats:
    """A librdkafka `stats_cb`: updates the gauges of client `client` (and, for a consumer, of its `group`).
    Served by the client's poll/consume, on the thread that polls."""

    def __init__(self, client: str, group: str | None = None) -> None:
        self.client = client
        self.group = GroupLag(group) if group else None
        self._rebalances: int | None = None
        self._brokers: set[str] = set()

    def config(self, interval_ms: int = STATS_INTERVAL_MS) -> dict[str, Any]:
        """The client properties that turn the statistics on and send them here."""
        return {"statistics.interval.ms": interval_ms, "stats_cb": self}

    def __call__(self, document: str) -> None:
        try:
            stats = parse_stats(document)
        except (ValueError, KeyError, TypeError) as exc:  # a statistics bug must never stop consuming
            log.warning("librdkafka statistics of %s not read: %s", self.client, type(exc).__name__)
            return
        self.apply(stats)

    def apply(self, stats: ClientStats) -> None:
        if self.group is not None:
            self.group.report(stats.lag)
            if stats.rebalances is not None:
                new = stats.rebalances - (self._rebalances or 0)
                if new > 0:
                    metrics.REBALANCES.labels(self.group.group).inc(new)
                self._rebalances = stats.rebalances
        for broker in self._brokers - set(stats.rtt_s):
            metrics.KAFKA_BROKER_RTT.remove(self.client, broker)
        for broker, seconds in stats.rtt_s.items():
            metrics.KAFKA_BROKER_RTT.labels(self.client, broker).set(seconds)
        self._brokers = set(stats.rtt_s)
        metrics.KAFKA_CLIENT_QUEUE.labels(self.client).set(stats.queued)
