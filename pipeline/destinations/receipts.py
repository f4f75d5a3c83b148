"""Receipts: what a destination acknowledged of membership changes, published for the worker's profile stage.

After a lane's flush (its payloads delivered), one small record per membership payload goes on
`activation.receipts`, keyed by profile id (murmur2, as the worker partitions its profile table, so it reaches the
profile's partition): a `pipeline.stages.messages.Receipt` (profile id, audience, destination, entered or exited,
when, the message's event time and idempotency key; never an identity). Receipts never hold deliveries back: a
missing topic turns them off (one log line), and a publish that Kafka does not acknowledge in time is counted and
logged, never raised; the runner commits either way (a receipt lost that way only leaves the console's view older).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient

from pipeline.connection import Kafka, client_config
from pipeline.destinations.base import Payload, TopicResolver
from pipeline.destinations.lane import RunnerSettings
from pipeline.observability import metrics
from pipeline.stages.messages import Receipt, encode

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0  # how long a commit waits for its receipts before it goes on without them


def receipts_of(name: str, payloads: list[Payload], delivered_ms: int) -> list[Receipt]:
    """The receipts of a destination's delivered payloads: membership payloads only (an attribute update is no
    membership's), `realized` and `existing` both as `entered`."""
    return [Receipt(pid=p.profile_id, audience=p.audience_id, destination=name,
                    status="exited" if p.status == "exited" else "entered", delivered_ms=delivered_ms,
                    event_ms=p.event_time_ms, key=p.idempotency_key)
            for p in payloads if p.kind == "membership" and p.audience_id is not None]


class Receipts:
    """The receipts producer (idempotent, acks=all, murmur2 partitioning). `start()` checks the topic exists."""

    def __init__(self, kafka: Kafka, topics: TopicResolver, settings: RunnerSettings) -> None:
        self.kafka = kafka
        self.topic = topics.name(settings.receipts_topic) if settings.receipts_topic else None
        self.settings = settings
        self._producer: Producer | None = None
        self._failed = 0  # receipts Kafka refused since the last flush (delivery reports)

    @property
    def enabled(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        if self.topic is None:
            return
        admin = AdminClient(client_config(self.kafka))
        listed = await asyncio.to_thread(admin.list_topics, timeout=10)
        if self.topic not in listed.topics:
            log.warning("destination receipts are off: topic %s does not exist (`pipeline topics apply` creates it); "
                        "the console will not show which destinations memberships reached", self.topic)
            return
        self._producer = Producer(client_config(self.kafka, {
            "acks": "all", "enable.idempotence": True, "linger.ms": 20, "partitioner": "murmur2_random",
            **self.settings.producer_config}))

    def publish(self, name: str, payloads: list[Payload]) -> int:
        """Queue the receipts of `name`'s delivered payloads; returns how many (none when off)."""
        if self._producer is None or self.topic is None:
            return 0
        receipts = receipts_of(name, payloads, int(time.time() * 1000))
        for r in receipts:
            try:
                self._producer.produce(self.topic, encode(r), r.pid.encode(), on_delivery=self._on_delivery)
            except BufferError:  # the queue is full: this one is lost, deliveries go on
                self._failed += 1
            self._producer.poll(0)
        if receipts:
            metrics.DESTINATION_RECEIPTS.labels(name).inc(len(receipts))
        return len(receipts)

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._failed += 1

    async def flush(self) -> None:
        """Wait (at most FLUSH_TIMEOUT_S) until Kafka has acknowledged the receipts published so far; what it has
        not is logged and left to the producer, never raised."""
        if self._producer is None:
            return
        remaining = await asyncio.to_thread(self._producer.flush, FLUSH_TIMEOUT_S)
        failed, self._failed = self._failed, 0
        if remaining or failed:
            metrics.DESTINATION_RECEIPTS_FAILED.inc(failed)
            log.warning("destination receipts: %d not acknowledged yet, %d refused (deliveries go on)", remaining,
                        failed)

    async def close(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, FLUSH_TIMEOUT_S)
