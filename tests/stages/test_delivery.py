"""The in-process delivery loop (pipeline.stages.delivery) driving the real stitching handlers, as a worker does:
one worker holding every partition, its stage messages either handled in-process or produced to Kafka (here a
log per partition), checked against the plain reference (tests/stitching.py)."""

from __future__ import annotations

import random
from collections import deque

from stitching import CONFIG, Rec, World, check_world, generate_world

from pipeline.identity.stitch import apply_msg, handle_identity, in_process_allowed, start_resolve
from pipeline.model import ExperienceEvent, ProfileRecord
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.stages import messages
from pipeline.stages.delivery import LocalDelivery, LocalItem, Target
from pipeline.stages.messages import Send, op_of, record_to_wire
from pipeline.state.codec import Forward, decode_profile_entry, encode_forward, encode_profile
from pipeline.state.snapshot import GraphSnapshot
from pipeline.state.tables import partition_for
from pipeline.topics import IDENTITY_TOPIC, PROFILE_TOPIC

PARTITIONS = 4


class Worker:
    """The stages' agents in miniature: tables per partition, the real handlers, one LocalDelivery."""

    def __init__(self, held: set[int]) -> None:
        self.now = 1_700_000_000_000
        self.processor = ProfileProcessor(CONFIG, SegmentEngine([]), lambda: self.now / 1000)
        self.tables: dict[str, dict[str, bytes]] = {IDENTITY_TOPIC: {}, PROFILE_TOPIC: {}}
        self.kafka: dict[tuple[str, int], deque[tuple[str, bytes]]] = {
            (t, p): deque() for t in self.tables for p in range(PARTITIONS)}
        self.in_process: list[str] = []  # ops handled in-process, in order
        self.delivery = LocalDelivery(in_process_allowed, self.produce)
        # as the agents register: only the profile stage takes messages in-process
        self.delivery.register(PROFILE_TOPIC, Target(lambda key: partition_for(key, PARTITIONS), lambda: held,
                                                     self.profiles_in_process))

    def send(self, send: Send) -> None:
        if send.topic in self.tables and not self.delivery.offer(send):
            self.produce(send, partition_for(send.key.encode(), PARTITIONS))

    def produce(self, send: Send, partition: int) -> None:
        self.kafka[(send.topic, partition)].append((send.key, messages.encode(send.value)))

    def profiles_in_process(self, items: list[LocalItem]) -> None:
        for _p, key, msg in items:
            self.in_process.append(op_of(msg))
            self.handle(PROFILE_TOPIC, key.decode(), msg)

    def handle(self, topic: str, key: str, msg: messages.StageMessage) -> None:
        table = self.tables[topic]
        if topic == IDENTITY_TOPIC:
            current = table.get(key)
            res = handle_identity(key, current.decode() if current else None, msg)  # type: ignore[arg-type]
            if res.write is not None:
                table[key] = res.write.encode()
            elif res.delete:
                table.pop(key, None)
            sends = res.sends
        else:
            raw = table.get(key)
            out = self.processor.handle(key, decode_profile_entry(raw) if raw else None, msg)  # type: ignore[arg-type]
            if isinstance(out.write, Forward):
                table[key] = encode_forward(out.write)
            elif out.write is not None:
                table[key] = encode_profile(out.write)
            sends = out.sends
        for s in sends:
            self.send(s)

    def ingest(self, rec: Rec) -> None:
        """What the ingest loop does with a decoded record: the home hop, here if the home has an owner."""
        ids = rec.ids
        decoded = (ExperienceEvent(rec.rid, self.now, "pageView", "web-events", ids, ids[0], {}) if rec.kind == "e"
                   else ProfileRecord(rec.rid, self.now, "crm", ids, ids[0], {"tier": "gold"}))
        wire = record_to_wire(decoded)
        home = rec.home(CONFIG.identity.unique_namespaces).key
        owner = self.tables[IDENTITY_TOPIC].get(home)
        self.send(apply_msg(owner.decode(), wire, home) if owner else start_resolve(wire, home, self.now))

    def run(self, world: World, rng: random.Random) -> None:
        """Records in batches of 1-5 (one block each), and each Kafka message in a block of its own, in an
        order `rng` picks among the partitions (a partition's log in order)."""
        pending = deque(world.records)
        while True:
            logs = [part for part, q in self.kafka.items() if q]
            if pending and (not logs or rng.random() < 0.3):
                with self.delivery.block():
                    for _ in range(rng.randint(1, 5)):
                        if pending:
                            self.ingest(pending.popleft())
            elif logs:
                topic, p = rng.choice(logs)
                key, raw = self.kafka[(topic, p)].popleft()
                with self.delivery.block():
                    self.handle(topic, key, messages.decode(raw))
            else:
                return
            self.now += rng.choice((0, 1, 3))

    def snapshot(self) -> GraphSnapshot:
        snap = GraphSnapshot({}, {}, {})
        snap.identities.update({k: v.decode() for k, v in self.tables[IDENTITY_TOPIC].items()})
        for key, raw in self.tables[PROFILE_TOPIC].items():
            entry = decode_profile_entry(raw)
            if isinstance(entry, Forward):
                snap.forwards[key] = entry.into
            else:
                snap.profiles[key] = entry
        return snap


def test_customers_stitch_right_with_the_worker_s_in_process_delivery() -> None:
    in_process: set[str] = set()
    for seed in range(150):
        # Given generated customers, and one worker holding some or all of the profile partitions
        rng = random.Random(seed)
        world = generate_world(random.Random(seed), rng.randint(1, 6), households=0.5, hostile=0.2)
        worker = Worker(held={p for p in range(PARTITIONS) if seed % 4 == 0 or rng.random() < 0.6})
        # When their records are ingested in blocks, and the messages produced are handled in any order
        worker.run(world, random.Random(seed * 7 + 1))
        # Then the graph is right, and what went in-process was only what the protocol allows there
        rep = check_world(world, worker.snapshot())
        assert rep.problems == [], f"seed {seed}: {rep.line()}\n" + "\n".join(rep.problems[:20])
        in_process.update(worker.in_process)
    assert {"apply", "claimed", "taken", "accepted"} <= in_process
    assert not in_process & {"link", "absorb", "resolve", "claim", "repoint", "release"}
