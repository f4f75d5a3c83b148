"""The stage topics (identity, profile ops) consumed with librdkafka, on exactly the partitions whose tables Faust holds here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from pipeline.connection import client_config
from pipeline.errors import PipelineError
from pipeline.observability import metrics
from pipeline.observability.kafka_stats import LibrdkafkaStats
from pipeline.runtime import BATCH_MAX, Runtime
from pipeline.stages import messages
from pipeline.stages.delivery import LocalItem

log = logging.getLogger(__name__)

# What a stage does with a batch of its messages, in their partitions' order: returns how many of `items` it
# handled (all of them, unless it stopped early because the worker started rebalancing: the rest is not
# committed and is handled again by the partition's next owner).
StageHandler = Callable[[list[LocalItem]], Awaitable[int]]

COMMIT_INTERVAL_S = 1.0
# A release (Faust's revocation waits for it) commits nothing if the output is not acknowledged by then: the
# partitions' next owner handles those messages again rather than the whole group waiting on this worker.
RELEASE_FLUSH_S = 60.0
IDLE_SLEEP_S = 0.005
# fetched ahead outside Python, per partition: a worker behind holds this much (counted in its memory bound)
PREFETCH_KBYTES = 16 * 1024
PREFETCH_RECORDS = 10_000


def stages_group(app_id: str) -> str:
    """The group whose committed offsets say where each stage partition's next owner starts: `<app id>-stages`.
    It has no members (its consumers are assigned partitions explicitly), so it never rebalances."""
    return f"{app_id}-stages"


@dataclass(frozen=True)
class Stage:
    """One stage: its logical topic, the partitions of the table co-partitioned with it that Faust assigned here
    (`PartitionedTable.active`), its handler."""

    topic: str
    active: Callable[[], frozenset[int]]
    handle: StageHandler


class StageConsumer:
    """Consumes the stage topics with one librdkafka consumer, outside Faust's.

    Why: a stage message that crosses workers (or, for identity messages, any: they always go through Kafka)
    cost ~0.6 ms of worker CPU through Faust's consumer (aiokafka's fetcher in Python, a thread hand-off, an
    event and an ack per message), ~0.2 ms through this one (measured: bench/README.md, 2026-12-07 evening);
    librdkafka fetches and decompresses record batches in its own threads, as it does for ingest.

    Which partitions: partition p of a stage topic is consumed here while partition p of its table is actively
    assigned here and recovered. Faust still owns the assignment: its group holds the tables' changelogs, which
    are co-partitioned with the stage topics, so the identity and profile partitions p go to one worker as before.

    Each turn of `run`:
    1. while Faust rebalances or recovers tables: release everything (below) and wait;
    2. when the tables' active partitions changed: release the partitions no longer held, and assign the new
       ones at the offsets committed by `<app id>-stages` (the first time, where Faust's own group had got to
       when it consumed them; else the earliest);
    3. take up to BATCH_MAX messages without blocking, decode them (one that is not a stage message is
       dead-lettered) and hand each topic's run to its stage, in order;
    4. every COMMIT_INTERVAL_S, beside the loop: wait until the output producer has acknowledged everything
       produced so far (the stages' output and their tables' changelog records), then commit the next
       offsets handled by then.
    Release (a rebalance starting, the worker stopping), under the same lock as a turn, so never in the middle
    of one: 1. flush the output; 2. commit what was handled, synchronously; 3. unassign. Faust awaits it in its
    revocation (`on_partitions_revoked`), so the group's next generation, and the partitions' next owners,
    start after the commit. If the flush or the commit fails (the broker is away), nothing is committed and
    the next owner handles those messages again: at-least-once, as the stages' protocol expects."""

    def __init__(self, rt: Runtime, stages: list[Stage]) -> None:
        self.rt = rt
        self.stages = {rt.registry.name(s.topic): s for s in stages}
        self.group = stages_group(rt.settings.app_id)
        self.lock = asyncio.Lock()
        self.assigned: frozenset[tuple[str, int]] = frozenset()
        self.done: dict[tuple[str, int], int] = {}  # next offset to commit, per partition handled since the last commit
        self._consumer: Any = None
        self._last_commit = time.monotonic()
        self._committing: asyncio.Future[None] | None = None  # step 4 of `run`, while its flush waits
        self._stats = LibrdkafkaStats(f"{rt.settings.worker_name}-stages", self.group)
        self._commit_seconds = metrics.COMMIT_SECONDS.labels(self.group)
        self._sent: list[float] = []  # when each asynchronous commit still unanswered was sent

    # -- the consumer -------------------------------------------------------------------------------------------

    def consumer(self) -> Any:
        if self._consumer is None:
            self._consumer = Consumer(client_config(self.rt.settings.kafka, {
                "group.id": self.group, "client.id": f"{self.rt.settings.worker_name}-stages",
                "enable.auto.commit": False, "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest", "enable.partition.eof": False,
                # a fetch is answered as soon as any of its partitions has a message (fetch.min.bytes 1), so a
                # long wait costs no latency and spares the broker requests while the stages are idle
                "fetch.wait.max.ms": 100,
                "queued.max.messages.kbytes": PREFETCH_KBYTES, "queued.min.messages": PREFETCH_RECORDS,
                **self._stats.config(self.rt.settings.kafka_stats_interval_ms), "on_commit": self._committed,
            }, error_cb=self.rt.kafka.error_cb if self.rt.kafka else None))
        return self._consumer

    def wanted(self) -> frozenset[tuple[str, int]]:
        """The stage partitions this worker should consume now: its tables' active partitions, once recovered."""
        app = self.rt.app
        if app.rebalancing or not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            return frozenset()
        return frozenset((name, p) for name, s in self.stages.items() for p in s.active())

    # -- assignment ---------------------------------------------------------------------------------------------

    async def _assign(self, new: frozenset[tuple[str, int]]) -> None:
        """Start consuming `new` from the offsets committed for them (step 2 of `run`)."""
        if not new:
            return
        tps = [TopicPartition(t, p) for t, p in sorted(new)]
        starts = await asyncio.to_thread(self._starting_offsets, tps)
        self.consumer().incremental_assign(starts)
        self.assigned |= new
        log.info("stage partitions assigned: %s",
                 ", ".join(f"{self.stages[tp.topic].topic}[{tp.partition}]@{tp.offset}" for tp in starts))

    def _starting_offsets(self, tps: list[Any]) -> list[Any]:
        """The offsets committed by the stages group. A partition it has never committed starts where Faust's
        group had got to (it consumed the stage topics before this consumer existed), else at 0 (the
        beginning: `auto.offset.reset` moves it up if retention removed that), and that start is committed
        at once, so that the group's offsets cover every partition (its lag is measured from them)."""
        committed = self.consumer().committed(tps, timeout=30)
        missing = [TopicPartition(tp.topic, tp.partition) for tp in committed if tp.offset < 0]
        if missing:
            earlier = Consumer(client_config(self.rt.settings.kafka, {
                "group.id": self.rt.settings.app_id, "enable.auto.commit": False}))
            try:
                before = {(tp.topic, tp.partition): tp.offset for tp in earlier.committed(missing, timeout=30)}
            finally:
                earlier.close()
            first = []
            for tp in committed:
                if tp.offset < 0:
                    tp.offset = max(0, before.get((tp.topic, tp.partition), 0))
                    first.append(TopicPartition(tp.topic, tp.partition, tp.offset))
            self.consumer().commit(offsets=first, asynchronous=False)
        return committed

    async def release(self, keep: frozenset[tuple[str, int]] = frozenset()) -> None:
        """Stop consuming every assigned partition not in `keep`: 1. flush the output; 2. commit their offsets
        synchronously; 3. unassign them. Call it holding `lock` (no turn is in progress)."""
        gone = self.assigned - keep
        if not gone:
            return
        if self._committing is not None:  # (its offsets are still in `done`: committed below, or not at all)
            self._committing.cancel()
            self._committing = None
        await self._flush_and_commit(gone)
        for k in gone:
            self.done.pop(k, None)
        self.consumer().incremental_unassign([TopicPartition(t, p) for t, p in sorted(gone)])
        self.assigned -= gone
        for t, p in gone:
            self.rt.stage_backlog.forget(t, p)
        log.info("stage partitions released: %s", ", ".join(f"{self.stages[t].topic}[{p}]" for t, p in sorted(gone)))

    async def on_revoked(self) -> None:
        """Faust's revocation (awaited by it before the group moves on): release everything once the current
        turn is over."""
        async with self.lock:
            await self.release()

    # -- commits ------------------------------------------------------------------------------------------------

    async def _flush_and_commit(self, only: frozenset[tuple[str, int]] | None = None) -> None:
        offsets = {k: v for k, v in self.done.items() if only is None or k in only}
        if not offsets:
            return
        if self.rt.kafka is not None and self.rt.kafka.unreachable:
            log.warning("stage offsets not committed (Kafka is unreachable): those messages are handled again")
            return
        try:
            await self.rt.output.flush(timeout_s=RELEASE_FLUSH_S)
        except PipelineError as exc:
            log.warning("stage offsets not committed (%s): those messages are handled again", exc)
            return
        await self._commit(offsets, wait=True)

    def _committed(self, err: Any, partitions: Any) -> None:
        """An asynchronous commit's answer (served by `consume`): timed; what it committed leaves `done`,
        what was refused stays for the next interval."""
        if self._sent:
            self._commit_seconds.observe(time.monotonic() - self._sent.pop(0))
        if err is not None:
            log.info("stage offsets not committed (%s); retrying at the next interval", err)
            return
        for tp in partitions:
            k = (tp.topic, tp.partition)
            if tp.error is None and self.done.get(k) == tp.offset:
                del self.done[k]

    async def _commit(self, offsets: dict[tuple[str, int], int], wait: bool) -> None:
        """Commit `offsets` (their output acknowledged); what is committed leaves `done` (here when `wait`,
        else in `_committed`)."""
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        started = time.monotonic()
        try:
            if wait:
                await asyncio.to_thread(self.consumer().commit, offsets=tps, asynchronous=False)
            else:
                self._sent.append(started)
                self.consumer().commit(offsets=tps, asynchronous=True)
        except KafkaException as exc:
            log.info("stage offsets not committed yet (%s); retrying at the next interval", exc.args[0])
            return
        if not wait:
            return
        self._commit_seconds.observe(time.monotonic() - started)
        for k, v in offsets.items():
            if self.done.get(k) == v:
                del self.done[k]

    # -- the loop -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The loop (a Faust task): see the class docstring for its steps."""
        try:
            while True:
                async with self.lock:
                    took = await self._turn()
                await asyncio.sleep(0 if took else IDLE_SLEEP_S)
        except asyncio.CancelledError:  # the worker stops: what was handled is committed once its output is acked
            if self._committing is not None:
                self._committing.cancel()
            async with self.lock:
                try:
                    await asyncio.shield(self._flush_and_commit())
                finally:
                    self.close()
            raise

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    async def _turn(self) -> int:
        """One turn of `run` (steps 1-4); returns how many messages it took."""
        want = self.wanted()
        if want != self.assigned:
            await self.release(keep=want)  # (1, and the partitions no longer held)
            await self._assign(want - self.assigned)  # (2)
        took = 0
        if self.assigned:
            msgs = self.consumer().consume(BATCH_MAX, 0)  # (3)
            took = len(msgs)
            if msgs:
                await self._handle(msgs)
        if self.done and time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S and (
                self._committing is None or self._committing.done()):  # (4)
            self._last_commit = time.monotonic()
            self._committing = asyncio.ensure_future(self._commit_when_flushed(dict(self.done)))
        return took

    async def _commit_when_flushed(self, offsets: dict[tuple[str, int], int]) -> None:
        """Step 4, beside the loop (which goes on taking messages: a flush can wait for the broker as long as
        it is away): once everything produced so far, so everything handling `offsets` produced, is
        acknowledged, commit them."""
        try:
            await self.rt.output.flush()
        except PipelineError as exc:  # (the worker is stopping and the broker is away: committed by no one)
            log.warning("stage offsets not committed (%s): those messages are handled again", exc)
            return
        await self._commit(offsets, wait=False)

    async def _handle(self, msgs: list[Any]) -> None:
        """Decode a batch and hand each topic's messages to its stage; note what was handled and the backlog."""
        runs: dict[str, list[Any]] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("stage consumer: %s", err)
                continue
            runs.setdefault(m.topic(), []).append(m)
        for name, run in runs.items():
            if self.rt.app.rebalancing:  # the rest is handled by the partitions' next owner (or here, again)
                return
            stage = self.stages[name]
            items: list[LocalItem] = []
            order: list[tuple[Any, bool]] = []  # each message, and whether it is one of `items`
            for m in run:
                key = m.key() or b""
                try:
                    items.append((m.partition(), key, messages.decode(m.value())))
                    order.append((m, True))
                except Exception as exc:  # noqa: BLE001 - msgspec's DecodeError / ValidationError
                    self.rt.dead_letter_stage(stage.topic, key, m.value(), exc)
                    order.append((m, False))
            handled = await stage.handle(items) if items else 0
            # the next offset of each partition: after the last message handled, in order (a message
            # dead-lettered as undecodable is handled, in its place); none after the first one not handled
            for m, is_item in order:
                if is_item:
                    if handled == 0:
                        break
                    handled -= 1
                if (name, m.partition()) in self.assigned:
                    self.done[(name, m.partition())] = m.offset() + 1
            self._note_backlog(name, run)

    def _note_backlog(self, name: str, run: list[Any]) -> None:
        """How far behind each partition of the run is now (the brake on ingest reads it)."""
        last: dict[int, int] = {}
        for m in run:
            last[m.partition()] = m.offset()
        for p, offset in last.items():
            try:
                _, high = self.consumer().get_watermark_offsets(TopicPartition(name, p), cached=True)
            except KafkaException:
                continue
            if high is not None and high >= 0:
                self.rt.stage_backlog.note(name, p, high - offset - 1)
