"""The one way to read a topic to its end: every key's latest value, for compacted topics and changelogs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline.connection import Kafka, client_config
from pipeline.errors import PipelineError


class ReadTimeout(PipelineError):
    """A topic was not read to its end in time (the broker is slow or away); worth trying again."""


def read_to_end(kafka: Kafka, topic: str, *, timeout_s: float = 120.0,
                consumer_config: dict[str, Any] | None = None) -> dict[bytes, bytes | None]:
    """Every key's latest value (None for a tombstone) of `topic`, read up to the end offsets taken at the
    start, with no consumer group offsets committed (`read_messages`)."""
    return {m.key() or b"": m.value() for m in read_messages(kafka, topic, timeout_s=timeout_s,
                                                              consumer_config=consumer_config)}


def read_messages(kafka: Kafka, topic: str, *, timeout_s: float = 120.0,
                  consumer_config: dict[str, Any] | None = None,
                  on_ends: Callable[[int], None] | None = None) -> Iterator[Any]:
    """Every message of `topic`, in order per partition, up to the end offsets taken at the start, with no
    consumer group offsets committed (`on_ends` is told how many offsets that spans): `read_chunks` from each
    partition's low watermark to its high one, by a consumer of a group of its own."""
    c = Consumer(client_config(kafka, {"group.id": f"cdp-read-{uuid.uuid4().hex[:12]}",
                                       "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                       **(consumer_config or {})}))
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise PipelineError(f"topic {topic} does not exist (run `pipeline topics apply`)")
        starts: dict[int, int] = {}
        ends: dict[int, int] = {}
        for p in meta.partitions:
            starts[p], ends[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if on_ends is not None:
            on_ends(sum(ends[p] - starts[p] for p in ends if ends[p] > starts[p]))
        for chunk in read_chunks(c, topic, starts, ends, timeout_s=timeout_s):
            yield from chunk
    finally:
        c.close()


def read_chunks(consumer: Consumer, topic: str, starts: dict[int, int], ends: dict[int, int], *,
                timeout_s: float = 120.0, chunk_size: int = 1000) -> Iterator[list[Any]]:
    """The messages of `topic` from `starts` up to (not including) `ends` per partition, in order per
    partition, one non-empty chunk per consume, read by the caller's `consumer` (its group, its settings,
    its commits: `read_positions` says what to commit). In order:
    1. assign the partitions with something left (a partition with none left is done);
    2. read from the start, keeping records below the end;
    3. a partition is done when the consumer's *position* reaches the end: on a compacted topic the last
       offsets before the end may have been removed (or be transaction markers), so no record with offset
       end - 1 ever comes, and waiting for one would hang or return partial state."""
    todo = {p for p in ends if ends[p] > starts[p]}
    if not todo:
        return
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
    deadline = time.monotonic() + timeout_s
    while todo:
        if time.monotonic() > deadline:
            raise ReadTimeout(f"reading {topic} did not reach its end in {timeout_s:.0f}s")
        chunk = []
        for m in consumer.consume(chunk_size, 0.5):
            part = m.partition()
            if m.error() is not None or part is None or part not in todo:
                continue
            if (m.offset() or 0) < ends[part]:
                chunk.append(m)
        if chunk:
            yield chunk
        for tp in consumer.position([TopicPartition(topic, p) for p in list(todo)]):
            if tp.offset >= ends[tp.partition]:
                todo.discard(tp.partition)


def read_positions(consumer: Consumer, topic: str, starts: dict[int, int],
                   ends: dict[int, int]) -> list[TopicPartition]:
    """How far `read_chunks` has read each partition it read, never past the end taken at the start (the
    consumer may have fetched later messages, which were not handed over): the offsets to commit."""
    todo = [TopicPartition(topic, p) for p in ends if ends[p] > starts[p]]
    if not todo:
        return []
    return [TopicPartition(topic, tp.partition,
                           min(tp.offset, ends[tp.partition]) if tp.offset >= 0 else starts[tp.partition])
            for tp in consumer.position(todo)]
