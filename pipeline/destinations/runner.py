"""Runs every destination: one Kafka consumer group each, map, deliver, commit (at-least-once), DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.backoff import full_jitter_s
from pipeline.connection import Kafka, client_config
from pipeline.destinations.base import (
    Destination,
    DestinationContext,
    Payload,
    TopicResolver,
    create_destination,
)
from pipeline.destinations.config import DestinationConfig
from pipeline.destinations.mapping import SKIP_CONSENT_UNKNOWN, Skip, map_message
from pipeline.errors import DeliveryError, UnknownNameError
from pipeline.observability import metrics
from pipeline.observability.kafka_stats import STATS_INTERVAL_MS, LibrdkafkaStats
from pipeline.topics import TopicRegistry, registry

if TYPE_CHECKING:
    from pipeline.destinations.backfill import Backfill

log = logging.getLogger(__name__)

# (logical topic name, message value bytes) -> the message as a dict. The lead wires the Avro serde in;
# `json_decoder` is the stand-in for tests and JSON topics.
Decoder = Callable[[str, bytes], dict[str, Any]]


def json_decoder(logical_topic: str, value: bytes) -> dict[str, Any]:
    """Decode a JSON message value (any topic)."""
    result = json.loads(value)
    if not isinstance(result, dict):
        raise ValueError(f"{logical_topic}: expected a JSON object")
    return result


class LogicalTopics:
    """A TopicResolver that uses logical names as physical names (tests, single-cluster dev)."""

    def name(self, logical: str) -> str:
        return logical


@dataclass(frozen=True)
class RunnerSettings:
    """Topics and tuning of the runner; topic names are logical (resolved by the TopicResolver)."""

    membership_topic: str = "activation.memberships"
    profile_change_topic: str = "activation.profile-changes"
    # Logical dead-letter topic shared by every destination; the `destination` header says whose.
    dead_letter_topic: str = "activation.dest-dlq"
    create_dead_letter_topic: bool = True
    max_poll_records: int = 500
    poll_timeout_s: float = 0.2
    commit_interval_ms: int = 1000
    # For destinations whose deliver()/flush() raise retryable DeliveryErrors (kafka, file):
    deliver_max_attempts: int = 5
    retry_base_delay_ms: int = 200
    retry_max_delay_ms: int = 5000
    stop_timeout_s: float = 30.0  # final flush per destination; past it, uncommitted messages are re-read
    stats_interval_ms: int = STATS_INTERVAL_MS  # librdkafka statistics: lag per partition, broker rtt
    consumer_config: dict[str, Any] = field(default_factory=dict)
    producer_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DestinationStatus:
    """One destination's health as `status()` reports it."""

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


@dataclass
class _Lane:
    """Mutable per-destination state of the runner."""

    config: DestinationConfig
    destination: Destination
    consumer: Consumer | None = None
    task: asyncio.Task[None] | None = None
    uncommitted: list[Payload] = field(default_factory=list)  # delivered since the last commit
    dirty: bool = False  # consumed something since the last commit
    last_commit: float = 0.0
    consumed: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    joined: bool = False  # the consumer has had its first assignment (possibly empty)
    last_delivery_ms: int | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # Held for a whole consume-deliver-commit round, so a redrive never commits offsets of messages
    # the loop consumed but has not delivered yet.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DestinationRunner:
    """One consumer (group `cdp-dest-<name>`) per destination over the membership and profile-change
    topics. Offsets are committed only after the destination's flush() (at-least-once); payloads that
    fail for good go to that destination's dead-letter topic with the reason in headers."""

    def __init__(self, destinations: Iterable[DestinationConfig], *, kafka: Kafka,
                 topics: TopicResolver | None = None, decode: Decoder = json_decoder,
                 settings: RunnerSettings | None = None, backfill: Backfill | None = None) -> None:
        self.kafka = kafka
        # Optional: on start, deliver the current members of newly mapped audiences (see backfill.py).
        self.backfill = backfill
        self.topics: TopicResolver = topics or LogicalTopics()
        self.decode = decode
        self.settings = settings or RunnerSettings()
        self._configs = list(destinations)
        self._lanes: dict[str, _Lane] = {}
        self._producer: Producer | None = None
        self._stopping = asyncio.Event()
        self._logical = {
            self.topics.name(self.settings.membership_topic): self.settings.membership_topic,
            self.topics.name(self.settings.profile_change_topic): self.settings.profile_change_topic,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, *, consume: bool = True) -> None:
        """1. Create the dead-letter producer (and topics). 2. Build and start every destination.
        3. Backfill newly mapped audiences (if a Backfill is given), before any streaming, so the
           stream's later changes arrive after the backfilled state.
        4. Subscribe one consumer per destination and start its loop.

        `consume=False` stops after step 2: destinations usable for `redrive()` or exports only."""
        self._producer = Producer(client_config(self.kafka, {"acks": "all", "enable.idempotence": True, "linger.ms": 5,
                                                             **self.settings.producer_config}))
        if self.settings.create_dead_letter_topic:
            await asyncio.to_thread(self._create_dead_letter_topic)
        for cfg in self._configs:
            ctx = DestinationContext(dead_letter=self._dead_letter_sink(cfg.name),
                                     kafka=self.kafka, topics=self.topics)
            dest = create_destination(cfg, ctx)
            await dest.start()
            self._lanes[cfg.name] = _Lane(cfg, dest, last_commit=time.monotonic())
            log.info("destination %s (%s): started", cfg.name, cfg.kind)
        if not consume:
            return
        if self.backfill is not None:
            await self.backfill.run(self)
        for lane in self._lanes.values():
            cfg = lane.config
            lane.consumer = Consumer(client_config(self.kafka, {
                "group.id": group_id(cfg.name),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                **LibrdkafkaStats(group_id(cfg.name), group_id(cfg.name)).config(self.settings.stats_interval_ms),
                **self.settings.consumer_config,
            }))
            lane.consumer.subscribe(list(self._logical), on_assign=self._on_assign(lane))
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"dest-lane-{cfg.name}")

    async def stop(self) -> None:
        """1. Stop the loops. 2. Final flush + commit per destination. 3. Close destinations,
        consumers and the dead-letter producer."""
        self._stopping.set()
        for lane in self._lanes.values():
            if lane.task is not None:
                # A loop blocked on a dead destination (backpressure) is cancelled after the timeout.
                done, _ = await asyncio.wait({lane.task}, timeout=self.settings.stop_timeout_s)
                if not done:
                    lane.task.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await lane.task
            try:
                await asyncio.wait_for(self._commit(lane), timeout=self.settings.stop_timeout_s)
            except Exception:
                log.exception("destination %s: final commit failed (messages will be re-delivered)",
                              lane.config.name)
            with contextlib.suppress(Exception):
                await lane.destination.close()
            if lane.consumer is not None:
                await asyncio.to_thread(lane.consumer.close)
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, 10.0)

    @staticmethod
    def _on_assign(lane: _Lane) -> Callable[[Any, list[TopicPartition]], None]:
        def on_assign(_: Any, partitions: list[TopicPartition]) -> None:
            lane.joined = True
        return on_assign

    def not_ready(self) -> dict[str, str]:
        """Why the runner cannot deliver now (reason -> detail; empty: ready): a destination whose consumer
        has not joined its group yet, or whose loop ended. GET /readyz of `destinations run` reads it."""
        out: dict[str, str] = {}
        for name, lane in sorted(self._lanes.items()):
            if lane.task is None or lane.task.done():
                out[f"destination {name}"] = "not consuming"
            elif not lane.joined:
                out[f"destination {name}"] = f"joining consumer group {group_id(name)}"
        return out

    def destination(self, name: str) -> Destination:
        return self._lane(name).destination

    def configs(self) -> list[DestinationConfig]:
        return list(self._configs)

    def record_skips(self, name: str, skips: Counter[str]) -> None:
        self._lane(name).skipped.update(skips)

    async def deliver_and_flush(self, name: str, payloads: list[Payload]) -> None:
        """Deliver payloads that do not come from the lane's consumer (backfills), then flush: on
        return they are delivered or dead-lettered. Holds the lane's lock like a consume round."""
        lane = self._lane(name)
        async with lane.lock:
            chunk = self.settings.max_poll_records
            for i in range(0, len(payloads), chunk):
                await self._deliver(lane, payloads[i:i + chunk])
            await self._commit(lane)

    def _lane(self, name: str) -> _Lane:
        if name not in self._lanes:
            raise UnknownNameError("destination", name, list(self._lanes))
        return self._lanes[name]

    # -- the loop --------------------------------------------------------------------------------

    async def _run_lane(self, lane: _Lane) -> None:
        assert lane.consumer is not None
        consumer = lane.consumer
        while not self._stopping.is_set():
            try:
                async with lane.lock:
                    msgs = await asyncio.to_thread(consumer.consume, self.settings.max_poll_records,
                                                   self.settings.poll_timeout_s)
                    payloads: list[Payload] = []
                    for m in msgs:
                        payloads.extend(await self._map(lane, m))
                    if payloads:
                        await self._deliver(lane, payloads)
                    due = (time.monotonic() - lane.last_commit) * 1000 >= self.settings.commit_interval_ms
                    if lane.dirty and (due or not msgs):
                        await self._commit(lane)
                # Let a waiting redrive take the lock between rounds.
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Keep the lane alive: uncommitted messages are re-read after a restart at worst.
                lane.errors[f"loop:{type(exc).__name__}"] += 1
                log.exception("destination %s: loop error", lane.config.name)
                await asyncio.sleep(1.0)

    async def _map(self, lane: _Lane, m: Message) -> list[Payload]:
        err = m.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                lane.errors["consume"] += 1
            return []
        lane.consumed += 1
        lane.dirty = True
        logical = self._logical.get(m.topic() or "", m.topic() or "")
        try:
            msg = self.decode(logical, m.value() or b"")
            result = map_message(msg, lane.config)
        except Exception as exc:
            lane.errors["decode"] += 1
            await self._produce_raw_dead_letter(lane, m, f"decode_error:{type(exc).__name__}")
            return []
        if isinstance(result, Skip):
            lane.skipped[result.reason] += 1
            metrics.DESTINATION_SKIPS.labels(lane.config.name, result.reason).inc()
            if result.reason == SKIP_CONSENT_UNKNOWN:
                metrics.DESTINATION_CONSENT_UNKNOWN.labels(lane.config.name).inc()
            return []
        return result

    async def _deliver(self, lane: _Lane, payloads: list[Payload]) -> None:
        """Hand payloads to the destination, retrying retryable errors with backoff, else DLQ."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await lane.destination.deliver(payloads)
                lane.uncommitted.extend(payloads)
                return
            except DeliveryError as err:
                lane.errors[f"deliver:{err}"[:80]] += 1
                metrics.DESTINATION_FAILURES.labels(lane.config.name, reason_label(err)).inc()
                if not err.retryable or attempt >= self.settings.deliver_max_attempts:
                    reason = str(err) if not err.retryable else f"retries_exhausted:{err}"
                    await self._dead_letter(lane, payloads, reason)
                    return
                await asyncio.sleep(self._backoff(attempt, err.retry_after_s))

    async def _commit(self, lane: _Lane) -> None:
        """Commit what was consumed, after it is safe.

        1. flush() the destination: everything delivered is now delivered or dead-lettered.
           On a retryable error re-deliver the uncommitted payloads and flush again (duplicates are
           fine, they carry idempotency keys); when attempts run out or it is not retryable,
           dead-letter the uncommitted payloads.
        2. Flush the dead-letter producer, so dead-lettered payloads are acknowledged by Kafka.
        3. Commit the consumer's positions synchronously.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                await lane.destination.flush()
                break
            except DeliveryError as err:
                lane.errors[f"flush:{err}"[:80]] += 1
                metrics.DESTINATION_FAILURES.labels(lane.config.name, reason_label(err)).inc()
                if not err.retryable or attempt >= self.settings.deliver_max_attempts:
                    await self._dead_letter(lane, lane.uncommitted, f"flush_failed:{err}")
                    break
                await asyncio.sleep(self._backoff(attempt, err.retry_after_s))
                with contextlib.suppress(DeliveryError):
                    await lane.destination.deliver(list(lane.uncommitted))
        assert self._producer is not None
        remaining = await asyncio.to_thread(self._producer.flush, 30.0)
        if remaining:
            raise DeliveryError(f"{remaining} dead-letter message(s) unacknowledged", retryable=True)
        if lane.dirty and lane.consumer is not None:
            try:
                with metrics.COMMIT_SECONDS.labels(group_id(lane.config.name)).time():
                    await asyncio.to_thread(lane.consumer.commit, asynchronous=False)
            except Exception as exc:
                # Nothing consumed since assignment, or a rebalance: offsets get re-read, not lost.
                lane.errors["commit"] += 1
                log.warning("destination %s: commit failed: %s", lane.config.name, exc)
        if lane.uncommitted:
            lane.delivered += len(lane.uncommitted)
            metrics.DESTINATION_DELIVERIES.labels(lane.config.name).inc(len(lane.uncommitted))
            stats_ms = lane.destination.stats().get("last_delivery_ms")
            lane.last_delivery_ms = stats_ms if stats_ms else int(time.time() * 1000)
        lane.uncommitted = []
        lane.dirty = False
        lane.last_commit = time.monotonic()

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        delay = full_jitter_s(attempt, self.settings.retry_base_delay_ms, self.settings.retry_max_delay_ms)
        return max(delay, retry_after_s or 0.0)

    # -- dead letters ----------------------------------------------------------------------------

    @property
    def dead_letter_topic(self) -> str:
        """The physical dead-letter topic (shared by all destinations; header `destination` says whose)."""
        return self.topics.name(self.settings.dead_letter_topic)

    def _dead_letter_sink(self, name: str) -> Callable[[list[Payload], str], Any]:
        async def sink(payloads: list[Payload], reason: str) -> None:
            await self._dead_letter(self._lanes[name], payloads, reason)
        return sink

    async def _dead_letter(self, lane: _Lane, payloads: list[Payload], reason: str) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("destination", lane.config.name.encode()), ("reason", reason.encode()),
            ("time_ms", str(int(time.time() * 1000)).encode())]
        for p in payloads:
            value = json.dumps(p.to_dict(), separators=(",", ":")).encode("utf-8")
            await self._produce(self.dead_letter_topic, p.profile_id.encode("utf-8"), value, headers)
        lane.dead_lettered += len(payloads)
        metrics.DESTINATION_DEAD_LETTERS.labels(lane.config.name).inc(len(payloads))
        if payloads:
            log.warning("destination %s: %d payload(s) dead-lettered: %s", lane.config.name,
                        len(payloads), reason)
        # Dead-lettered payloads are settled: they must not be re-delivered or counted again.
        dead = {id(p) for p in payloads}
        lane.uncommitted = [p for p in lane.uncommitted if id(p) not in dead]

    async def _produce_raw_dead_letter(self, lane: _Lane, m: Message, reason: str) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("destination", lane.config.name.encode()), ("reason", reason.encode()),
            ("source_topic", (m.topic() or "").encode()), ("source_partition", str(m.partition()).encode()),
            ("source_offset", str(m.offset()).encode())]
        await self._produce(self.dead_letter_topic, m.key(), m.value() or b"", headers)
        lane.dead_lettered += 1
        metrics.DESTINATION_DEAD_LETTERS.labels(lane.config.name).inc()
        log.warning("destination %s: undecodable message dead-lettered: %s", lane.config.name, reason)

    async def _produce(self, topic: str, key: bytes | str | None, value: bytes,
                       headers: list[tuple[str, str | bytes | None]]) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, headers=headers)
                self._producer.poll(0)
                return
            except BufferError:
                await asyncio.to_thread(self._producer.poll, 0.1)

    def _create_dead_letter_topic(self) -> None:
        """Create the dead-letter topic as topics.yaml declares it, if `topics apply` has not (tests, dev)."""
        admin = AdminClient(client_config(self.kafka))
        topic = self.dead_letter_topic
        if topic in admin.list_topics(timeout=10).topics:
            return
        declared = (self.topics if isinstance(self.topics, TopicRegistry) else registry())[
            self.settings.dead_letter_topic]
        new = NewTopic(topic, num_partitions=declared.partitions, replication_factor=declared.replication_factor,
                       config=declared.config())
        for fut in admin.create_topics([new]).values():
            try:
                fut.result(timeout=30)
            except Exception as exc:  # created concurrently by another runner: fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise DeliveryError(f"cannot create dead-letter topic {topic}: {exc}",
                                        retryable=True) from exc

    # -- redrive ---------------------------------------------------------------------------------

    def _redrive_consumer(self, name: str) -> Consumer:
        return Consumer(client_config(self.kafka, {"group.id": f"cdp-dest-{name}-redrive", "enable.auto.commit": False,
                                                   "auto.offset.reset": "earliest",
                                                   **self.settings.consumer_config}))

    async def redrive(self, name: str) -> int:
        """Re-deliver `name`'s dead letters up to the topic's current end; returns how many.

        1. Snapshot the end offsets, so payloads that fail again (and are dead-lettered anew) are not
           read again in this same redrive.
        2. Read from the redrive group's committed offsets (`cdp-dest-<name>-redrive`), keeping only
           messages whose `destination` header is `name`.
        3. Deliver and flush through the normal path (failures go back to the dead-letter topic).
        4. Commit the redrive group's offsets.
        """
        lane = self._lane(name)
        consumer = self._redrive_consumer(name)
        try:
            count = 0
            async for payloads, raw in self._scan_dead_letters(consumer, name):
                if raw:
                    lane.errors["redrive_undecodable"] += raw
                if payloads:
                    async with lane.lock:
                        await self._deliver(lane, payloads)
                        await self._commit(lane)
                    count += len(payloads)
                await asyncio.to_thread(consumer.commit, asynchronous=False)
            return count
        finally:
            await asyncio.to_thread(consumer.close)

    async def _scan_dead_letters(self, consumer: Consumer, name: str
                                 ) -> AsyncIterator[tuple[list[Payload], int]]:
        """Yield, per consumed chunk, `name`'s dead letters between the committed offsets and the end
        offsets taken at the start: (decodable payloads, count of raw ones whose source did not decode).
        A chunk may be empty when it held only other destinations' dead letters."""
        topic = self.dead_letter_topic
        ends, starts = await asyncio.to_thread(self._bounds, consumer, topic)
        todo = {p for p in ends if starts[p] < ends[p]}
        if not todo:
            return
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
        deadline = time.monotonic() + 120.0
        while todo:
            if time.monotonic() > deadline:
                raise DeliveryError(f"dead-letter scan of {name} did not reach the end", retryable=True)
            msgs = await asyncio.to_thread(consumer.consume, self.settings.max_poll_records, 0.5)
            chunk: list[Payload] = []
            raw = 0
            for m in msgs:
                part, offset = m.partition() or 0, m.offset() or 0
                if m.error() is not None or part not in todo or offset >= ends[part]:
                    continue
                if offset + 1 >= ends[part]:
                    todo.discard(part)
                if _header(m, "destination") != name:
                    continue
                try:
                    chunk.append(Payload.from_dict(json.loads(m.value() or b"")))
                except (ValueError, KeyError, TypeError):
                    raw += 1  # a raw dead letter (its source message did not decode): nothing to re-deliver
            if msgs:
                yield chunk, raw

    def _bounds(self, consumer: Consumer, topic: str) -> tuple[dict[int, int], dict[int, int]]:
        """(end offset, start offset) per partition: start = the group's committed offset, else low."""
        md = consumer.list_topics(topic, timeout=10)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            return {}, {}
        tps = [TopicPartition(topic, p) for p in meta.partitions]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
        ends: dict[int, int] = {}
        starts: dict[int, int] = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            ends[tp.partition] = high
            c = committed.get(tp.partition, OFFSET_INVALID)
            starts[tp.partition] = max(c, low) if c is not None and c >= 0 else low
        return ends, starts

    # -- status ----------------------------------------------------------------------------------

    def local_stats(self) -> dict[str, dict[str, Any]]:
        """This process's counters per destination (no Kafka calls): what `status` cannot read from
        Kafka (last delivery, errors, breaker). `destinations run` publishes it for the CLI."""
        out: dict[str, dict[str, Any]] = {}
        for name, lane in self._lanes.items():
            stats = lane.destination.stats()
            out[name] = {
                "kind": lane.config.kind, "running": lane.task is not None and not lane.task.done(),
                "last_delivery_ms": lane.last_delivery_ms, "consumed": lane.consumed,
                "delivered": lane.delivered, "skipped": dict(lane.skipped), "errors": dict(lane.errors),
                "dead_lettered": lane.dead_lettered, "breaker": stats.get("breaker")}
        return out

    async def kafka_status(self, name: str) -> tuple[int | None, int | None]:
        """(lag, dead-letter depth) of a configured destination, read from Kafka only: works from any
        process, whether or not this runner was started."""
        lag = await asyncio.to_thread(self._lag, name)
        return lag, await self._dead_letter_depth(name)

    async def status(self) -> dict[str, DestinationStatus]:
        """Per destination: lag, last delivery time, error counts, dead-letter depth, breaker state."""
        out: dict[str, DestinationStatus] = {}
        for name, lane in self._lanes.items():
            lag = await asyncio.to_thread(self._lag, name)
            depth = await self._dead_letter_depth(name)
            stats = lane.destination.stats()
            out[name] = DestinationStatus(
                name=name, kind=lane.config.kind,
                running=lane.task is not None and not lane.task.done(),
                lag=lag, last_delivery_ms=lane.last_delivery_ms, consumed=lane.consumed,
                delivered=lane.delivered, skipped=dict(lane.skipped), errors=dict(lane.errors),
                dead_lettered=lane.dead_lettered, dead_letter_depth=depth, breaker=stats.get("breaker"))
        return out

    def _lag(self, name: str) -> int | None:
        try:
            probe = Consumer(client_config(self.kafka, {"group.id": group_id(name), "enable.auto.commit": False}))
            try:
                lag = 0
                for topic in self._logical:
                    ends, starts = self._bounds(probe, topic)
                    lag += sum(ends[p] - starts[p] for p in ends)
                return lag
            finally:
                probe.close()
        except Exception:
            log.exception("destination %s: cannot read offsets for status", name)
            return None

    async def _dead_letter_depth(self, name: str) -> int | None:
        """Dead letters of `name` not yet redriven. The topic is shared, so this scans the unredriven
        range (small in a healthy system) without committing anything."""
        consumer = self._redrive_consumer(name)
        try:
            depth = 0
            async for chunk, raw in self._scan_dead_letters(consumer, name):
                depth += len(chunk) + raw
            return depth
        except Exception:
            log.exception("destination %s: cannot measure the dead-letter depth", name)
            return None
        finally:
            await asyncio.to_thread(consumer.close)


def group_id(name: str) -> str:
    """The consumer group of a destination's lane."""
    return f"cdp-dest-{name}"


def reason_label(err: Exception) -> str:
    """A low-cardinality metric label from a DeliveryError message ("http_503", "timeout", ...)."""
    head = str(err).split(":", 1)[0].strip()
    return head if re.fullmatch(r"[a-z][a-z0-9_]{0,39}", head) else "other"


def _header(m: Message, key: str) -> str | None:
    raw: Any = m.headers() or []
    for k, v in (raw.items() if isinstance(raw, dict) else raw):
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None
