"""The destinations' dead letters: writing them (shared topic, `destination` header), redrive and depth."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.connection import Kafka, client_config
from pipeline.destinations.base import Payload, TopicResolver
from pipeline.destinations.lane import RunnerSettings
from pipeline.destinations.offsets import bounds
from pipeline.errors import DeliveryError
from pipeline.kafka_reads import ReadTimeout, read_chunks, read_positions
from pipeline.observability import metrics
from pipeline.topics import TopicRegistry

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]


class DeadLetters:
    """The dead-letter topic every destination shares. `start()` opens its producer (idempotent, acks=all);
    writes are acknowledged by `flush()`, which the runner calls before committing the source offsets."""

    def __init__(self, kafka: Kafka, topics: TopicResolver, settings: RunnerSettings) -> None:
        self.kafka = kafka
        self.topics = topics
        self.settings = settings
        self._producer: Producer | None = None

    @property
    def topic(self) -> str:
        """The physical dead-letter topic (header `destination` says whose)."""
        return self.topics.name(self.settings.dead_letter_topic)

    async def start(self) -> None:
        self._producer = Producer(client_config(self.kafka, {"acks": "all", "enable.idempotence": True,
                                                             "linger.ms": 5, **self.settings.producer_config}))
        if self.settings.create_dead_letter_topic:
            await asyncio.to_thread(self._create_topic)

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Until Kafka has acknowledged every dead letter written so far."""
        assert self._producer is not None
        remaining = await asyncio.to_thread(self._producer.flush, timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} dead-letter message(s) unacknowledged", retryable=True)

    async def close(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, 10.0)

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, name: str, payloads: list[Payload], reason: str) -> None:
        """Dead-letter `name`'s mapped payloads (JSON, keyed by profile) with the reason in a header."""
        headers: Headers = [("destination", name.encode()), ("reason", reason.encode()),
                            ("time_ms", str(int(time.time() * 1000)).encode())]
        for p in payloads:
            value = json.dumps(p.to_dict(), separators=(",", ":")).encode("utf-8")
            await self._produce(p.profile_id.encode("utf-8"), value, headers)
        metrics.DESTINATION_DEAD_LETTERS.labels(name).inc(len(payloads))
        if payloads:
            log.warning("destination %s: %d payload(s) dead-lettered: %s", name, len(payloads), reason)

    async def write_raw(self, name: str, m: Message, reason: str) -> None:
        """Dead-letter a source message that did not decode, as it came, with where it came from."""
        headers: Headers = [
            ("destination", name.encode()), ("reason", reason.encode()),
            ("source_topic", (m.topic() or "").encode()), ("source_partition", str(m.partition()).encode()),
            ("source_offset", str(m.offset()).encode())]
        await self._produce(m.key(), m.value() or b"", headers)
        metrics.DESTINATION_DEAD_LETTERS.labels(name).inc()
        log.warning("destination %s: undecodable message dead-lettered: %s", name, reason)

    async def _produce(self, key: bytes | str | None, value: bytes, headers: Headers) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(self.topic, key=key, value=value, headers=headers)
                self._producer.poll(0)
                return
            except BufferError:
                await asyncio.to_thread(self._producer.poll, 0.1)

    def _create_topic(self) -> None:
        """Create the dead-letter topic as topics.yaml declares it, if `topics apply` has not (tests, dev)."""
        admin = AdminClient(client_config(self.kafka))
        topic = self.topic
        if topic in admin.list_topics(timeout=10).topics:
            return
        if isinstance(self.topics, TopicRegistry):
            declared = self.topics[self.settings.dead_letter_topic]
        else:  # a resolver of the tests' own: the declaration (durability) as the environment configures it
            from pipeline.settings import load_topics

            declared = load_topics()[self.settings.dead_letter_topic]
        new = NewTopic(topic, num_partitions=declared.partitions, replication_factor=declared.replication_factor,
                       config=declared.config())
        for fut in admin.create_topics([new]).values():
            try:
                fut.result(timeout=30)
            except Exception as exc:  # created concurrently by another runner: fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise DeliveryError(f"cannot create dead-letter topic {topic}: {exc}",
                                        retryable=True) from exc

    # -- redrive and depth -----------------------------------------------------------------------

    def _redrive_consumer(self, name: str) -> Consumer:
        return Consumer(client_config(self.kafka, {"group.id": f"cdp-dest-{name}-redrive", "enable.auto.commit": False,
                                                   "auto.offset.reset": "earliest",
                                                   **self.settings.consumer_config}))

    async def redrive(self, name: str, deliver: Callable[[list[Payload]], Awaitable[None]]) -> tuple[int, int]:
        """Hand `name`'s dead letters up to the topic's current end to `deliver`; returns (payloads handed
        over, raw dead letters skipped: their source did not decode, nothing to re-deliver).

        1. Snapshot the end offsets, so payloads that fail again (and are dead-lettered anew) are not
           read again in this same redrive.
        2. Read from the redrive group's committed offsets (`cdp-dest-<name>-redrive`), keeping only
           messages whose `destination` header is `name`.
        3. `deliver` each chunk (the runner delivers and flushes it: failures come back here).
        4. Commit the redrive group's offsets after each chunk: how far the scan has read, never past the end
           of step 1 (a dead letter written later, fetched in the same consume, is left for the next redrive).
        """
        consumer = self._redrive_consumer(name)
        try:
            count = raw_count = 0
            async for payloads, raw, read in self._scan(consumer, name):
                raw_count += raw
                if payloads:
                    await deliver(payloads)
                    count += len(payloads)
                if read:
                    await asyncio.to_thread(consumer.commit, offsets=read, asynchronous=False)
            return count, raw_count
        finally:
            await asyncio.to_thread(consumer.close)

    async def depth(self, name: str) -> int | None:
        """Dead letters of `name` not yet redriven. The topic is shared, so this scans the unredriven
        range (small in a healthy system) without committing anything."""
        consumer = self._redrive_consumer(name)
        try:
            depth = 0
            async for chunk, raw, _ in self._scan(consumer, name):
                depth += len(chunk) + raw
            return depth
        except Exception:
            log.exception("destination %s: cannot measure the dead-letter depth", name)
            return None
        finally:
            await asyncio.to_thread(consumer.close)

    async def _scan(self, consumer: Consumer,
                    name: str) -> AsyncIterator[tuple[list[Payload], int, list[TopicPartition]]]:
        """Yield, per consumed chunk, `name`'s dead letters between the committed offsets and the end
        offsets taken at the start (`kafka_reads.read_chunks`): (decodable payloads, count of raw ones whose
        source did not decode, how far the scan has read: the offsets to commit once they are handled). A
        chunk may be empty when it held only other destinations' dead letters; the last one always is (the
        end, which may lie past transaction markers)."""
        topic = self.topic
        ends, starts = await asyncio.to_thread(bounds, consumer, topic)
        chunks = read_chunks(consumer, topic, starts, ends, chunk_size=self.settings.max_poll_records)
        try:
            while (msgs := await asyncio.to_thread(next, chunks, None)) is not None:
                payloads: list[Payload] = []
                raw = 0
                for m in msgs:
                    if _header(m, "destination") != name:
                        continue
                    try:
                        payloads.append(Payload.from_dict(json.loads(m.value() or b"")))
                    except (ValueError, KeyError, TypeError):
                        raw += 1  # a raw dead letter (its source message did not decode): nothing to re-deliver
                yield payloads, raw, read_positions(consumer, topic, starts, ends)
        except ReadTimeout as exc:
            raise DeliveryError(f"dead-letter scan of {name}: {exc}", retryable=True) from exc
        yield [], 0, read_positions(consumer, topic, starts, ends)


def _header(m: Message, key: str) -> str | None:
    raw: Any = m.headers() or []
    for k, v in (raw.items() if isinstance(raw, dict) else raw):
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None
