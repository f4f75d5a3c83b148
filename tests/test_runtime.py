"""The runtime's one output path: in-process (local) delivery of stage messages, and the output producer's
flush, which waits for what was produced before it (on the real broker)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.runtime import DLQ_MAX_BYTES, OutputProducer, Runtime
from pipeline.stages.delivery import MAX_LOCAL_ROUNDS, LocalItem, Target
from pipeline.stages.messages import Absorb, Claim, Claimed, Link, Send, Tick, op_of
from pipeline.state.tables import partition_for
from pipeline.topics import IDENTITY_TOPIC, PROFILE_TOPIC, TopicRegistry


class FakeOutput:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes, int | None]] = []

    def produce(self, topic: str, key: bytes, value: bytes | None, headers: Any = None,
                partition: int | None = None, on_delivery: Any = None) -> None:
        self.produced.append((topic, key, partition))


class FakeTable:
    """Partitioner and assignment of a table with 4 partitions, of which `active` are held here."""

    def __init__(self, active: set[int]) -> None:
        self._active = frozenset(active)

    def partition(self, key: bytes) -> int:
        return partition_for(key, 4)

    def active(self) -> frozenset[int]:
        return self._active


def make_runtime(identity_active: set[int], profile_active: set[int]) -> tuple[Runtime, FakeOutput, list[Any]]:
    completed = asyncio.Event()
    completed.set()
    app = SimpleNamespace(rebalancing=False, tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed)))
    out = FakeOutput()
    rt = Runtime(None, None, TopicRegistry.load(prefix="u-"), app, None, None, out)  # type: ignore[arg-type]
    handled: list[Any] = []

    def identity(items: list[LocalItem]) -> None:
        handled.extend(("identity", p, key.decode(), op_of(msg)) for p, key, msg in items)

    def profiles(items: list[LocalItem]) -> None:  # a first hop sends the next message, as stages do
        for p, key, msg in items:
            handled.append(("profile", p, key.decode(), op_of(msg)))
            if key.startswith(b"first-"):
                n = key.decode().removeprefix("first-")
                rt.send(Send(PROFILE_TOPIC, f"pid-{n}", Tick(pid=f"pid-{n}")))

    for topic, table, handler in ((IDENTITY_TOPIC, FakeTable(identity_active), identity),
                                  (PROFILE_TOPIC, FakeTable(profile_active), profiles)):
        rt.delivery.register(topic, Target(table.partition, table.active, handler))
    return rt, out, handled


def test_messages_to_held_partitions_are_handled_in_process_and_others_are_produced() -> None:
    # Given a worker holding profile partitions 0 and 1
    rt, out, handled = make_runtime({0, 1, 2, 3}, {0, 1})
    firsts = [n for n in range(40) if partition_for(f"first-{n}".encode(), 4) in {0, 1}][:12]
    # When an agent's block sends one message to each of 12 held profiles
    with rt.local_delivery():
        for n in firsts:
            rt.send(Send(PROFILE_TOPIC, f"first-{n}", Tick(pid=f"first-{n}")))
        assert handled == []  # nothing runs before the block ends
    # Then every one was handled here, in order; each message they sent whose partition is held was handled
    # here in the next round, the others were produced to their topic (partitioned by key)
    held = [n for n in firsts if partition_for(f"pid-{n}".encode(), 4) in {0, 1}]
    assert 0 < len(held) < 12
    assert handled == ([("profile", partition_for(f"first-{n}".encode(), 4), f"first-{n}", "tick") for n in firsts]
                       + [("profile", partition_for(f"pid-{n}".encode(), 4), f"pid-{n}", "tick") for n in held])
    assert out.produced == [(rt.registry.name(PROFILE_TOPIC), f"pid-{n}".encode(), None)
                            for n in firsts if n not in held]


def test_identity_messages_links_and_absorbs_go_through_kafka_even_to_a_held_partition() -> None:
    # Given a worker holding every partition of both stages
    rt, out, handled = make_runtime({0, 1, 2, 3}, {0, 1, 2, 3})
    # When a block sends an identity-stage message, a merge's absorb and link, and a claim's answer
    with rt.local_delivery():
        rt.send(Send(IDENTITY_TOPIC, "ECID:a", Claim(pid="p1", ts=1)))
        rt.send(Send(PROFILE_TOPIC, "p1", Absorb(pid="p1", sender="p2", token="p2/1", state=b"")))
        rt.send(Send(PROFILE_TOPIC, "p2", Link(pid="p2", sender="p1")))
        rt.send(Send(PROFILE_TOPIC, "p1", Claimed(pid="p1", claimant="p1", key="ECID:a")))
    # Then only the answer was handled in-process: the others must be in their target's log, where a crash
    # cannot lose them or move them (pipeline.identity.stitch.in_process_allowed)
    assert handled == [("profile", partition_for(b"p1", 4), "p1", "claimed")]
    assert [(t, k) for t, k, _ in out.produced] == [(rt.registry.name(IDENTITY_TOPIC), b"ECID:a"),
                                                    (rt.registry.name(PROFILE_TOPIC), b"p1"),
                                                    (rt.registry.name(PROFILE_TOPIC), b"p2")]


def test_outside_a_block_or_during_a_rebalance_everything_goes_through_kafka() -> None:
    rt, out, handled = make_runtime({0, 1, 2, 3}, {0, 1, 2, 3})
    rt.send(Send(PROFILE_TOPIC, "pid-a", Tick(pid="pid-a")))
    rt.app.rebalancing = True
    with rt.local_delivery():
        rt.send(Send(PROFILE_TOPIC, "pid-b", Tick(pid="pid-b")))
    assert handled == []
    assert [k for _, k, _ in out.produced] == [b"pid-a", b"pid-b"]


def test_a_cycle_of_local_messages_is_cut_after_the_round_limit_and_produced() -> None:
    # Given a profile handler that always sends the message on to itself (a bug, or a forward cycle)
    rt, out, handled = make_runtime({0, 1, 2, 3}, {0, 1, 2, 3})

    def loop(items: list[LocalItem]) -> None:
        for _, key, msg in items:
            handled.append(len(handled))
            rt.send(Send(PROFILE_TOPIC, key.decode(), msg))

    rt.delivery.register(PROFILE_TOPIC, replace(rt.delivery.targets[PROFILE_TOPIC], handler=loop))
    with rt.local_delivery():
        rt.send(Send(PROFILE_TOPIC, "pid-x", Tick(pid="pid-x")))
    # Then it ran MAX_LOCAL_ROUNDS times in-process and the pending message left through Kafka
    assert handled == list(range(MAX_LOCAL_ROUNDS))
    assert out.produced == [(rt.registry.name(PROFILE_TOPIC), b"pid-x", partition_for(b"pid-x", 4))]


@pytest.mark.integration
def test_flush_waits_for_earlier_messages_only(kafka_bootstrap: str, registry: TopicRegistry) -> None:
    # Given an output producer with 5,000 messages in flight, and a callback for completed flushes
    producer = OutputProducer(kafka_bootstrap)
    flushed: list[int] = []
    producer.on_flushed.append(lambda: flushed.append(producer.acknowledged))
    topic = registry.name("ingest.dlq")
    for i in range(5000):
        producer.produce(topic, str(i).encode(), b"x" * 100)
    target = 5000

    async def scenario() -> tuple[float, int]:
        # When a flush starts while another task keeps producing without pause
        stop = asyncio.Event()

        async def keep_producing() -> int:
            n = 0
            while not stop.is_set():
                for _ in range(200):
                    producer.produce(topic, b"more", b"y" * 100)
                    n += 1
                await asyncio.sleep(0.001)
            return n

        task = asyncio.create_task(keep_producing())
        t0 = time.monotonic()
        await asyncio.wait_for(producer.flush(), timeout=30)
        took = time.monotonic() - t0
        stop.set()
        return took, await task

    took, more = asyncio.run(scenario())
    # Then it returned once the first 5,000 were acknowledged, although later messages were still queued
    assert producer.acknowledged >= target
    assert len(flushed) == 1 and flushed[0] >= target  # ran once, after the acknowledgements
    assert more > 0
    assert took < 30
    producer._p.flush(10)


def test_gc_policy_raises_thresholds_freezes_the_start_up_heap_and_every_pause_is_timed() -> None:
    import gc

    from pipeline.observability import metrics
    from pipeline.observability.memory import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()

    def collections(generation: str) -> float:
        return sum(s.value for m in metrics.GC_PAUSE_SECONDS.collect() for s in m.samples
                   if s.name.endswith("_count") and s.labels["generation"] == generation)

    try:
        # Given the worker's GC policy and pause timing
        metrics.watch_gc()
        metrics.watch_gc()  # idempotent: one callback
        tune_gc()
        # Then the thresholds are raised and what existed at start-up is out of the collector's sight
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        # When a full collection runs, then it is timed once, under generation 2
        full = collections("2")
        gc.collect()
        assert collections("2") == full + 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.callbacks.remove(metrics._on_gc)


class RecordingOutput(FakeOutput):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, bytes, bytes | None, dict[str, bytes]]] = []

    def produce(self, topic: str, key: bytes, value: bytes | None, headers: Any = None,
                partition: int | None = None, on_delivery: Any = None) -> None:
        self.sent.append((topic, key, value, dict(headers or {})))


def test_dead_letters_keep_a_null_as_null_and_a_huge_value_as_its_first_bytes() -> None:
    # Given the runtime's one dead-letter path
    rt, _, _ = make_runtime(set(), set())
    out = RecordingOutput()
    rt.output = out  # type: ignore[assignment]
    dlq = rt.registry.name("ingest.dlq")
    # When a null record, a small one and a 2 MB one are dead-lettered
    rt.dead_letter("ingest.dlq", "k1", None, "null-value", "no value")
    rt.dead_letter("ingest.dlq", "k2", b"abc", "not-avro", "bad bytes", {"source_offset": b"7"})
    rt.dead_letter("ingest.dlq", "k3", b"x" * 2_000_000, "record-too-large", "2000000 bytes")
    # Then the null stays null, the small one is whole, the huge one is cut with its original size given
    assert out.sent == [
        (dlq, b"k1", None, {"reason": b"null-value", "detail": b"no value", "original_size": b"0"}),
        (dlq, b"k2", b"abc", {"reason": b"not-avro", "detail": b"bad bytes", "original_size": b"3",
                              "source_offset": b"7"}),
        (dlq, b"k3", b"x" * DLQ_MAX_BYTES, {"reason": b"record-too-large", "detail": b"2000000 bytes",
                                            "original_size": b"2000000", "truncated": b"true"}),
    ]
