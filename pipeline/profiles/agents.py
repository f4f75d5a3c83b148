"""Profile agent: applies pipeline.profiles.ops to messages keyed by profile id, emits memberships,
and fires time-driven re-evaluations (deadlines) through the same topic, so they run in order with the
profile's other messages."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from pipeline.consent import ConsentAttributes
from pipeline.errors import ConfigError, describe, where
from pipeline.model import Outbox, ProfileState
from pipeline.observability import metrics
from pipeline.observability.logformat import message_context
from pipeline.profiles import outbox
from pipeline.profiles.deadlines import Deadlines
from pipeline.profiles.ops import OpResult
from pipeline.profiles.walk import META_PREFIX, Outcome, Walk, WalkPool, WalkSpec
from pipeline.runtime import BATCH_MAX, BATCH_WITHIN_S, DECODED_CACHE, DECODED_PER_BYTE, Runtime
from pipeline.segments import SegmentEngine, load_segments
from pipeline.segments.batch import batch_request, new_run_id
from pipeline.segments.sizes import AudienceSizes
from pipeline.stages.delivery import LocalItem
from pipeline.stages.messages import Batch, DefsCheck, ProfileMessage, Progress, Resume, Send, Tick, op_of
from pipeline.state.codec import (
    Forward,
    decode_profile,
    decode_profile_entry,
    encode_forward,
    encode_profile_within,
    peek_entry,
)
from pipeline.state.lru import BoundedCache
from pipeline.state.tables import PartitionedTable
from pipeline.topics import CONTROL_SEGMENTS, MEMBERSHIP_STATE_TOPIC, MEMBERSHIP_TOPIC, PROFILE_TOPIC

log = logging.getLogger(__name__)

# Batching amortises Faust's per-message cost and writes a profile once per batch, not once per message.
_WALKS = frozenset({Batch, DefsCheck})  # the messages that walk a whole partition, outside local delivery


class DecodedCache:
    """Decoded profiles by id, valid only while the stored bytes are exactly the ones we decoded or wrote:
    comparing the bytes is far cheaper than decoding a profile with its event history, and it stays
    correct across rebalances (another worker's write changes the bytes). Bounded by count and by an
    estimate of the memory the decoded profiles hold (DECODED_PER_BYTE times their encoded size), most
    recently used kept: profiles grow with their event history, a count alone would not bound memory."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self._d: BoundedCache[bytes, tuple[bytes, ProfileState]] = BoundedCache(size, max_bytes)

    @property
    def entries(self) -> BoundedCache[bytes, tuple[bytes, ProfileState]]:
        return self._d

    def load(self, key: bytes, raw: bytes | None) -> ProfileState | Forward | None:
        if raw is None:
            return None
        hit = self._d.get(key, None)
        if hit is not None and hit[0] == raw:
            self._d.touch(key)
            return hit[1]
        entry = decode_profile_entry(raw)
        if isinstance(entry, ProfileState):
            self.put(key, raw, entry)
        return entry

    def put(self, key: bytes, raw: bytes, profile: ProfileState) -> None:
        self._d.put(key, (raw, profile), len(raw) * DECODED_PER_BYTE)

    def drop(self, key: bytes) -> None:
        self._d.pop(key)


def register(rt: Runtime) -> None:
    table = rt.ptables["profiles"]
    cache = DecodedCache(*DECODED_CACHE)
    rt.caches["decoded-profiles"] = cache.entries
    deadlines = Deadlines()

    # one encoding for the change and the compacted current-membership table (a KTable, for backfills)
    assert rt.registry[MEMBERSHIP_TOPIC].codec_spec == rt.registry[MEMBERSHIP_STATE_TOPIC].codec_spec

    def send_membership(change: dict[str, Any]) -> None:
        pid = change["profile_id"]
        rt.send_encoded_once([(MEMBERSHIP_TOPIC, pid), (MEMBERSHIP_STATE_TOPIC, f"{pid}|{change['audience_id']}")],
                             change)

    sizes = rt.audience_sizes
    sizes.scan = lambda partition: _count_members(table, partition)

    def publish(res: OpResult) -> None:
        now = time.time()
        for change in res.changes:  # (few: most handlings change no membership)
            sizes.apply(table.partition(change.profile_id.encode()), (change,))
        for change in res.changes:
            rt.tally.add(metrics.MEMBERSHIP_CHANGES, change.audience_id, change.status, change.evaluation)
            metrics.END_TO_END_SECONDS.observe(max(0.0, now - change.event_time_ms / 1000))
            send_membership(change.to_dict())
        for send in res.sends:
            rt.send(send)
        for name, n in res.counters.items():
            rt.tally.add(metrics.PROFILE_EVENTS, name, n=n)

    def resend(box: Outbox) -> None:
        """Send an outbox's messages again (they may have been lost with the process that sent them)."""
        for topic, key, value in box.messages:
            if topic == MEMBERSHIP_TOPIC:
                send_membership(value)
            else:
                rt.send(Send(topic, key, value))
        rt.tally.add(metrics.PROFILE_EVENTS, "outbox_resent", n=len(box.messages))

    acks_written: dict[int, int] = {}  # partition -> this run's acknowledged epoch last written to its record
    stamped: dict[int, int] = {}  # partition -> the latest epoch this run stamped an outbox of it with

    def acks(partition: int) -> outbox.Acks:
        return outbox.Acks(rt.output.run, rt.output.acked_epoch,
                           lambda: table.get(partition, outbox.acks_key(partition)))

    def with_outbox(entry: ProfileState | Forward, box: Outbox | None) -> ProfileState | Forward:
        if isinstance(entry, Forward):
            return replace(entry, outbox=box)
        entry.outbox = box
        return entry

    def stamp(partition: int, entry: ProfileState | Forward, previous: Outbox | None,
              messages: list[outbox.Message]) -> ProfileState | Forward:
        """The entry to write, with its outbox: the previous one unless delivered, plus `messages`."""
        if previous is None and not messages:
            return with_outbox(entry, None)
        delivered = previous is not None and acks(partition).delivered(previous)
        box = outbox.stamp(previous, messages, rt.output.run, rt.output.epoch, delivered)
        if box is not None:
            stamped[partition] = box.epoch
        return with_outbox(entry, box)

    def record_acks() -> None:
        """For each partition this run stamped outboxes in: once its producer has acknowledged more epochs,
        write that to the partition's acknowledgement record (so that the next owner knows those outboxes
        are delivered and does not send them again)."""
        acked, active = rt.output.acked_epoch, table.active()
        for partition, latest in list(stamped.items()):
            if partition not in active:
                del stamped[partition]
            elif acked > acks_written.get(partition, 0):
                key = outbox.acks_key(partition)
                table.put(partition, key, outbox.encode_record(outbox.decode_record(table.get(partition, key)),
                                                               rt.output.run, acked))
                acks_written[partition] = acked
                if latest <= acked:
                    del stamped[partition]

    budget = rt.config.profile.datasets.limits.max_profile_bytes

    def write(partition: int, key: bytes, entry: ProfileState | Forward, stored: bytes | None) -> None:
        """Store the entry, unless its bytes are those stored already (a replayed duplicate changes nothing:
        no store write, no changelog record)."""
        if isinstance(entry, ProfileState):
            raw, dropped = encode_profile_within(entry, budget)
            if dropped:
                rt.tally.add(metrics.PROFILE_EVENTS, "events_dropped_over_budget", n=dropped)
            if raw != stored:
                table.put(partition, key, raw)
            cache.put(key, raw, entry)
            deadlines.note(entry.profile_id, entry.next_deadline_ms)
        else:
            table.put(partition, key, encode_forward(entry))
            cache.drop(key)

    def handle(items: list[LocalItem]) -> None:
        """Per profile: decode once, apply every message in arrival order, publish, write once.

        1. group the messages by (partition, key), keeping their order; 2. per group: load, handle each
        message and publish its output; 3. write the final entry once."""
        groups: dict[tuple[int, bytes], list[ProfileMessage]] = {}
        for partition, key, msg in items:
            groups.setdefault((partition, key), []).append(msg)
        for (partition, key), msgs in groups.items():
            started = time.perf_counter()
            # a profile id is generated (time and record id), never personal data: it may be logged
            with message_context(topic=PROFILE_TOPIC, partition=partition, profile_id=key.decode(errors="replace")):
                handle_group(partition, key, msgs)
            metrics.EVALUATION_SECONDS.observe((time.perf_counter() - started) / len(msgs))
        if stamped:
            record_acks()

    def handle_group(partition: int, key: bytes, msgs: list[ProfileMessage]) -> None:
        """One profile's messages in order, and its outbox (pipeline.profiles.outbox):
        1. load the entry; if its outbox was sent by another run and is not known delivered, send it again
           now (before this group's output: the order per key holds) and keep it, stamped in this epoch;
        2. handle each message and publish its output, keeping what the outbox must hold. A message whose
           handling fails (an exception, an output the producer refuses) is dead-lettered and the others go
           on: drop the decoded profile, which the failed message may have half changed; rebuild it from the
           stored value and the messages before the failed one (their output is sent already, so only their
           state is redone); go on after it;
        3. write the final entry once, with its outbox."""
        stored = table.get(partition, key)
        entry = cache.load(key, stored)
        changed = False
        pid = key.decode()
        previous = entry.outbox if entry is not None else None
        if previous is not None and acks(partition).resend_now(previous):
            resend(previous)
            previous, changed = Outbox(rt.output.run, rt.output.epoch, previous.messages), True
        kept: list[outbox.Message] = []
        failed: set[int] = set()
        for i, msg in enumerate(msgs):
            try:
                res = rt.processor.handle(pid, entry, msg)
                publish(res)
            except Exception as exc:  # noqa: BLE001 - one message never stops the stage
                cache.drop(key)
                rt.dead_letter_stage(PROFILE_TOPIC, key, msg, exc)
                failed.add(i)
                entry, redone = _rebuild(pid, stored, [m for j, m in enumerate(msgs[:i]) if j not in failed])
                changed = changed or redone
                continue
            if res.delete:  # an erasure: the entry goes, with its outbox (its messages are out already)
                entry, changed, previous, kept = None, True, None, []
            else:
                if res.changes or res.sends:
                    kept += outbox.messages_of(res.changes, res.sends)
                if res.write is not None:
                    entry, changed = res.write, True
            rt.tally.add(metrics.PROFILE_OPS, op_of(msg))
        if changed and entry is None and stored is not None:
            table.delete(partition, key)
            cache.drop(key)  # a deadline left scheduled finds no entry: its tick does nothing
        elif changed and entry is not None:
            entry = stamp(partition, entry, previous, kept)
            try:
                write(partition, key, entry, stored)
            except Exception as exc:  # noqa: BLE001 - e.g. a value the broker refuses: the store stays as it was
                cache.drop(key)
                rt.dead_letter_stage(PROFILE_TOPIC, key, msgs[-1] if msgs else Resume(pid=pid), exc)

    def _rebuild(pid: str, stored: bytes | None, done: list[ProfileMessage]) -> tuple[Any, bool]:
        """The profile as the stored value and the messages `done` leave it (their output is not sent again);
        if redoing them fails too, the stored value as it is."""
        entry: ProfileState | Forward | None = decode_profile_entry(stored) if stored is not None else None
        changed = False
        try:
            for msg in done:
                res = rt.processor.handle(pid, entry, msg)
                if res.delete:
                    entry, changed = None, True
                elif res.write is not None:
                    entry, changed = res.write, True
        except Exception as exc:  # noqa: BLE001
            log.error("profile %s: messages before a failed one could not be redone; keeping the stored value: "
                      "%s\n%s", pid, describe(exc), where(exc))
            return (decode_profile_entry(stored) if stored is not None else None), False
        return entry, changed

    rt.deliver_locally(PROFILE_TOPIC, table, handle)
    def restamp_walked(partition: int, o: Outcome) -> bytes | None:
        """A walk's profile to write, with its outbox (`handle_group` step 3 for the walk's output)."""
        messages = outbox.messages_of(o.result.changes, o.result.sends)
        if o.raw is None or not messages:
            return o.raw
        profile = decode_profile(o.raw)  # a walk only evaluates profiles
        stamp(partition, profile, profile.outbox, messages)
        return encode_profile_within(profile, budget)[0]

    def resume(partition: int, undelivered: list[bytes], in_flight: list[bytes]) -> None:
        """Profiles of a newly assigned partition that a crash may have left waiting: those whose outbox another
        run may not have delivered are handled with no message, which sends the outbox again (`handle_group`
        step 1); those with stitching in flight get a `resume` (pipeline.profiles.ops), which sends again
        what they wait on."""
        for key in undelivered:
            handle_group(partition, key, [])
        for key in in_flight:
            handle_group(partition, key, [Resume(pid=key.decode())])
        if undelivered or in_flight:
            log.info("partition %d: sent again the undelivered output of %d profiles; resumed stitching at %d",
                     partition, len(undelivered), len(in_flight))
            record_acks()

    walks = Walks(table, cache, deadlines, publish, WalkPool(n) if (n := rt.settings.walk_processes) else None,
                  acks, restamp_walked, resume, record_acks)
    if walks.pool is not None:
        rt.app.on_before_shutdown.connect(lambda *_a, **_k: walks.pool.close() if walks.pool else None)

        @rt.app.timer(10.0)
        async def stop_idle_walk_processes() -> None:
            if walks.pool is not None:
                walks.pool.close_if_idle()

    async def profiles(stream: Any) -> None:
        """Batches of messages; a batch/defs-check control op ends a run of data ops and runs on its own
        (it walks a whole partition and yields to the loop, so it stays outside local delivery)."""
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            run: list[LocalItem] = []
            for partition, key, msg in rt.decode_stage(PROFILE_TOPIC, events):
                if type(msg) in _WALKS:  # (a set lookup: isinstance on a Struct costs ~0.2 µs a class)
                    with rt.local_delivery():
                        handle(run)
                    run = []
                    if isinstance(msg, Batch):
                        await _batch(rt, walks, partition, msg)
                    else:
                        await _definitions_check(rt, walks, partition)
                    rt.tally.flush()
                    continue
                run.append((partition, key, msg))
            with rt.local_delivery():
                handle(run)

    rt.app.agent(rt.topic(PROFILE_TOPIC), name="profiles")(profiles)

    @rt.app.crontab(rt.settings.batch_cron, on_leader=True)
    async def scheduled_batch() -> None:
        """The daily batch run (PIPELINE_BATCH_CRON, UTC): every audience over every profile."""
        run = new_run_id("scheduled")
        log.info("scheduled batch run %s: requesting every partition", run)
        for part in range(rt.registry[PROFILE_TOPIC].partitions):
            rt.send(Send(PROFILE_TOPIC, run, batch_request(run, [], 0)), partition=part)

    ops_topic = rt.registry.name(PROFILE_TOPIC)
    checked: set[int] = set()
    segments_file = rt.settings.config_dir / "segments.yaml"
    seen_mtime = [segments_file.stat().st_mtime if segments_file.exists() else 0.0]

    @rt.app.timer(2.0)
    async def reload_definitions() -> None:
        """Audience definitions edited while running: load, swap the engine, re-check every partition.
        A file that does not load is logged (file, line, problem) and the current definitions stay."""
        try:
            mtime = segments_file.stat().st_mtime
        except OSError:
            return
        if mtime == seen_mtime[0]:
            return
        seen_mtime[0] = mtime
        try:
            audiences = load_segments(segments_file)
        except ConfigError as exc:
            log.error("segments not reloaded, keeping the current definitions: %s", exc)
            return
        rt.engine = SegmentEngine(audiences, history_retention_ms=rt.engine.history_retention_ms,
                                  carried_attributes=rt.engine.carried_attributes)
        rt.processor.engine = rt.engine
        log.info("segments reloaded: %d audiences; re-evaluating changed ones on every partition", len(audiences))
        checked.clear()  # the timer below sends a defs-check to each assigned partition again

    consent = ConsentAttributes(rt.settings.config_dir / "destinations.yaml")
    consent.refresh(strict=True)  # a broken file stops the start, naming file and line
    rt.engine.carried_attributes = consent.attributes

    @rt.app.timer(2.0)
    async def reload_consent_rules() -> None:
        """destinations.yaml edited while running: membership messages carry its consent attributes from now
        on (pipeline.consent). Nothing is re-evaluated: a destination checks its rule on the messages it gets."""
        if consent.refresh():
            rt.engine.carried_attributes = consent.attributes
            log.info("consent rules reloaded: membership messages carry %s", list(consent.attributes))

    @rt.app.timer(1.0)
    async def record_acknowledged() -> None:
        """Keep the acknowledgement records up to date when no batch comes to do it (an idle worker)."""
        if stamped and not rt.app.rebalancing:
            record_acks()

    @rt.app.timer(0.5)
    async def fire_deadlines() -> None:
        # each newly assigned partition checks the audience definitions once (through its own stream,
        # so it runs in order with that partition's other messages)
        for tp in rt.app.assignor.assigned_actives():
            if tp.topic == ops_topic and tp.partition not in checked:
                checked.add(tp.partition)
                rt.send(Send(PROFILE_TOPIC, "defs-check", DefsCheck()), partition=tp.partition)
        for pid in deadlines.due(rt.now_ms()):
            rt.send(Send(PROFILE_TOPIC, pid, Tick(pid=pid)))


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


def _defs_key(partition: int) -> bytes:
    return f"__cdp_defs__:{partition}".encode()


def _count_members(table: PartitionedTable, partition: int) -> Counter[str]:
    """Current members per audience in a held partition's store (pipeline.segments.sizes)."""
    counts: Counter[str] = Counter()
    for key, raw in table.store(partition).items():
        if not key.startswith(META_PREFIX):
            counts.update(peek_entry(raw).active)
    return counts


def _restore_partition(walks: Walks, sizes: AudienceSizes, partition: int) -> None:
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


async def _walk_partition(rt: Runtime, walks: Walks, partition: int, run: str, spec: WalkSpec,
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


async def _batch(rt: Runtime, walks: Walks, partition: int, msg: Batch) -> None:
    """A batch run over this partition: all audiences (or the listed ones), optionally only profiles
    changed since `since_ms` (incremental)."""
    audiences = msg.audiences or None
    spec = WalkSpec("batch", tuple(audiences) if audiences else None, msg.since_ms, evaluation=msg.kind)
    walk = await _walk_partition(rt, walks, partition, msg.run, spec, started_ms=msg.started_ms or 0)
    metrics.BATCH_PROFILES.inc(walk.seen)


async def _definitions_check(rt: Runtime, walks: Walks, partition: int) -> None:
    """Runs when a partition is assigned (and after a hot reload), in order with that partition's messages:
    0. restore the partition's pending deadlines;
    1. diff the stored fingerprints with the loaded definitions; 2. evaluate new/edited audiences over the
    partition's profiles and exit members of removed ones; 3. store the new fingerprints."""
    table = walks.table
    _restore_partition(walks, rt.audience_sizes, partition)
    key = _defs_key(partition)
    raw = table.get(partition, key)
    old = msgpack.unpackb(raw, raw=False) if raw else None
    changed, removed = rt.processor.definitions_diff(old)
    if changed or removed:
        log.info("partition %d: audience definitions changed (%d new/edited, %d removed): evaluating",
                 partition, len(changed), len(removed))
        spec = WalkSpec("definitions", tuple(changed), removed=tuple(removed), evaluation="definition")
        await _walk_partition(rt, walks, partition, f"defs-{partition}", spec)
    if old != rt.processor.fingerprints():
        table.put(partition, key, msgpack.packb(rt.processor.fingerprints()))
