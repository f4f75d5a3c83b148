"""The stage consumer's handling of a fetched batch: decode, hand each topic's run to its stage, and the offsets it may commit."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import msgpack

from pipeline.runtime import Runtime
from pipeline.stages import messages
from pipeline.stages.agents import Stage, StageConsumer
from pipeline.stages.backlog import StageBacklog
from pipeline.stages.delivery import LocalItem
from pipeline.stages.messages import Claimed, Tick
from pipeline.topics import IDENTITY_TOPIC, INTERNAL_DLQ, PROFILE_TOPIC, TopicRegistry


class FakeOutput:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes, Any]] = []

    def produce(self, topic: str, key: bytes, value: bytes | None, headers: Any = None,
                partition: int | None = None, on_delivery: Any = None) -> None:
        self.produced.append((topic, key, dict(headers or {}).get("reason")))


class Msg:
    """A librdkafka message as the consumer returns it (the methods the stage consumer calls)."""

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self._t, self._p, self._o, self._k, self._v = topic, partition, offset, key, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return self._k

    def value(self) -> bytes:
        return self._v

    def error(self) -> None:
        return None


class Watermarks:
    def __init__(self, high: int) -> None:
        self.high = high

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return 0, self.high


def make_consumer(stop_after: int | None = None) -> tuple[StageConsumer, FakeOutput, list[tuple[str, int, str, str]]]:
    app = SimpleNamespace(rebalancing=False)
    out = FakeOutput()
    registry = TopicRegistry.load(prefix="u-")
    rt = Runtime(SimpleNamespace(app_id="u", worker_name="w", kafka_stats_interval_ms=1000),  # type: ignore[arg-type]
                 None, registry, app, None, None, out, stage_backlog=StageBacklog(10))  # type: ignore[arg-type]
    handled: list[tuple[str, int, str, str]] = []

    def stage(name: str) -> Any:
        async def handle(items: list[LocalItem]) -> int:
            n = len(items) if stop_after is None else min(stop_after, len(items))
            handled.extend((name, p, k.decode(), messages.op_of(m)) for p, k, m in items[:n])
            return n
        return handle

    def active() -> frozenset[int]:
        return frozenset({0, 1, 2, 3})

    sc = StageConsumer(rt, [Stage(IDENTITY_TOPIC, active, stage("identity")), Stage(PROFILE_TOPIC, active, stage("profile"))])
    sc._consumer = Watermarks(high=20)
    sc.assigned = frozenset((registry.name(t), p) for t in (IDENTITY_TOPIC, PROFILE_TOPIC) for p in range(4))
    return sc, out, handled


def test_a_batch_is_handed_to_each_stage_and_what_is_no_stage_message_is_dead_lettered() -> None:
    # Given a fetched batch: profile ops (a tick, an unknown op, bytes that are not msgpack, a claim) and an
    # identity message, interleaved as librdkafka returns partitions
    sc, out, handled = make_consumer()
    ops, ids = sc.rt.registry.name(PROFILE_TOPIC), sc.rt.registry.name(IDENTITY_TOPIC)
    batch = [Msg(ops, 0, 7, b"p0", messages.encode(Tick(pid="p0"))),
             Msg(ids, 2, 3, b"ECID:a", messages.encode(Claimed(pid="p9", claimant="p9", key="ECID:a"))),
             Msg(ops, 1, 4, b"p1", msgpack.packb({"op": "merge", "pid": "p1"})),
             Msg(ops, 2, 9, b"p2", b"\xc1"),
             Msg(ops, 3, 5, b"p3", messages.encode(Claimed(pid="p3", claimant="p3", key="ECID:b")))]
    # When the consumer handles it
    asyncio.run(sc._handle(batch))
    # Then each stage got its messages, typed, in order; the two others went to internal.dlq as they came
    assert handled == [("profile", 0, "p0", "tick"), ("profile", 3, "p3", "claimed"), ("identity", 2, "ECID:a", "claimed")]
    dlq = sc.rt.registry.name(INTERNAL_DLQ)
    assert out.produced == [(dlq, b"p1", b"handling-failed"), (dlq, b"p2", b"handling-failed")]
    # and every message counts as handled: the next offsets to commit, and how far behind each partition is
    assert sc.done == {(ops, 0): 8, (ops, 1): 5, (ops, 2): 10, (ops, 3): 6, (ids, 2): 4}
    assert sc.rt.stage_backlog.behind() == (20 - 8) + (20 - 5) + (20 - 10) + (20 - 6) + (20 - 4)


def test_messages_a_stage_did_not_handle_are_not_committed() -> None:
    # Given a stage that stops after the first message of a batch (the worker started rebalancing)
    sc, _, handled = make_consumer(stop_after=1)
    ops = sc.rt.registry.name(PROFILE_TOPIC)
    batch = [Msg(ops, 0, 7, b"p0", messages.encode(Tick(pid="p0"))),
             Msg(ops, 0, 8, b"p0", b"\xc1"),
             Msg(ops, 1, 4, b"p1", messages.encode(Tick(pid="p1"))),
             Msg(ops, 0, 9, b"p0", messages.encode(Tick(pid="p0")))]
    # When the consumer handles it
    asyncio.run(sc._handle(batch))
    # Then only the first message and the undecodable one right after it (dead-lettered in its place) count:
    # nothing of partition 1, nor the rest of partition 0, is committed (their next owner handles them)
    assert handled == [("profile", 0, "p0", "tick")]
    assert sc.done == {(ops, 0): 9}


def test_nothing_is_handled_once_the_worker_is_rebalancing() -> None:
    # Given a worker whose rebalance has started
    sc, out, handled = make_consumer()
    sc.rt.app.rebalancing = True
    ops = sc.rt.registry.name(PROFILE_TOPIC)
    # When a batch fetched before is handled
    asyncio.run(sc._handle([Msg(ops, 0, 7, b"p0", messages.encode(Tick(pid="p0")))]))
    # Then nothing is handled or counted
    assert (handled, sc.done, out.produced) == ([], {}, [])


def test_a_partition_the_stages_group_never_committed_starts_where_fausts_group_had_got_to(
        kafka_bootstrap: str, registry: TopicRegistry) -> None:
    # Given stage partitions: 0 committed by the stages group (at 5), 1 only by Faust's group (at 3, a
    # deployment from before the stage consumer), 2 by neither
    from confluent_kafka import Consumer, TopicPartition

    app_id = f"app-{uuid.uuid4().hex[:8]}"
    ids = registry.name(IDENTITY_TOPIC)

    def commit(group: str, partition: int, offset: int) -> None:
        c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
        c.commit(offsets=[TopicPartition(ids, partition, offset)], asynchronous=False)
        c.close()

    commit(f"{app_id}-stages", 0, 5)
    commit(app_id, 0, 1)
    commit(app_id, 1, 3)
    sc, _, _ = make_consumer()
    sc.rt.settings = SimpleNamespace(app_id=app_id, worker_name="w", kafka=kafka_bootstrap,  # type: ignore[assignment]
                                     kafka_stats_interval_ms=60_000)
    sc.group, sc._consumer = f"{app_id}-stages", None
    # When the consumer takes the three partitions
    starts = sc._starting_offsets([TopicPartition(ids, p) for p in (0, 1, 2)])
    # Then each starts where it should, and the stages group now holds a commit for each
    assert [(tp.partition, tp.offset) for tp in starts] == [(0, 5), (1, 3), (2, 0)]
    after = sc.consumer().committed([TopicPartition(ids, p) for p in (0, 1, 2)], timeout=30)
    assert [(tp.partition, tp.offset) for tp in after] == [(0, 5), (1, 3), (2, 0)]
    sc.close()
