"""The worker's runtime context: the Faust app, its topics and tables, processors, and the one `send` path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faust
from confluent_kafka import KafkaError, KafkaException, Producer

from pipeline.connection import Kafka, client_config
from pipeline.errors import ConfigError, OutputRefused, PipelineError, describe, where
from pipeline.identity.stitch import in_process_allowed
from pipeline.observability import metrics
from pipeline.observability.readiness import Readiness
from pipeline.outage import KafkaWatch
from pipeline.privacy.log import ErasureLog
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.segments.follow import DefinitionsSync
from pipeline.segments.sizes import AudienceSizes
from pipeline.serde.codecs import RawCodec
from pipeline.settings import PipelineConfig, Settings
from pipeline.stages import messages
from pipeline.stages.backlog import StageBacklog
from pipeline.stages.delivery import LocalDelivery, LocalHandler, LocalItem, Target
from pipeline.stages.messages import Send
from pipeline.state.lru import BoundedCache
from pipeline.state.tables import PartitionedTable
from pipeline.topics import INTERNAL_DLQ, TopicRegistry

# What a worker's memory is bounded by, whatever its load (GET /debug/memory shows each part; the soak,
# tests/faults/test_soak.py, checks that RSS levels off):
#   ~130 MB   the process once started (interpreter, libraries, the app)
#   RocksDB   ROCKSDB_CACHE_BYTES: one block cache shared by every partition of both tables, which their
#             memtables are charged to as well (flushed once they pass ROCKSDB_MEMTABLE_BYTES in all): 64 MB
#             however many partitions the worker holds (faust's per-partition options gave each partition a
#             block cache of its own plus 2 memtables: 64 MB a partition, 512 MB for 8)
#   caches    TABLE_CACHE and DECODED_CACHE below: ~64 + 32 + 192 MB when full
#   Kafka     the output producer's queue (OUTPUT_QUEUE_KBYTES, 64 MB) and the ingest consumer's prefetched
#             records (INGEST_PREFETCH_KBYTES in pipeline.ingest.agents, 16 MB)
# ~560 MB in all, plus what a batch in progress holds and what malloc keeps free after peaks.
ROCKSDB_CACHE_BYTES = 64 << 20
ROCKSDB_MEMTABLE_BYTES = 32 << 20
ROCKSDB_OPTIONS = {
    "block_cache_size": ROCKSDB_CACHE_BYTES,  # replaced by the shared cache (faust_compat.SharedRocksDBMemory)
    "write_buffer_size": 16 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 32 * 1024 * 1024,
}
# librdkafka's default producer queue is 1 GB; a profile's changelog record carries the whole profile
OUTPUT_QUEUE_KBYTES = 64 * 1024

# What a worker keeps in memory in front of each table's RocksDB (`PartitionedTable`): (keys, bytes of
# values). An identity entry costs ~250 bytes; a profile entry shares its bytes with the decoded-profile cache.
TABLE_CACHE = {"identity": (200_000, 64 << 20), "profiles": (20_000, 32 << 20)}
# Decoded profiles (pipeline.profiles.cache.DecodedCache): (profiles, bytes). A decoded profile holds about
# DECODED_PER_BYTE times its encoded size in Python objects (measured: 6.5x for a profile of 200 events), so
# this bounds what a worker's caches hold at ~64 + 32 + 192 MB, whatever the size of its profiles.
DECODED_PER_BYTE = 7
DECODED_CACHE = (20_000, 192 << 20)

log = logging.getLogger(__name__)

# How often a flush polls for acknowledgements: every 2 ms while they come (a commit waits on it), every
# 50 ms once it has waited a second (the broker is slow or away).
FLUSH_POLL_S, FLUSH_SLOW_POLL_S = 0.002, 0.05
# A worker asked to stop while the broker is away does not wait for it for ever.
STOPPING_FLUSH_S = 30.0


class OutputProducer:
    """The agents' one producer (librdkafka): no per-message await, batched and compressed by librdkafka.

    At-least-once: Faust flushes its producer before committing consumed offsets; `build_app` chains
    `flush()` into that, so an offset is only committed once everything its processing produced is acked.
    Partitioning is Java-compatible murmur2, the same as Faust/aiokafka, so a key lands on the partition
    where the table data for that key lives, whichever producer sent it.
    """

    def __init__(self, kafka: Kafka, lose: frozenset[str] = frozenset(),
                 error_cb: Callable[[KafkaError], None] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        # linger 20 ms: fewer, larger produce requests (the broker's cost is per request more than per
        # message), for at most 20 ms more latency on a path whose budget is a second.
        # message.timeout.ms 0: a message waits for the broker as long as it takes (librdkafka's default fails
        # it after 5 min), so a broker outage of any length is waited out, not turned into lost output.
        self._p = Producer(client_config(kafka, {
            "partitioner": "murmur2_random", "acks": "all",
            "enable.idempotence": True, "linger.ms": 20, "compression.type": "lz4",
            "queue.buffering.max.messages": 200_000, "queue.buffering.max.kbytes": OUTPUT_QUEUE_KBYTES,
            "batch.num.messages": 10_000, "message.timeout.ms": 0, **(extra or {}),
        }, error_cb=error_cb))
        self._waits: list[float] = []  # when each flush still waiting began
        # whether the worker is stopping: a flush then gives up after STOPPING_FLUSH_S (`build_app` sets it)
        self.stopping: Callable[[], bool] = lambda: False
        self._errors: list[KafkaError] = []
        self.produced = 0
        # Epochs are numbered within this process's run: a profile's outbox is stamped (run, epoch) and is
        # known delivered once `acked_epoch` (every epoch up to it acknowledged) reaches its epoch.
        self.run = uuid.uuid4().hex[:12]
        self.acked_epoch = 0
        self._epoch = _Epoch(self._errors, 1)  # messages produced since the last flush began
        self._open: list[_Epoch] = [self._epoch]  # epochs that may still have unacknowledged messages
        # called after each successful `flush`, whoever asked for it (commits of Faust and of the ingest loop)
        self.on_flushed: list[Callable[[], None]] = []
        self._lose = lose  # fault injection (tests): topics whose messages stay in flight until the process dies

    def produce(self, topic: str, key: bytes, value: bytes | None, headers: dict[str, bytes] | None = None,
                partition: int | None = None, on_delivery: Any = None) -> None:
        """Queue one message (no await). `on_delivery(err, msg)` runs in `flush`/`poll`, on this thread;
        pass the same function object for many messages (it is wrapped once per epoch)."""
        epoch = self._epoch
        if self._lose and topic in self._lose:
            epoch.pending += 1  # never acknowledged: no flush completes, no offset is committed
            self.produced += 1
            return
        callback = epoch.done if on_delivery is None else epoch.chained(on_delivery)
        hdrs: list[tuple[str, str | bytes | None]] | None = list(headers.items()) if headers else None
        part = -1 if partition is None else partition  # -1: librdkafka's partitioner picks (by key)
        while True:
            try:
                if hdrs is None:
                    self._p.produce(topic, value, key, part, callback)
                else:
                    self._p.produce(topic, value, key, part, callback, headers=hdrs)
                break
            except BufferError:  # librdkafka's queue is full: backpressure on this agent
                self._p.poll(0.05)
            except KafkaException as exc:  # refused at once (too large ...): the caller dead-letters its cause
                err = exc.args[0]
                raise OutputRefused(topic, len(value or b"") + len(key), err.name()) from exc
        epoch.pending += 1  # after the produce: a refused message has no delivery report coming
        self.produced += 1
        if self.produced % 256 == 0:
            self._p.poll(0)

    @property
    def epoch(self) -> int:
        """The number of the epoch that messages produced now belong to."""
        return self._epoch.no

    @property
    def acknowledged(self) -> int:
        """Messages acknowledged (delivered or failed) so far."""
        return self.produced - sum(e.pending for e in self._open)

    def _begin_wait(self) -> list[_Epoch]:
        """1. close the current epoch (what the caller must wait for: every message produced so far);
        2. open a new one for what comes next; 3. forget epochs that are fully acknowledged."""
        waiting = list(self._open)
        self._epoch = _Epoch(self._errors, self._epoch.no + 1)
        self._open = [e for e in waiting if e.pending > 0] + [self._epoch]
        return waiting

    @staticmethod
    def _unacked(waiting: list[_Epoch]) -> int:
        return sum(e.pending for e in waiting)

    def _raise_errors(self) -> None:
        if self._errors:
            errors = list(self._errors)
            self._errors.clear()
            raise PipelineError(f"{len(errors)} output messages failed, first: {errors[0]}")

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every message produced *before this call* is acknowledged; raise if any delivery failed.

        Messages produced while waiting are not waited for: under steady load librdkafka's queue is never
        empty, and waiting for it to be would hold the commit (and Faust's fetch loop) until traffic stops.
        No deadline by default: while the broker is away the commits that need this wait for it, however long
        (`waiting_s` tells the outage watch, which reports it); `timeout_s` raises after that long, and so
        does STOPPING_FLUSH_S once the worker is stopping (nothing is committed: handled again after a restart)."""
        waiting = self._begin_wait()
        started = time.monotonic()
        self._waits.append(started)
        try:
            self._p.poll(0)
            while self._unacked(waiting):
                waited = time.monotonic() - started
                limit = STOPPING_FLUSH_S if timeout_s is None and self.stopping() else timeout_s
                if limit is not None and waited > limit:
                    raise PipelineError(f"output producer: {self._unacked(waiting)} messages not "
                                        f"acknowledged in {limit}s")
                await asyncio.sleep(FLUSH_POLL_S if waited < 1.0 else FLUSH_SLOW_POLL_S)
                self._p.poll(0)
        finally:
            self._waits.remove(started)
        self._raise_errors()
        self.acked_epoch = waiting[-1].no
        for callback in self.on_flushed:
            callback()

    def waiting_s(self) -> float:
        """How long the oldest flush still running has been waiting (0 when none is)."""
        return time.monotonic() - min(self._waits) if self._waits else 0.0

    def probe(self, timeout_s: float = 5.0) -> None:
        """Ask the broker for metadata (blocking: run it in a thread); raises if none answers in time."""
        self._p.list_topics(timeout=timeout_s)

    def flush_blocking(self, timeout_s: float = 30.0) -> None:
        """`flush` for shutdown paths that cannot await (without `on_flushed`: the stores may be closing)."""
        waiting = self._begin_wait()
        deadline = time.monotonic() + timeout_s
        while self._unacked(waiting) and time.monotonic() < deadline:
            self._p.poll(0.01)
        if self._unacked(waiting):
            raise PipelineError(f"output producer: {self._unacked(waiting)} messages not acknowledged")
        self._raise_errors()
        self.acked_epoch = waiting[-1].no


class _Epoch:
    """The messages produced between two flushes: how many still await their delivery report. One bound
    callback per epoch, not one closure per message (the producer is on the hot path)."""

    __slots__ = ("no", "pending", "errors", "done", "_chained")

    def __init__(self, errors: list[KafkaError], no: int) -> None:
        self.no = no
        self.pending = 0
        self.errors = errors
        self.done = self._done
        self._chained: dict[Any, Callable[[KafkaError | None, Any], None]] = {}

    def _done(self, err: KafkaError | None, _msg: Any) -> None:
        self.pending -= 1
        if err is not None:
            self.errors.append(err)

    def chained(self, extra: Callable[[KafkaError | None, Any], None]) -> Callable[[KafkaError | None, Any], None]:
        cb = self._chained.get(extra)
        if cb is None:
            def cb(err: KafkaError | None, msg: Any) -> None:
                self._done(err, msg)
                extra(err, msg)
            self._chained[extra] = cb
        return cb


# Every agent and the ingest loop take up to BATCH_MAX messages at a time (waiting at most BATCH_WITHIN_S
# for a batch to fill): per-batch costs (a local-delivery block, counters, one write per profile) amortise.
BATCH_MAX = 500
BATCH_WITHIN_S = 0.01
# A dead-lettered copy keeps at most this much of the original (under Kafka's default 1 MB message limit,
# with room for the headers); `original_size` says how much there was.
DLQ_MAX_BYTES = 512 * 1024


@dataclass
class Runtime:
    """Everything agents share; built once by `build_app`."""

    settings: Settings
    config: PipelineConfig
    registry: TopicRegistry
    app: faust.App
    engine: SegmentEngine
    processor: ProfileProcessor
    output: OutputProducer
    topics: dict[str, faust.TopicT] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    ptables: dict[str, PartitionedTable] = field(default_factory=dict)
    caches: dict[str, BoundedCache[Any, Any]] = field(default_factory=dict)  # the in-memory caches, by name (GET /debug/memory)
    tally: metrics.Tally = field(default_factory=metrics.Tally)  # flushed when a local-delivery block ends
    readiness: Readiness = field(default_factory=Readiness)  # why the worker cannot work now (GET /readyz)
    erasure_log: ErasureLog | None = None  # erasure statuses and the suppression list (pipeline.privacy)
    # this worker's segments.yaml kept equal to the last one saved on any worker (control.audiences)
    definitions: DefinitionsSync | None = None
    kafka: KafkaWatch | None = None  # outages of the broker (`build_app` starts it; its error_cb for clients)
    audience_sizes: AudienceSizes = field(default_factory=AudienceSizes)  # per held partition (GET /audiences/{id})
    # how far behind its stage topics this worker is: ingest waits while it is too far (pipeline.stages.backlog)
    stage_backlog: StageBacklog = field(default_factory=lambda: StageBacklog(0))
    delivery: LocalDelivery = field(init=False)  # in-process delivery to held partitions (`local_delivery`)

    def __post_init__(self) -> None:
        self.delivery = LocalDelivery(in_process_allowed, lambda send, p: self.send(send, partition=p),
                                      lambda topic, n: self.tally.add(metrics.LOCAL_DELIVERIES, topic, n=n))

    def deliver_locally(self, topic: str, table: PartitionedTable, handler: LocalHandler) -> None:
        """Let `handler` (the stage's own) take messages to `table`'s held partitions in-process."""
        self.delivery.register(topic, Target(table.partition, table.active, handler))

    def topic(self, logical: str, *more: str) -> faust.TopicT:
        """The Faust topic for a logical name (declared once in topics.yaml); with `more`, one channel over them
        all, which must have as many partitions (Faust assigns a partition of each to the same worker)."""
        names = (logical, *more)
        cached = "+".join(names)
        if cached not in self.topics:
            specs = [self.registry[n] for n in names]
            if len({s.partitions for s in specs}) > 1:
                raise ConfigError(f"topics.yaml: {', '.join(names)} are consumed together and need as many "
                                  f"partitions ({', '.join(str(s.partitions) for s in specs)})")
            self.topics[cached] = self.app.topic(*(s.name for s in specs), key_type=bytes, value_type=bytes,
                                                 key_serializer="raw", value_serializer="raw",
                                                 partitions=specs[0].partitions, internal=False)
        return self.topics[cached]

    def send(self, send: Send, headers: dict[str, bytes] | None = None, partition: int | None = None) -> None:
        """The one path every outgoing message takes: handled in-process when local delivery is on, this
        worker holds the target partition of a stage topic and the protocol allows it (`in_process_allowed`:
        identity-stage messages and a merge's `link` and `absorb` must be in their target's log); otherwise encoded with the
        topic's codec and produced (no await: the output producer is flushed before each commit)."""
        if headers is None and self.delivery.offer(send, partition):
            return
        spec = self.registry[send.topic]
        # a null value stays null: a dead-lettered tombstone is kept as it came, and on a compacted topic it is a
        # tombstone (an erasure removes a key)
        tombstone = send.value is None and (isinstance(spec.codec, RawCodec) or "compact" in spec.cleanup_policy)
        value = None if tombstone else spec.codec.encode(send.value)
        self.output.produce(spec.name, send.key.encode(), value, headers, partition)

    def dead_letter(self, topic: str, key: str, value: bytes | None, reason: str, detail: str,
                    headers: dict[str, bytes] | None = None) -> None:
        """Put what could not be processed on a dead-letter topic, with its reason in headers: the original
        bytes, or their first DLQ_MAX_BYTES with `truncated` set and `original_size` always given."""
        hdrs = {"reason": reason.encode(), "detail": detail[:1000].encode(),
                "original_size": str(len(value) if value is not None else 0).encode(), **(headers or {})}
        if value is not None and len(value) > DLQ_MAX_BYTES:
            value, hdrs["truncated"] = value[:DLQ_MAX_BYTES], b"true"
        self.send(Send(topic, key, value), headers=hdrs)

    def dead_letter_stage(self, topic: str, key: bytes, msg: Any, exc: BaseException) -> None:
        """A stage message (identity or profile op) whose handling failed: logged (op and error type, no
        values), counted and dead-lettered to `internal.dlq` msgpack-encoded, with its stage topic."""
        op = messages.op_of(msg)
        log.error("%s: %r message failed and was dead-lettered: %s%s", topic, op, describe(exc),
                  "" if isinstance(exc, PipelineError) else "\n" + where(exc))
        metrics.RECORDS_DEAD_LETTERED.labels(topic, "handling-failed").inc()
        try:
            raw = msg if isinstance(msg, bytes) else messages.encode(msg)
        except Exception:  # noqa: BLE001 - the message itself may be what cannot be encoded
            raw = repr(type(msg)).encode()
        self.dead_letter(INTERNAL_DLQ, key.decode(errors="replace"), raw, "handling-failed", describe(exc),
                         {"stage_topic": topic.encode(), "op": str(op).encode()})

    def send_encoded_once(self, targets: list[tuple[str, str]], value: Any) -> None:
        """One value to several output topics that share a codec (checked at registration): encoded once."""
        data = self.registry[targets[0][0]].codec.encode(value)
        for logical, key in targets:
            self.output.produce(self.registry.name(logical), key.encode(), data)

    @contextlib.contextmanager
    def local_delivery(self) -> Iterator[None]:
        """Within this block, a message to a stage topic (identity, profile ops) whose partition this worker
        holds is handled in-process when the block ends, as if it had made the round trip through Kafka
        instantly: no encode, produce, fetch, decode or Faust event per hop (pipeline.stages.delivery). The block
        must not await: the messages are handled before the agent takes its next events, so before their offsets
        can be committed (at-least-once, as through Kafka). Off during a rebalance or table recovery."""
        enabled = not self.app.rebalancing and self.app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        try:
            with self.delivery.block(enabled):
                yield
        finally:
            self.tally.flush()

    def decode_stage(self, topic: str, events: list[Any]) -> list[LocalItem]:
        """A batch of a stage topic's events as (partition, key, message); a value that is no stage message is
        dead-lettered (as it came) and left out: one message never stops the stage."""
        self.stage_backlog.note_events(events, self._highwater)
        items: list[LocalItem] = []
        for e in events:
            try:
                items.append((e.message.partition, e.key, messages.decode(e.value)))
            except Exception as exc:  # noqa: BLE001 - msgspec's DecodeError / ValidationError
                self.dead_letter_stage(topic, e.key or b"", e.value, exc)
        return items

    def _highwater(self, tp: Any) -> int | None:
        """The Faust consumer's high watermark of a partition (None until it has fetched it)."""
        try:
            return self.app.consumer.highwater(tp)  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - not fetched yet, or the consumer is being rebuilt: no figure
            return None

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)
