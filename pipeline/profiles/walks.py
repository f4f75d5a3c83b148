"""The profile agent's walks over a whole partition (pipeline.profiles.walk does the walking): a batch run,
and the definitions check that runs when a partition is assigned or the audiences are reloaded (it restores
the partition's deadlines, member counts and undelivered outboxes first)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from pipeline.model import Outbox
from pipeline.observability import metrics
from pipeline.profiles import outbox
from pipeline.profiles.cache import DecodedCache
from pipeline.profiles.deadlines import Deadlines
from pipeline.profiles.ops import OpResult
from pipeline.profiles.walk import META_PREFIX, Outcome, Walk, WalkPool, WalkSpec
from pipeline.runtime import Runtime
from pipeline.segments.sizes import AudienceSizes
from pipeline.stages.messages import Batch, Progress, Send
from pipeline.state.codec import peek_entry
from pipeline.state.tables import PartitionedTable
from pipeline.topics import CONTROL_SEGMENTS

log = logging.getLogger(__name__)


@dataclass
class Walks:
    """What a walk over a partition needs from the profile agent: its table, caches, output, and the worker
    processes (None: walks run in the event loop)."""

    table: PartitionedTable
    cache: DecodedCache
    deadlines: Deadlines
    publish: Callable[[OpResult], None]
    pool: WalkPool | None
    acks: Callable[[int], outbox.Acks]  # which outboxes of a partition are delivered
    restamp: Callable[[int, Outcome], bytes | None]  # a walked profile to write, with its outbox
    resume: Callable[[int, list[bytes], list[bytes]], None]  # undelivered outboxes, stitching in flight
    record_acks: Callable[[], None]

    def task_base(self, rt: Runtime, store: Any) -> dict[str, Any] | None:
        """The fields of a SliceTask common to a walk's ranges (the current definitions: they can be
        reloaded between walks), or None to walk in the event loop."""
        if self.pool is None:
            return None
        engine = rt.processor.engine
        return {"path": store.path(), "audiences": tuple(engine.audiences.values()),
                "retention_ms": engine.history_retention_ms, "config_dir": str(rt.settings.config_dir),
                "carried_attributes": engine.carried_attributes}


def defs_key(partition: int) -> bytes:
    return f"__cdp_defs__:{partition}".encode()


def count_members(table: PartitionedTable, partition: int) -> Counter[str]:
    """Current members per audience in a held partition's store (pipeline.segments.sizes)."""
    counts: Counter[str] = Counter()
    for key, raw in table.store(partition).items():
        if not key.startswith(META_PREFIX):
            counts.update(peek_entry(raw).active)
    return counts


def restore_partition(walks: Walks, sizes: AudienceSizes, partition: int) -> None:
    """What lives in memory or may have been lost with a previous owner, when a partition is (re)assigned:
    1. re-read the deadlines kept in its profiles (the heap is in memory), so time-driven changes still
    happen after a restart or a rebalance; 2. count the audiences' current members (in the same pass);
    3. send again the outboxes not known delivered, and what stitching in flight waits on (a resumed
    profile's outbox is sent again by the same handling)."""
    n = 0
    acks = walks.acks(partition)
    undelivered: list[bytes] = []
    in_flight: list[bytes] = []
    members: Counter[str] = Counter()
    for key, raw in walks.table.store(partition).items():
        if key.startswith(META_PREFIX):
            continue
        peeked = peek_entry(raw)  # not a full decode: this reads every profile of the partition
        members.update(peeked.active)
        if peeked.profile_id is not None and peeked.deadline is not None:
            walks.deadlines.note(peeked.profile_id, peeked.deadline)
            n += 1
        if peeked.in_flight:
            in_flight.append(key)
        elif peeked.outbox is not None and acks.resend_now(Outbox(*peeked.outbox, [])):
            undelivered.append(key)
    if n:
        log.info("partition %d: restored %d pending deadlines", partition, n)
    sizes.set(partition, members)
    walks.resume(partition, undelivered, in_flight)


async def walk_partition(rt: Runtime, walks: Walks, partition: int, run: str, spec: WalkSpec,
                          started_ms: int = 0) -> Walk:
    """Run one walk over a partition's profiles (pipeline.profiles.walk), writing and publishing what it
    produces; report progress on the control topic and a final report."""
    table = walks.table
    started = time.monotonic()

    def apply(o: Outcome) -> None:
        raw = walks.restamp(partition, o)
        if raw is not None:
            table.put(partition, o.key, raw)
            walks.cache.drop(o.key)
            walks.deadlines.note(o.profile_id, o.deadline)
        walks.publish(o.result)

    def progress(seen: int, total: int) -> None:
        rt.send(Send(CONTROL_SEGMENTS, run, Progress(run=run, partition=partition, seen=seen, total=total)))

    store = table.store(partition)
    with table.watch(partition) as dirty:
        walk = Walk(rt.processor, spec, store, lambda key: table.get(partition, key, remember=False), apply,
                    progress, dirty, task_base=walks.task_base(rt, store),
                    owner=lambda: not rt.app.rebalancing and partition in table.active())
        await walk.run(walks.pool)
    walks.record_acks()
    if walk.aborted:
        log.warning("walk %s on partition %d stopped after %d of its profiles: the partition was revoked or is "
                    "being rebalanced (run it again)", run, partition, walk.seen)
    rt.send(Send(CONTROL_SEGMENTS, run, Progress(
        run=run, partition=partition, seen=walk.seen, total=walk.seen, evaluated=walk.evaluated,
        changes=walk.changes, final=True, aborted=walk.aborted, seconds=round(time.monotonic() - started, 3),
        started_ms=started_ms)))
    return walk


async def batch(rt: Runtime, walks: Walks, partition: int, msg: Batch) -> None:
    """A batch run over this partition: all audiences (or the listed ones), optionally only profiles
    changed since `since_ms` (incremental)."""
    audiences = msg.audiences or None
    spec = WalkSpec("batch", tuple(audiences) if audiences else None, msg.since_ms, evaluation=msg.kind)
    walk = await walk_partition(rt, walks, partition, msg.run, spec, started_ms=msg.started_ms or 0)
    metrics.BATCH_PROFILES.inc(walk.seen)


async def definitions_check(rt: Runtime, walks: Walks, partition: int) -> None:
    """Runs when a partition is assigned (and after a hot reload), in order with that partition's messages:
    0. restore the partition's pending deadlines;
    1. diff the stored fingerprints with the loaded definitions; 2. evaluate new/edited audiences over the
    partition's profiles and exit members of removed ones; 3. store the new fingerprints."""
    table = walks.table
    restore_partition(walks, rt.audience_sizes, partition)
    key = defs_key(partition)
    raw = table.get(partition, key)
    old = msgpack.unpackb(raw, raw=False) if raw else None
    changed, removed = rt.processor.definitions_diff(old)
    if changed or removed:
        log.info("partition %d: audience definitions changed (%d new/edited, %d removed): evaluating",
                 partition, len(changed), len(removed))
        spec = WalkSpec("definitions", tuple(changed), removed=tuple(removed), evaluation="definition")
        await walk_partition(rt, walks, partition, f"defs-{partition}", spec)
    if old != rt.processor.fingerprints():
        table.put(partition, key, msgpack.packb(rt.processor.fingerprints()))
