"""Profile stage: applies pipeline.profiles.ops to messages keyed by profile id, emits memberships,
and fires time-driven re-evaluations (deadlines) through the same topic, so they run in order with the
profile's other messages. The thin stage: register, the handle loop and its write; the decoded cache is
`cache.py`, outbox stamping `outbox.py`, the walks over a partition `walks.py`, the timers `timers.py`."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.errors import describe, where
from pipeline.model import Outbox, ProfileState
from pipeline.observability import metrics
from pipeline.observability.logformat import message_context
from pipeline.profiles import outbox, timers
from pipeline.profiles.cache import DecodedCache
from pipeline.profiles.deadlines import Deadlines
from pipeline.profiles.ops import OpResult
from pipeline.profiles.walk import Outcome, WalkPool
from pipeline.profiles.walks import Walks, batch, count_members, definitions_check
from pipeline.runtime import DECODED_CACHE, DECODED_PER_BYTE, Runtime
from pipeline.stages.agents import Stage
from pipeline.stages.delivery import LocalItem
from pipeline.stages.messages import Batch, DefsCheck, ProfileMessage, Receipt, Resume, Send, op_of
from pipeline.state.codec import (
    Forward,
    decode_profile,
    decode_profile_entry,
    encode_forward,
    encode_profile_within,
)
from pipeline.topics import MEMBERSHIP_STATE_TOPIC, MEMBERSHIP_TOPIC, PROFILE_TOPIC, RECEIPTS_TOPIC

log = logging.getLogger(__name__)

# Batching writes a profile once per batch, not once per message.
_WALKS = frozenset({Batch, DefsCheck})  # the messages that walk a whole partition, outside local delivery


def register(rt: Runtime) -> list[Stage]:
    """The profile stage and its receipts, for the stage consumer (pipeline.stages.agents); also its timers."""
    table = rt.ptables["profiles"]
    cache = DecodedCache(*DECODED_CACHE, DECODED_PER_BYTE)
    rt.caches["decoded-profiles"] = cache.entries
    deadlines = Deadlines()

    # one encoding for the change and the compacted current-membership table (a KTable, for backfills)
    assert rt.registry[MEMBERSHIP_TOPIC].codec_spec == rt.registry[MEMBERSHIP_STATE_TOPIC].codec_spec

    def send_membership(change: dict[str, Any]) -> None:
        pid = change["profile_id"]
        rt.send_encoded_once([(MEMBERSHIP_TOPIC, pid), (MEMBERSHIP_STATE_TOPIC, f"{pid}|{change['audience_id']}")],
                             change)

    sizes = rt.audience_sizes
    sizes.scan = lambda partition: count_members(table, partition)

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

    stamps = outbox.Stamps(table, rt.output)
    # bound once: the handle loop calls them as it called the closures they were
    acks, stamp, record_acks, stamped = stamps.acks, stamps.stamp, stamps.record_acks, stamps.stamped

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

    async def profiles(items: list[LocalItem]) -> int:
        """A batch in order; a batch/defs-check control op ends a run of data ops and runs on its own (it
        walks a whole partition and yields to the loop, so it stays outside local delivery). Once the worker
        starts rebalancing during such a walk, the walk (it may have stopped early) and the rest are left for the
        partition's next owner."""
        run: list[LocalItem] = []
        for i, (partition, key, msg) in enumerate(items):
            if type(msg) in _WALKS:  # (a set lookup: isinstance on a Struct costs ~0.2 µs a class)
                with rt.local_delivery():
                    handle(run)
                run = []
                if isinstance(msg, Batch):
                    await batch(rt, walks, partition, msg)
                else:
                    await definitions_check(rt, walks, partition)
                rt.tally.flush()
                if rt.app.rebalancing:
                    return i
                continue
            run.append((partition, key, msg))
        with rt.local_delivery():
            handle(run)
        return len(items)

    async def receipts(items: list[LocalItem]) -> int:
        """Receipts (activation.receipts, from the destination runner; keyed by profile id, so on the profile's
        partition): anything else there is dead-lettered; a receipt on another partition than its profile's
        (a producer that did not key it by profile id with murmur2) is sent on to the profile's partition."""
        run: list[LocalItem] = []
        for partition, key, msg in items:
            if not isinstance(msg, Receipt):
                rt.dead_letter_stage(RECEIPTS_TOPIC, key, msg, ValueError(f"not a receipt: {op_of(msg)}"))
            elif table.partition(msg.pid.encode()) != partition:
                rt.send(Send(PROFILE_TOPIC, msg.pid, msg))
            else:
                run.append((partition, msg.pid.encode(), msg))
        with rt.local_delivery():
            handle(run)
        return len(items)

    timers.register(rt, walks, deadlines, stamps)
    return [Stage(PROFILE_TOPIC, table.active, profiles), Stage(RECEIPTS_TOPIC, table.active, receipts)]
