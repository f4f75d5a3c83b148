"""Runs every destination: one Kafka consumer group each; consume, map, deliver, commit (at-least-once).

Its parts, one job each: `lane.py` (settings and per-destination state), `deadletters.py` (dead letters,
redrive, depth), `status.py` (counters and lag), `backfill.py` (current members of newly mapped audiences).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

import pipeline.destinations.status as status_
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
from pipeline.destinations.deadletters import DeadLetters
from pipeline.destinations.lane import Decoder, Lane, LogicalTopics, RunnerSettings, group_id, json_decoder
from pipeline.destinations.mapping import SKIP_CONSENT_UNKNOWN, Skip, map_message
from pipeline.destinations.receipts import Receipts
from pipeline.destinations.status import DestinationStatus
from pipeline.errors import DeliveryError, UnknownNameError
from pipeline.observability import metrics
from pipeline.observability.kafka_stats import LibrdkafkaStats

if TYPE_CHECKING:
    from pipeline.destinations.backfill import Backfill

log = logging.getLogger(__name__)


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
        self._lanes: dict[str, Lane] = {}
        self.dead_letters = DeadLetters(kafka, self.topics, self.settings)
        self.receipts = Receipts(kafka, self.topics, self.settings)
        self._stopping = asyncio.Event()
        self._logical = {
            self.topics.name(self.settings.membership_topic): self.settings.membership_topic,
            self.topics.name(self.settings.profile_change_topic): self.settings.profile_change_topic,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, *, consume: bool = True) -> None:
        """1. Create the dead-letter and receipt producers (and the dead-letter topic). 2. Build and start every
        destination.
        3. Backfill newly mapped audiences (if a Backfill is given), before any streaming, so the
           stream's later changes arrive after the backfilled state.
        4. Subscribe one consumer per destination and start its loop.

        `consume=False` stops after step 2: destinations usable for `redrive()` or exports only."""
        await self.dead_letters.start()
        await self.receipts.start()
        for cfg in self._configs:
            ctx = DestinationContext(dead_letter=self._dead_letter_sink(cfg.name),
                                     kafka=self.kafka, topics=self.topics)
            dest = create_destination(cfg, ctx)
            await dest.start()
            self._lanes[cfg.name] = Lane(cfg, dest, last_commit=time.monotonic())
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
        consumers and the dead-letter and receipt producers."""
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
        await self.dead_letters.close()
        await self.receipts.close()

    @staticmethod
    def _on_assign(lane: Lane) -> Callable[[Any, list[TopicPartition]], None]:
        def on_assign(_: Any, partitions: list[TopicPartition]) -> None:
            lane.joined = True
        return on_assign

    def not_ready(self) -> dict[str, str]:
        """Why the runner cannot deliver now (reason -> detail; empty: ready): a destination whose consumer
        has not joined its group yet, or whose loop ended. GET /readyz of `destinations run` reads it."""
        out: dict[str, str] = {}
        for name, lane in sorted(self._lanes.items()):
            if not lane.running:
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

    def _lane(self, name: str) -> Lane:
        if name not in self._lanes:
            raise UnknownNameError("destination", name, list(self._lanes))
        return self._lanes[name]

    # -- the loop --------------------------------------------------------------------------------

    async def _run_lane(self, lane: Lane) -> None:
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

    async def _map(self, lane: Lane, m: Message) -> list[Payload]:
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
            await self.dead_letters.write_raw(lane.config.name, m, f"decode_error:{type(exc).__name__}")
            lane.dead_lettered += 1
            return []
        if isinstance(result, Skip):
            lane.skipped[result.reason] += 1
            metrics.DESTINATION_SKIPS.labels(lane.config.name, result.reason).inc()
            if result.reason == SKIP_CONSENT_UNKNOWN:
                metrics.DESTINATION_CONSENT_UNKNOWN.labels(lane.config.name).inc()
            return []
        return result

    async def _deliver(self, lane: Lane, payloads: list[Payload]) -> None:
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

    async def _commit(self, lane: Lane) -> None:
        """Commit what was consumed, after it is safe.

        1. flush() the destination: everything delivered is now delivered or dead-lettered.
           On a retryable error re-deliver the uncommitted payloads and flush again (duplicates are
           fine, they carry idempotency keys); when attempts run out or it is not retryable,
           dead-letter the uncommitted payloads.
        2. Publish the receipts of the delivered membership payloads (receipts.py) and flush the dead-letter
           producer, so dead-lettered payloads are acknowledged by Kafka; wait a while for the receipts, never
           failing for them.
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
        published = self.receipts.publish(lane.config.name, lane.uncommitted)
        await self.dead_letters.flush()
        if published:
            await self.receipts.flush()
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

    # -- dead letters, redrive (deadletters.py) --------------------------------------------------

    @property
    def dead_letter_topic(self) -> str:
        """The physical dead-letter topic (shared by all destinations; header `destination` says whose)."""
        return self.dead_letters.topic

    def _dead_letter_sink(self, name: str) -> Callable[[list[Payload], str], Any]:
        async def sink(payloads: list[Payload], reason: str) -> None:
            await self._dead_letter(self._lanes[name], payloads, reason)
        return sink

    async def _dead_letter(self, lane: Lane, payloads: list[Payload], reason: str) -> None:
        await self.dead_letters.write(lane.config.name, payloads, reason)
        lane.dead_lettered += len(payloads)
        # Dead-lettered payloads are settled: they must not be re-delivered or counted again.
        dead = {id(p) for p in payloads}
        lane.uncommitted = [p for p in lane.uncommitted if id(p) not in dead]

    async def redrive(self, name: str) -> int:
        """Re-deliver `name`'s dead letters up to the topic's current end through the normal path (delivered
        and flushed under the lane's lock; failures go back to the dead-letter topic); returns how many."""
        lane = self._lane(name)
        count, raw = await self.dead_letters.redrive(name, lambda payloads: self.deliver_and_flush(name, payloads))
        if raw:
            lane.errors["redrive_undecodable"] += raw
        return count

    # -- status (status.py) ----------------------------------------------------------------------

    def local_stats(self) -> dict[str, dict[str, Any]]:
        """This process's counters per destination (no Kafka calls): what `status` cannot read from
        Kafka (last delivery, errors, breaker). `destinations run` publishes it for the CLI."""
        return {name: status_.local_row(lane) for name, lane in self._lanes.items()}

    async def kafka_status(self, name: str) -> tuple[int | None, int | None]:
        """(lag, dead-letter depth) of a configured destination, read from Kafka only: works from any
        process, whether or not this runner was started."""
        lag = await asyncio.to_thread(status_.lag, self.kafka, name, list(self._logical))
        return lag, await self.dead_letters.depth(name)

    async def status(self) -> dict[str, DestinationStatus]:
        """Per destination: lag, last delivery time, error counts, dead-letter depth, breaker state."""
        out: dict[str, DestinationStatus] = {}
        for name, lane in self._lanes.items():
            lag, depth = await self.kafka_status(name)
            out[name] = status_.destination_status(lane, lag, depth)
        return out


def reason_label(err: Exception) -> str:
    """A low-cardinality metric label from a DeliveryError message ("http_503", "timeout", ...)."""
    head = str(err).split(":", 1)[0].strip()
    return head if re.fullmatch(r"[a-z][a-z0-9_]{0,39}", head) else "other"

