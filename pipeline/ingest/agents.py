"""Ingest: decode each ingest topic's records and start stitching them, or dead-letter them."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pipeline.errors import PipelineError, describe, where
from pipeline.identity.stitch import apply_msg, home_key, start_resolve
from pipeline.ingest.decode import Decoder, Rejected, Skipped
from pipeline.ingest.wire import record_to_wire, wire_identity_keys
from pipeline.observability import metrics
from pipeline.runtime import BATCH_MAX, Runtime
from pipeline.serde.avro import AvroCodec

log = logging.getLogger(__name__)


INGEST_TOPICS = (("ingest.events", "event"), ("ingest.profiles", "profile"))
COMMIT_INTERVAL_S = 1.0
IDLE_SLEEP_S = 0.005


def ingest_group(app_id: str) -> str:
    """The ingest consumers' group: the worker app id with an `-ingest` suffix."""
    return f"{app_id}-ingest"


def consumer_config(bootstrap: str, group: str, client_id: str,
                    instance_id: str | None = None) -> dict[str, Any]:
    """The ingest consumer's librdkafka settings (the benchmark's passthrough ceiling uses them too).

    `instance_id`: the static member id (`Settings.group_instance_id("ingest")`, None for a dynamic member).
    A worker restarted after a SIGKILL rejoins with it and gets its partitions back at once, without a
    rebalance, instead of everyone waiting for the dead member's session to expire (45 s). librdkafka never
    sends a LeaveGroup on close for a static member (KIP-345), so on a graceful stop the worker leaves for
    it afterwards (`pipeline.app.leave_groups_on_stop`)."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap, "group.id": group, "client.id": client_id,
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        # the broker answers a fetch once it has 64 KiB or after 25 ms: under load, tens of fetches a second
        # instead of one per few records, which cost the broker (on the same cores here) more than the data
        "fetch.min.bytes": 65536, "fetch.wait.max.ms": 25,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    if instance_id:
        config["group.instance.id"] = instance_id
    return config


def register(rt: Runtime) -> None:
    """The ingest loop: a Faust task that consumes both ingest topics with librdkafka."""
    decoders: dict[str, tuple[str, Decoder]] = {}
    for logical, kind in INGEST_TOPICS:
        spec = rt.registry[logical]
        assert isinstance(spec.codec, AvroCodec)
        decoders[spec.name] = (logical, Decoder(kind, spec.codec, rt.config.profile.identity,  # type: ignore[arg-type]
                                                rt.config.profile.datasets))
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
        rt.dead_letter("ingest.dlq", (msg.key() or b"").decode(errors="replace"), msg.value(), reason, detail,
                       {"source_topic": msg.topic().encode(), "source_partition": str(msg.partition()).encode(),
                        "source_offset": str(msg.offset()).encode()})

    def handle(logical: str, decoder: Decoder, msg: Any) -> None:
        """One ingest record: dead-letter it with its reason, skip it, or start stitching it."""
        verdict = decoder.decode(msg.value(), rt.now_ms())
        if isinstance(verdict, Rejected):  # the error path: original bytes, reason, source in headers
            dead_letter(logical, msg, verdict.reason, verdict.detail)
        elif isinstance(verdict, Skipped):
            metrics.RECORDS_SKIPPED.labels(verdict.dataset, verdict.reason).inc()
        else:
            rt.tally.add(metrics.RECORDS_INGESTED, logical)
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
        try:
            handle(logical, decoder, msg)
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

    1. take up to BATCH_MAX buffered records (never blocking the event loop);
    2. handle them in one local-delivery block (everything they cause in-process happens here);
    3. every COMMIT_INTERVAL_S: wait for the output producer to acknowledge everything produced so far,
       then commit the offsets handled (at-least-once; a record handled twice is recognised by its id);
    4. on stop: the same flush and commit, then leave the group; after an error, only leave the group
       (what was handled but not committed is handled again: at-least-once)."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    done: dict[tuple[str, int], int] = {}  # next offset to commit, per partition handled since the last commit
    last_commit = time.monotonic()

    def committed(err: Any, partitions: list[Any]) -> None:
        """The result of a commit (served by `consume`, on this thread): forget what is committed; what was
        refused (the group is rebalancing) stays, for the next interval."""
        if err is not None:
            log.info("ingest offsets not committed yet (%s); retrying at the next interval", err)
            return
        for tp in partitions:
            k = (tp.topic, tp.partition)
            if tp.error is None and done.get(k) == tp.offset:
                del done[k]

    consumer = Consumer({**consumer_config(rt.settings.bootstrap, ingest_group(rt.settings.app_id),
                                           f"{rt.settings.worker_name}-ingest",
                                           instance_id=rt.settings.group_instance_id("ingest")),
                         "on_commit": committed})

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
                consumer.commit(offsets=tps, asynchronous=True)
                return
            consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            log.info("ingest offsets not committed yet (%s); retrying at the next interval", exc.args[0])
            return
        for k, v in offsets.items():
            if done.get(k) == v:
                del done[k]

    def on_revoke(_: Any, partitions: list[Any]) -> None:
        """Partitions moving to another worker: commit what this one handled (output flushed first), then
        forget them, so a later commit never moves their offsets back."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        if revoked & set(done):
            rt.output.flush_blocking()
            commit_offsets(revoked, wait=True)
        for k in revoked:
            done.pop(k, None)

    def on_lost(_: Any, partitions: list[Any]) -> None:
        for tp in partitions:  # not ours any more: their new owner re-handles the uncommitted records
            done.pop((tp.topic, tp.partition), None)

    consumer.subscribe(list(decoders), on_revoke=on_revoke, on_lost=on_lost)
    try:
        while True:
            msgs = consumer.consume(BATCH_MAX, 0)  # also runs the rebalance callbacks above
            if msgs:
                handled: dict[tuple[str, int], int] = {}
                with rt.local_delivery():
                    for msg in msgs:
                        err = msg.error()
                        if err is not None:
                            if err.code() != KafkaError._PARTITION_EOF:
                                log.warning("ingest consumer: %s", err)
                            continue
                        logical, decoder = decoders[msg.topic()]  # type: ignore[index]
                        handle(logical, decoder, msg)
                        handled[(msg.topic(), msg.partition())] = msg.offset() + 1  # type: ignore[index, operator]
                # only now: the block's local deliveries ran without raising (if it raised, nothing of
                # this batch is committed and its records come again)
                done.update(handled)
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                await rt.output.flush()  # only this task adds to `done`, so nothing is added meanwhile
                commit_offsets()
                last_commit = time.monotonic()
            await asyncio.sleep(0 if msgs else IDLE_SLEEP_S)
    except asyncio.CancelledError:  # the worker stops: what was handled is committed once its output is acked
        rt.output.flush_blocking()
        commit_offsets(wait=True)
        raise
    finally:
        consumer.close()  # runs on_revoke for what is still assigned (a static member leaves in app.leave_groups_on_stop)
