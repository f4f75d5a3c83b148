"""How each destination is doing: this process's counters and, from Kafka, its lag."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer

from pipeline.connection import Kafka, client_config
from pipeline.destinations.lane import Lane, group_id
from pipeline.destinations.offsets import bounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DestinationStatus:
    """One destination's health as `DestinationRunner.status()` reports it."""

    name: str
    kind: str
    running: bool
    lag: int | None  # messages on the source topics not yet committed by cdp-dest-<name>
    last_delivery_ms: int | None
    consumed: int
    delivered: int
    skipped: dict[str, int]
    errors: dict[str, int]
    dead_lettered: int
    dead_letter_depth: int | None  # dead-letter messages not yet redriven
    breaker: str | None


def local_row(lane: Lane) -> dict[str, Any]:
    """One lane's counters (no Kafka calls): what `status` cannot read from Kafka."""
    return {
        "kind": lane.config.kind, "running": lane.running,
        "last_delivery_ms": lane.last_delivery_ms, "consumed": lane.consumed,
        "delivered": lane.delivered, "skipped": dict(lane.skipped), "errors": dict(lane.errors),
        "dead_lettered": lane.dead_lettered, "breaker": lane.destination.stats().get("breaker")}


def destination_status(lane: Lane, lag: int | None, depth: int | None) -> DestinationStatus:
    """A lane's counters with what Kafka says (lag, dead-letter depth)."""
    row = local_row(lane)
    return DestinationStatus(name=lane.config.name, lag=lag, dead_letter_depth=depth, **row)


def lag(kafka: Kafka, name: str, topics: Iterable[str]) -> int | None:
    """Messages of the (physical) source `topics` not yet committed by destination `name`'s group; None when
    Kafka cannot say (logged)."""
    try:
        probe = Consumer(client_config(kafka, {"group.id": group_id(name), "enable.auto.commit": False}))
        try:
            total = 0
            for topic in topics:
                ends, starts = bounds(probe, topic)
                total += sum(ends[p] - starts[p] for p in ends)
            return total
        finally:
            probe.close()
    except Exception:
        log.exception("destination %s: cannot read offsets for status", name)
        return None
