"""The real stitching handlers over in-memory partitioned tables, with chosen interleavings and crashes.

Kafka is modelled as it behaves for the stages: every (sender partition, target partition) pair is a FIFO
channel (one producer keeps order per partition), delivery from channels into a partition's log and the
handling of each partition's log happen in any interleaving the `choose` function picks. Two crash models:

- `crash_rate`: a crash rolls a partition's table back to its last commit and re-handles its log from there,
  while everything it had sent stays sent.
- `worker_crash_rate`, the one Kafka gives a worker (`workers` of them hold the partitions; the ingest
  partition is with worker 0): a worker flushes its producer and then commits its offsets
  (`checkpoint`); when it dies, each of its changelog partitions keeps a random *prefix* of the writes made
  since its last checkpoint (one idempotent producer per partition keeps order and leaves no gap), each of
  the channels it was sending on keeps a random prefix of what it had not yet flushed, and its partitions
  (ingest included) are handled again from their committed offsets over the state their changelogs give.
  With `local_delivery`, a message between two partitions of the same worker is delivered in-process, as
  the worker does (`Runtime.send`), unless the protocol wants it in its target's log
  (`pipeline.identity.stitch.in_process_allowed`: identity-stage messages, `link` and `absorb`): it was never in
  Kafka, so a crash loses it unless the worker checkpointed since, and only the input that caused it is
  handled again. A restarted worker resumes the profiles it finds with
  stitching in flight, as the profile agent does when it is assigned a partition.

Messages are typed (pipeline.stages.messages); one that goes through Kafka is round-tripped through its wire
form, one delivered in-process is the object itself, and table values go through the profile codec, as a
worker does.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from stitching import Rec

from pipeline.identity.stitch import apply_msg, handle_identity, in_process_allowed, start_resolve
from pipeline.model import ExperienceEvent, MembershipChange, ProfileRecord
from pipeline.privacy.erasure import erase_at_identity, start_erasure
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.stages import messages
from pipeline.stages.messages import Erase, Evaluate, Resume, Send, Tick, op_of, record_to_wire
from pipeline.state.codec import Forward, decode_profile_entry, encode_forward, encode_profile, peek_entry
from pipeline.state.snapshot import GraphSnapshot
from pipeline.state.tables import partition_for
from pipeline.topics import IDENTITY_TOPIC, PROFILE_TOPIC

Part = tuple[str, int]  # (stage topic, partition)
INGEST: Part = ("ingest", 0)
OUTSIDE: Part = ("outside", 0)  # a sender no worker holds (the erasure CLI): what it sent is in Kafka


@dataclass
class Log:
    """One partition: its message log, how far it is handled, its table and its last commit."""

    messages: list[Any] = field(default_factory=list)
    pos: int = 0
    table: dict[str, bytes] = field(default_factory=dict)
    committed: tuple[int, dict[str, bytes]] = (0, {})
    unflushed: list[tuple[str, bytes | None]] = field(default_factory=list)  # changelog since the last commit
    local: set[int] = field(default_factory=set)  # positions of messages delivered in-process

    def deliver(self, messages: Any, local: bool) -> None:
        for m in messages:
            if local:
                self.local.add(len(self.messages))
            self.messages.append(m)

    def write(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.table.pop(key, None)
        else:
            self.table[key] = value
        self.unflushed.append((key, value))


class StitchSim:
    def __init__(self, config: ProfileConfig, partitions: int = 4, fast_path: bool = True, workers: int = 1,
                 placement: random.Random | None = None, local_delivery: bool = False) -> None:
        self.config = config
        self.local_delivery = local_delivery
        self.partitions = partitions
        self.fast_path = fast_path
        self.now = 1_700_000_000_000
        self.processor = ProfileProcessor(config, SegmentEngine([]), lambda: self.now / 1000)
        self.logs: dict[Part, Log] = {(t, p): Log() for t in (IDENTITY_TOPIC, PROFILE_TOPIC)
                                      for p in range(partitions)}
        # (sender, target, in-process): a worker's messages to a partition it holds go in-process or, when the
        # protocol wants them in the target's log (`in_process_allowed`), through Kafka, as the worker sends them
        self.channels: dict[tuple[Part, Part, bool], deque[Any]] = {}
        self.pending: deque[Rec] = deque()
        self.changes: list[MembershipChange] = []
        self.crashes = 0
        self.handled = 0
        self.ops: Counter[str] = Counter()  # messages handled, by op
        self.ingest_log: list[tuple[Rec, int]] = []  # the ingest partition: records, how far handled, committed offset
        self.ingest_pos = self.ingest_committed = 0
        pick = placement or random.Random(0)
        self.worker_of: dict[Part, int] = {part: pick.randrange(workers) for part in self.logs}
        self.worker_of[INGEST] = 0
        self.worker_of[OUTSIDE] = -1
        self.workers = workers
        self.timer_rate = 0.0  # per step: a deadline timer sends a tick (or a walk an evaluation) to a stored profile

    # -- sending and handling -----------------------------------------------------------------------
    def _part(self, topic: str, key: str) -> Part:
        return (topic, partition_for(key.encode(), self.partitions))

    def _send(self, src: Part, send: Send) -> None:
        if send.topic not in (IDENTITY_TOPIC, PROFILE_TOPIC):
            return  # activation output: not part of stitching
        dst = self._part(send.topic, send.key)
        local = (self.local_delivery and self.worker_of[src] == self.worker_of[dst] and in_process_allowed(send))
        msg = send.value if local else messages.decode(messages.encode(send.value))
        self.channels.setdefault((src, dst, local), deque()).append((send.key, msg))

    def ingest(self, rec: Rec, ts: int | None = None) -> None:
        """What the ingest loop does with a decoded record: the home hop, locally if the owner is known.
        `ts`: the record's own time (a record read again after a crash carries the same)."""
        ids, ts = rec.ids, self.now if ts is None else ts
        decoded = (ExperienceEvent(rec.rid, ts, "pageView", "web-events", ids, ids[0], {})
                   if rec.kind == "e" else ProfileRecord(rec.rid, ts, "crm", ids, ids[0], {"tier": "gold"}))
        wire = record_to_wire(decoded)
        home = rec.home(self.config.identity.unique_namespaces).key
        owner = self.logs[self._part(IDENTITY_TOPIC, home)].table.get(home) if self.fast_path else None
        self._send(INGEST, apply_msg(owner.decode(), wire, home) if owner else start_resolve(wire, home, self.now))

    def erase(self, identity_key: str) -> None:
        """An erasure of the person `identity_key` names, as `pipeline privacy erase` requests it."""
        _request, sends = start_erasure(identity_key, b"salt", suppress=False, now_ms=self.now)
        for send in sends:
            self._send(OUTSIDE, send)

    def timer(self, rng: random.Random) -> None:
        """A profile's deadline comes due (a `tick`, sent by its partition's owner through Kafka), or a walk's
        evaluation reaches it: either may find it merging (held), forwarded (passed on, or dropped) or live."""
        parts = [part for part in self.logs if part[0] == PROFILE_TOPIC and self.logs[part].table]
        if parts:
            part = rng.choice(sorted(parts))
            pid = rng.choice(sorted(self.logs[part].table))
            self._send(part, Send(PROFILE_TOPIC, pid, Tick(pid=pid) if rng.random() < 0.8 else Evaluate()))

    def handle_next(self, part: Part, torn: random.Random | None = None) -> None:
        """Handle the next message of `part`. With `torn`, the worker dies in the middle of its output: the
        table write and each message sent land or not, independently, and the message is delivered again
        (it was never committed)."""
        log = self.logs[part]
        key, msg = log.messages[log.pos]
        log.pos += 1
        if torn is not None:
            log.messages.append((key, msg))
            self.crashes += 1
        def lands() -> bool:
            return torn is None or torn.random() < 0.5
        self.handled += 1
        self.ops[op_of(msg)] += 1
        if part[0] == IDENTITY_TOPIC:
            current = log.table.get(key)
            owner = current.decode() if current else None
            res = (erase_at_identity(key, owner, msg, self.now) if isinstance(msg, Erase)
                   else handle_identity(key, owner, msg))
            if lands():
                if res.write is not None:
                    log.write(key, res.write.encode())
                elif res.delete:
                    log.write(key, None)
            for s in res.sends:
                if lands():
                    self._send(part, s)
            return
        raw = log.table.get(key)
        out = self.processor.handle(key, decode_profile_entry(raw) if raw else None, msg)
        if lands():
            if out.delete:
                log.write(key, None)
            elif isinstance(out.write, Forward):
                log.write(key, encode_forward(out.write))
            elif out.write is not None:
                log.write(key, encode_profile(out.write))
        for s in out.sends:
            if lands():
                self._send(part, s)
        self.changes.extend(out.changes)

    # -- the scheduler ------------------------------------------------------------------------------
    def actions(self) -> list[tuple[str, Any]]:
        acts: list[tuple[str, Any]] = []
        if self.pending or self.ingest_pos < len(self.ingest_log):
            acts.append(("ingest", None))
        acts.extend(("deliver", ch) for ch, q in self.channels.items() if q)
        acts.extend(("handle", p) for p, log in self.logs.items() if log.pos < len(log.messages))
        return acts

    def step(self, rng: random.Random, crash_rate: float = 0.0, torn_rate: float = 0.0,
             worker_crash_rate: float = 0.0) -> bool:
        """One chosen action; False once nothing is left to do (quiescence)."""
        acts = self.actions()
        if not acts:
            return False
        self.now += rng.choice((0, 0, 1, 3))
        if crash_rate and rng.random() < crash_rate:
            self.crash(rng.choice(list(self.logs)))
            return True
        if worker_crash_rate:
            if rng.random() < worker_crash_rate:
                self.crash_worker(rng.randrange(self.workers), rng)
                return True
            if rng.random() < 0.05:
                self.checkpoint(rng.randrange(self.workers))
        elif rng.random() < 0.05:
            self.commit(rng.choice(list(self.logs)))
        if self.timer_rate and rng.random() < self.timer_rate:
            self.timer(rng)
        acts = self.actions() or acts  # a checkpoint may have emptied a channel
        kind, arg = rng.choice(acts)
        if kind == "deliver" and not self.channels[arg]:
            return True
        if kind == "ingest":
            if self.ingest_pos == len(self.ingest_log):
                self.ingest_log.append((self.pending.popleft(), self.now))
            self.ingest_pos += 1
            self.ingest(*self.ingest_log[self.ingest_pos - 1])
        elif kind == "deliver":
            self.logs[arg[1]].deliver([self.channels[arg].popleft()], self._local(arg))
        else:
            self.handle_next(arg, rng if torn_rate and rng.random() < torn_rate else None)
        return True

    def commit(self, part: Part) -> None:
        log = self.logs[part]
        log.committed = (log.pos, dict(log.table))
        log.unflushed = []

    def crash(self, part: Part) -> None:
        """The worker holding `part` dies: its table is what the changelog had at the last commit, and
        everything handled since is handled again (what it sent meanwhile stays sent)."""
        log = self.logs[part]
        log.pos, table = log.committed
        log.table = dict(table)
        log.unflushed = []
        self.crashes += 1

    @staticmethod
    def _local(channel: tuple[Part, Part, bool]) -> bool:
        return channel[2]

    def _parts_of(self, worker: int) -> list[Part]:
        return [part for part, w in self.worker_of.items() if w == worker]

    def checkpoint(self, worker: int) -> None:
        """The worker flushes its producer (everything it sent reaches its partition's log, its changelog
        writes are acknowledged), then commits the offsets it has handled."""
        parts = set(self._parts_of(worker))
        for (src, dst, local), q in self.channels.items():
            if src in parts:
                self.logs[dst].deliver(q, local)
                q.clear()
        for part in parts:
            if part == INGEST:
                self.ingest_committed = self.ingest_pos
            else:
                self.commit(part)
                # committed input's output is durable: the real worker handles what it delivers in-process
                # before it commits (or produces it), so nothing delivered before a checkpoint is lost
                self.logs[part].local.clear()

    def crash_worker(self, worker: int, rng: random.Random) -> None:
        """The worker dies (SIGKILL): 1. each of its changelogs keeps a prefix of its unflushed writes, which
        is the state a restart restores; 2. each channel it sends on keeps a prefix of its unflushed
        messages; 3. its partitions are handled again from their committed offsets."""
        parts = self._parts_of(worker)  # a list: the random draws below happen in a fixed order
        for part in parts:
            if part == INGEST:
                self.ingest_pos = self.ingest_committed
                continue
            log = self.logs[part]
            table = dict(log.committed[1])
            for key, value in log.unflushed[:rng.randint(0, len(log.unflushed))]:
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            log.table, log.unflushed = table, []
            log.pos = log.committed[0]
            log.committed = (log.pos, dict(table))
            # what was delivered in-process and not committed is gone with the process
            log.messages = log.messages[:log.pos] + [m for i, m in enumerate(log.messages)
                                                     if i >= log.pos and i not in log.local]
            log.local = {i for i in log.local if i < log.pos}
        for (src, _dst, local), q in self.channels.items():
            if src in parts:
                # a message to its own partitions the worker would have handled in-process: gone with it
                for _ in range(len(q) if local else rng.randint(0, len(q))):
                    q.pop()
        self.crashes += 1
        for part in parts:  # the restarted worker is assigned its partitions again
            if part[0] == PROFILE_TOPIC and self.local_delivery:
                log = self.logs[part]
                for key, raw in sorted(log.table.items()):
                    if peek_entry(raw).in_flight:
                        log.deliver([(key, Resume(pid=key))], local=True)

    def run(self, records: list[Rec] | tuple[Rec, ...], rng: random.Random, crash_rate: float = 0.0,
            max_steps: int = 2_000_000, torn_rate: float = 0.0, worker_crash_rate: float = 0.0) -> None:
        self.pending.extend(records)
        steps = 0
        while self.step(rng, crash_rate if steps < max_steps // 2 else 0.0,
                        torn_rate if steps < max_steps // 2 else 0.0,
                        worker_crash_rate if steps < max_steps // 2 else 0.0):
            steps += 1
            if steps > max_steps:
                raise AssertionError(f"no quiescence after {max_steps} steps")

    # -- the outcome --------------------------------------------------------------------------------
    def snapshot(self) -> GraphSnapshot:
        snap = GraphSnapshot({}, {}, {})
        for (topic, _), log in self.logs.items():
            for key, raw in log.table.items():
                if topic == IDENTITY_TOPIC:
                    snap.identities[key] = raw.decode()
                    continue
                entry = decode_profile_entry(raw)
                if isinstance(entry, Forward):
                    snap.forwards[key] = entry.into
                else:
                    snap.profiles[key] = entry
        return snap
