"""Ingest: decode each ingest topic's records and start stitching them, or dead-letter them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.backoff import Backoff
from pipeline.connection import client_config
from pipeline.errors import PipelineError, SchemaRegistryUnavailable, describe, where
from pipeline.identity.stitch import apply_msg, home_key, start_resolve
from pipeline.ingest.decode import Decoder, Rejected, Skipped
from pipeline.ingest.drops import DropReporter
from pipeline.ingest.replay import REPLAY_OF_HEADER
from pipeline.model import ExperienceEvent
from pipeline.observability import metrics
from pipeline.observability.kafka_stats import LibrdkafkaStats
from pipeline.observability.logformat import add_to_context, message_context
from pipeline.runtime import BATCH_MAX, Runtime
from pipeline.serde.avro import AvroCodec
from pipeline.stages.messages import record_to_wire, wire_identity_keys
from pipeline.topics import INGEST_DLQ, INGEST_EVENTS, INGEST_PROFILES

log = logging.getLogger(__name__)


INGEST_TOPICS = ((INGEST_EVENTS, "event"), (INGEST_PROFILES, "profile"))
COMMIT_INTERVAL_S = 1.0
IDLE_SLEEP_S = 0.005
# While the loop waits for the output or the Schema Registry, the consumer is still served this often.
KEEPALIVE_S = 5.0
# The ingest consumer's assignment lost in an outage: how long after Kafka is back it may take to rejoin.
REJOIN_GRACE_S = 20.0
# Schema Registry unavailable: asked again after 1 s, 2 s ... at most every 30 s (jittered: every worker was
# refused at once); a line after 15 s, 30 s, 60 s ... then every 5 min.
REGISTRY_RETRY_FIRST_S, REGISTRY_RETRY_MAX_S = 1.0, 30.0
REGISTRY_REPORT_FIRST_S, REGISTRY_REPORT_MAX_S = 15.0, 300.0
# Records the ingest consumer fetches ahead, outside Python (librdkafka's defaults: 64 MB, and up to 100,000
# records a partition): a worker behind its input holds that much, which its memory bound must count. 16 MB
# is still tens of seconds of records at 1,000/s.
INGEST_PREFETCH_KBYTES = 16 * 1024
INGEST_PREFETCH_RECORDS = 10_000  # a partition


def ingest_group(app_id: str) -> str:
    """The ingest consumers' group: the worker app id with an `-ingest` suffix."""
    return f"{app_id}-ingest"


def consumer_config(group: str, client_id: str,
                    instance_id: str | None = None) -> dict[str, Any]:
    """The ingest consumer's own librdkafka settings, to pass through `client_config` (the benchmark's
    passthrough ceiling uses them too).

    `instance_id`: the static member id (`Settings.group_instance_id("ingest")`, None for a dynamic member).
    A worker restarted after a SIGKILL rejoins with it and gets its partitions back at once, without a
    rebalance, instead of everyone waiting for the dead member's session to expire (45 s). librdkafka never
    sends a LeaveGroup on close for a static member (KIP-345), so on a graceful stop the worker leaves for
    it afterwards (`pipeline.app.leave_groups_on_stop`)."""
    config: dict[str, Any] = {
        "group.id": group, "client.id": client_id,
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        # the broker answers a fetch once it has 64 KiB or after 25 ms: under load, tens of fetches a second
        # instead of one per few records, which cost the broker (on the same cores here) more than the data
        "fetch.min.bytes": 65536, "fetch.wait.max.ms": 25,
        "partition.assignment.strategy": "cooperative-sticky",
        "queued.max.messages.kbytes": INGEST_PREFETCH_KBYTES, "queued.min.messages": INGEST_PREFETCH_RECORDS,
    }
    if instance_id:
        config["group.instance.id"] = instance_id
    return config


def register(rt: Runtime) -> None:
    """The ingest loop: a Faust task that consumes both ingest topics with librdkafka."""
    decoders: dict[str, tuple[str, Decoder]] = {}
    on_drop = DropReporter(rt.tally)
    for logical, kind in INGEST_TOPICS:
        spec = rt.registry[logical]
        assert isinstance(spec.codec, AvroCodec)
        decoders[spec.name] = (logical, Decoder(kind, spec.codec, rt.config.profile.identity,  # type: ignore[arg-type]
                                                rt.config.profile.datasets, on_drop,
                                                rt.erasure_log.is_suppressed if rt.erasure_log else None))
    handle = _record_handler(rt)

    @rt.app.task
    async def ingest() -> None:
        await _ingest_loop(rt, decoders, handle)


def _record_handler(rt: Runtime) -> Any:
    identities = rt.ptables["identity"]
    unique = rt.config.profile.identity.unique_namespaces

    def dead_letter(logical: str, msg: Any, reason: str, detail: str) -> None:
        """The original record (or its first bytes, if huge; a null stays null), reason and source in headers."""
        metrics.RECORDS_DEAD_LETTERED.labels(logical, reason).inc()
        headers = {"source_topic": msg.topic().encode(), "source_partition": str(msg.partition()).encode(),
                   "source_offset": str(msg.offset()).encode()}
        for name, value in msg.headers() or ():  # a replayed record failing again says which entry it was
            if name == REPLAY_OF_HEADER and value:
                headers[REPLAY_OF_HEADER] = value
        rt.dead_letter(INGEST_DLQ, (msg.key() or b"").decode(errors="replace"), msg.value(), reason, detail,
                       headers)

    def handle(logical: str, decoder: Decoder, msg: Any) -> None:
        """One ingest record: dead-letter it with its reason, skip it, or start stitching it."""
        verdict = decoder.decode(msg.value(), rt.now_ms())
        if isinstance(verdict, Rejected):  # the error path: original bytes, reason, source in headers
            dead_letter(logical, msg, verdict.reason, verdict.detail)
        elif isinstance(verdict, Skipped):
            metrics.RECORDS_SKIPPED.labels(verdict.dataset, verdict.reason).inc()
        else:
            rt.tally.add(metrics.RECORDS_INGESTED, logical)
            if isinstance(verdict, ExperienceEvent):
                add_to_context(event_id=verdict.event_id)
            else:
                add_to_context(record_id=verdict.record_id)
            wire = record_to_wire(verdict)
            home = home_key(wire_identity_keys(wire), unique)
            # the home hop, done here when this worker holds the home identity's partition and it has an owner
            kb = home.encode()
            p = identities.partition(kb)
            owner = identities.get(p, kb) if p in identities.active() else None
            rt.send(apply_msg(owner.decode(), wire, home) if owner else start_resolve(wire, home, rt.now_ms()))

    def handle_safely(logical: str, decoder: Decoder, msg: Any) -> None:
        """`handle`, and a record whose handling fails in any way is dead-lettered: one record never stops
        ingest (what it causes in the later stages is guarded there, message by message)."""
        with message_context(topic=logical, partition=msg.partition(), offset=msg.offset()):
            try:
                handle(logical, decoder, msg)
            except SchemaRegistryUnavailable:  # not the record's fault: the loop holds it and asks again
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("%s: a record at offset %d of partition %d failed and was dead-lettered: %s%s", logical,
                          msg.offset(), msg.partition(), describe(exc),
                          "" if isinstance(exc, PipelineError) else "\n" + where(exc))
                dead_letter(logical, msg, "handling-failed", describe(exc))

    return handle_safely


async def _ingest_loop(rt: Runtime, decoders: dict[str, tuple[str, Decoder]], handle: Any) -> None:
    """Consume the ingest topics with a librdkafka consumer of the group `<app id>-ingest`.

    Why not a Faust agent: records here need no table of their own partition (stages address partitions
    explicitly and most of what a record causes is delivered in-process), and Faust's per-message machinery
    (fetch thread hand-off, events, acks) was a quarter of the worker's CPU; librdkafka fetches in C.

    1. take up to BATCH_MAX buffered records (never blocking the event loop), the held ones first;
    2. handle them in one local-delivery block (everything they cause in-process happens here); a record
       whose schema the Schema Registry cannot give now is held with those after it, and asked for again
       with backoff (`_Waiting`), nothing new taken meanwhile;
    3. every COMMIT_INTERVAL_S: wait for the output producer to acknowledge everything produced so far,
       however long the broker is away, then commit the offsets handled (at-least-once; a record handled
       twice is recognised by its id);
    4. on stop: the same flush and commit, then leave the group; after an error, only leave the group
       (what was handled but not committed is handled again: at-least-once).
    Before 1, nothing new is taken while this worker's stage topics are too far behind (`_Brake`).
    While waiting (2, 3) the consumer is paused and still served every KEEPALIVE_S: an outage can outlast
    max.poll.interval.ms (5 min), after which librdkafka would leave the group."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    done: dict[tuple[str, int], int] = {}  # next offset to commit, per partition handled since the last commit
    held: list[Any] = []  # records taken from the consumer, not handled yet (the Schema Registry is away)
    last_commit = time.monotonic()
    group = ingest_group(rt.settings.app_id)
    stats = LibrdkafkaStats(f"{rt.settings.worker_name}-ingest", group)
    commit_seconds = metrics.COMMIT_SECONDS.labels(group)
    commits_sent: list[float] = []  # when each asynchronous commit still unanswered was sent

    def committed(err: Any, partitions: list[Any]) -> None:
        """The result of a commit (served by `consume`, on this thread): forget what is committed; what was
        refused (the group is rebalancing) stays, for the next interval."""
        if commits_sent:
            commit_seconds.observe(time.monotonic() - commits_sent.pop(0))
        if err is not None:
            log.info("ingest offsets not committed yet (%s); retrying at the next interval", err)
            return
        for tp in partitions:
            k = (tp.topic, tp.partition)
            if tp.error is None and done.get(k) == tp.offset:
                del done[k]

    def new_consumer() -> Any:
        return Consumer(client_config(rt.settings.kafka, {
            **consumer_config(group, f"{rt.settings.worker_name}-ingest",
                              instance_id=rt.settings.group_instance_id("ingest")),
            **stats.config(rt.settings.kafka_stats_interval_ms),
            "on_commit": committed}, error_cb=rt.kafka.error_cb if rt.kafka else None))

    consumer = new_consumer()
    paused = _Paused(consumer, held)
    lost: list[float] = []  # when the assignment was lost (the session expired), until a new one comes

    def commit_offsets(only: set[tuple[str, int]] | None = None, wait: bool = False) -> None:
        """Commit what was handled (its output is acknowledged by now). The periodic commit does not wait
        for the answer: during a rebalance the coordinator can hold it for as long as a dead member's
        session, and the event loop (Faust's heartbeats and rebalance callbacks with it) must not stop
        meanwhile. Revocation and stop wait (`wait`), since the partitions leave right after."""
        offsets = {k: v for k, v in done.items() if only is None or k in only}
        if not offsets:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if not wait:
                commits_sent.append(time.monotonic())
                consumer.commit(offsets=tps, asynchronous=True)
                return
            consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            log.info("ingest offsets not committed yet (%s); retrying at the next interval", exc.args[0])
            return
        for k, v in offsets.items():
            if done.get(k) == v:
                del done[k]

    def flush_and_commit(only: set[tuple[str, int]] | None = None) -> None:
        """Revocation and stop: commit what was handled once its output is acknowledged; if it is not within
        flush_blocking's timeout, or Kafka is unreachable (a synchronous commit would then block the event
        loop for a session timeout, 45 s), commit nothing: whoever takes the partitions over handles those
        records again (at-least-once), and their output is still delivered when it can be."""
        if rt.kafka is not None and rt.kafka.unreachable:
            log.warning("ingest offsets not committed (Kafka is unreachable): the records are handled again")
            return
        try:
            rt.output.flush_blocking()
        except PipelineError as exc:
            log.warning("ingest offsets not committed (%s): the records are handled again", exc)
            return
        commit_offsets(only, wait=True)

    def forget(partitions: list[Any]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        held[:] = [m for m in held if (m.topic(), m.partition()) not in gone]
        for k in gone:
            done.pop(k, None)

    def on_revoke(_: Any, partitions: list[Any]) -> None:
        """Partitions moving to another worker: commit what this one handled (output flushed first), then
        forget them (and the records held for them), so a later commit never moves their offsets back."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        if revoked & set(done):
            flush_and_commit(revoked)
        forget(partitions)

    def on_lost(_: Any, partitions: list[Any]) -> None:
        forget(partitions)  # not ours any more: their new owner re-handles the uncommitted records
        log.warning("ingest: %d partitions lost (the group session expired); rejoining", len(partitions))
        lost[:] = [time.monotonic()]
        rt.readiness.set("ingest", "the ingest consumer lost its partitions and is rejoining its group")

    def on_assign(_: Any, partitions: list[Any]) -> None:  # (librdkafka assigns them after this returns)
        log.info("ingest: %d partitions assigned", len(partitions))
        lost.clear()
        rt.readiness.clear("ingest")  # consuming (an empty assignment too: more workers than partitions)

    def rejoined_or_restarted() -> Any:
        """The consumer, or a new one: after its session expired in an outage, librdkafka (2.16) sometimes
        never rejoins the group once the broker is back (seen once in the outage test: no assignment in
        3 min, the others rejoined in 1 s). REJOIN_GRACE_S after Kafka is reachable again without an
        assignment, the consumer is closed and a new one joins (as a worker restart would: the same static
        member takes its partitions back, from the committed offsets)."""
        if not lost or (rt.kafka is not None and rt.kafka.unreachable):
            if lost:
                lost[:] = [time.monotonic()]  # the grace counts from when Kafka is reachable
            return consumer
        if time.monotonic() - lost[0] < REJOIN_GRACE_S:
            return consumer
        log.warning("ingest: no partitions %.0f s after Kafka came back; restarting the ingest consumer",
                    REJOIN_GRACE_S)
        lost.clear()
        consumer.close()
        fresh = new_consumer()
        fresh.subscribe(list(decoders), on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
        paused.consumer = fresh
        return fresh

    async def flush_output() -> None:
        """`rt.output.flush()`, the consumer paused and served meanwhile if it takes longer than KEEPALIVE_S."""
        flush = asyncio.ensure_future(rt.output.flush())
        try:
            while not (await asyncio.wait({flush}, timeout=KEEPALIVE_S))[0]:
                paused.keepalive()
            flush.result()
        finally:
            flush.cancel()  # (done already, unless this task is cancelled)
            paused.resume()

    consumer.subscribe(list(decoders), on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    brake = _Brake(rt, paused)
    try:
        while True:
            if brake.holds():  # the stage topics are behind: no new records until they catch up
                msgs = []
            elif held:
                msgs, held[:] = list(held), []
            else:
                msgs = consumer.consume(BATCH_MAX, 0)  # also runs the rebalance callbacks above
            unavailable: SchemaRegistryUnavailable | None = None
            if msgs:
                handled: dict[tuple[str, int], int] = {}
                with rt.local_delivery():
                    for i, msg in enumerate(msgs):
                        err = msg.error()
                        if err is not None:
                            if err.code() != KafkaError._PARTITION_EOF:
                                log.warning("ingest consumer: %s", err)
                            continue
                        logical, decoder = decoders[msg.topic()]  # type: ignore[index]
                        try:
                            handle(logical, decoder, msg)
                        except SchemaRegistryUnavailable as exc:
                            held[:0] = msgs[i:]  # this one and the rest, in order, before anything newer
                            unavailable = exc
                            break
                        handled[(msg.topic(), msg.partition())] = msg.offset() + 1  # type: ignore[index, operator]
                # only now: the block's local deliveries ran without raising (if it raised, nothing of
                # this batch is committed and its records come again)
                done.update(handled)
            if unavailable is not None:
                _, decoder = decoders[held[0].topic()]
                await _Waiting(rt, paused).registry(unavailable, decoder.codec.catalog.parsed_by_id)
            consumer = rejoined_or_restarted()
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                await flush_output()  # only this task adds to `done`, so nothing is added meanwhile
                commit_offsets()
                last_commit = time.monotonic()
            await asyncio.sleep(0 if msgs else IDLE_SLEEP_S)
    except asyncio.CancelledError:  # the worker stops: what was handled is committed once its output is acked
        flush_and_commit()
        done.clear()  # committed, or not to be: close() (which revokes what is assigned) does not try again
        raise
    finally:
        consumer.close()  # runs on_revoke for what is still assigned (a static member leaves in app.leave_groups_on_stop)


class _Paused:
    """The ingest consumer taking nothing new while the loop waits (for the output or the Schema Registry),
    still served (`keepalive`) so that it keeps its group membership: partitions assigned meanwhile are
    paused too; a record it still returns is held, in order, for later."""

    def __init__(self, consumer: Any, held: list[Any]) -> None:
        self.consumer, self.held = consumer, held
        self.partitions: list[Any] = []

    def keepalive(self) -> None:
        assignment = self.consumer.assignment()
        new = [tp for tp in assignment if (tp.topic, tp.partition) not in {(p.topic, p.partition)
                                                                           for p in self.partitions}]
        if new:
            self.consumer.pause(new)
            self.partitions += new
        self.held.extend(self.consumer.consume(BATCH_MAX, 0))

    def resume(self) -> None:
        """Resume every partition paused, assigned now or not: librdkafka keeps a partition paused through a
        loss and a new assignment (a session that timed out during the outage), so one paused, lost and
        assigned again would otherwise never be fetched again."""
        if not self.partitions:
            return
        assigned = self.consumer.assignment()
        seen = {(tp.topic, tp.partition) for tp in assigned}
        back = assigned + [tp for tp in self.partitions if (tp.topic, tp.partition) not in seen]
        self.partitions = []
        self.consumer.resume(back)


class _Brake:
    """Backpressure (pipeline.stages.backlog): while the worker's identity and profile-op partitions are more than
    PIPELINE_STAGE_BACKLOG_MAX messages behind, the ingest consumer is paused (and still served) and the loop
    takes nothing new, so the event loop's time goes to the older work; counted in
    cdp_ingest_backpressure_seconds_total, and said in the log at most once every REPORT_S."""

    REPORT_S = 60.0

    def __init__(self, rt: Runtime, paused: _Paused) -> None:
        self.backlog, self.paused = rt.stage_backlog, paused
        self.waiting = False
        self.mark = 0.0  # up to when the current wait is counted
        self.waited = 0.0  # seconds waited since the last report
        self.next_report = 0.0

    def holds(self) -> bool:
        now = time.monotonic()
        if not self.backlog.over():
            if self.waiting:
                self._count(now)
                self.waiting = False
                self.paused.resume()
            return False
        if not self.waiting:
            self.waiting, self.mark = True, now
        self._count(now)
        self.paused.keepalive()  # (records it still returns are held, in order, for later)
        if now >= self.next_report:
            self.next_report = now + self.REPORT_S
            log.info("ingest waits for the stage topics: %d messages behind (limit %d); %.1f s waited since the last "
                     "report", self.backlog.behind(), self.backlog.limit, self.waited)
            self.waited = 0.0
        return True

    def _count(self, now: float) -> None:
        metrics.INGEST_BACKPRESSURE_SECONDS.inc(now - self.mark)
        self.waited += now - self.mark
        self.mark = now


class _Waiting:
    """Ingest waiting for the Schema Registry: not ready meanwhile, a line when it starts, now and then with
    backoff, and when it ends; the schema asked again with backoff, in a thread (a request can take the
    client's timeout), the consumer served in between."""

    def __init__(self, rt: Runtime, paused: _Paused) -> None:
        self.rt, self.paused = rt, paused

    async def registry(self, exc: SchemaRegistryUnavailable, fetch: Callable[[int], Any]) -> None:
        started = time.monotonic()
        retries = Backoff(REGISTRY_RETRY_FIRST_S, REGISTRY_RETRY_MAX_S, jitter=True)
        reports = Backoff(REGISTRY_REPORT_FIRST_S, REGISTRY_REPORT_MAX_S)
        next_report = started + reports.next()
        log.warning("Schema Registry unavailable (%s, schema %d): ingest holds %d records and asks again "
                    "with backoff; the worker reports not ready on /readyz meanwhile", exc.cause, exc.schema_id,
                    len(self.paused.held))
        try:
            while True:
                now = time.monotonic()
                self.rt.readiness.set("schema-registry", f"schema {exc.schema_id} unavailable for "
                                      f"{now - started:.0f} s ({exc.cause}), {len(self.paused.held)} records held")
                if now >= next_report:
                    next_report = now + reports.next()
                    log.warning("Schema Registry still unavailable after %.0f s (%s): %d records held; still "
                                "waiting", now - started, exc.cause, len(self.paused.held))
                until = now + retries.next()
                while (left := until - time.monotonic()) > 0:
                    self.paused.keepalive()
                    await asyncio.sleep(min(left, KEEPALIVE_S))
                try:
                    await asyncio.to_thread(fetch, exc.schema_id)
                except SchemaRegistryUnavailable as again:
                    exc = again
                    continue
                except Exception:  # noqa: BLE001, S110 - it answered (no such schema...): decoding the held
                    pass  # record again dead-letters it with the reason
                break
        finally:
            self.paused.resume()
            self.rt.readiness.clear("schema-registry")
        log.warning("Schema Registry available again after %.0f s; ingest resumes", time.monotonic() - started)
