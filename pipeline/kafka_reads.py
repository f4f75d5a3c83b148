"""The one way to read a topic to its end (every key's latest value, for compacted topics and changelogs) and to
keep following it."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from pipeline.backoff import Backoff
from pipeline.connection import Kafka, client_config
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# A follower's blocking wait for its next message, within which a stop is seen. No longer: confluent-kafka 2.16
# wakes a waiting poll every 200 ms anyway (to check for signals; measured: 5 wake-ups/s with poll(5.0) too).
FOLLOW_WAIT_S = 0.2
# Each metadata or watermark request while the follower starts (the broker may be away: it asks again).
FOLLOW_REQUEST_TIMEOUT_S = 2.0
FOLLOW_RETRY_FIRST_S, FOLLOW_RETRY_MAX_S = 0.5, 10.0
FOLLOW_BATCH = 500
# How long the broker holds a fetch that finds nothing new (librdkafka's default is 500 ms): a record that arrives
# is answered at once, so only an idle follower's round trips get fewer (measured: its fetching thread's CPU 1/3).
FOLLOW_FETCH_WAIT_MS = 5000


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
        starts, ends = watermarks(c, topic, timeout_s=10)
        if on_ends is not None:
            on_ends(sum(ends[p] - starts[p] for p in ends if ends[p] > starts[p]))
        for chunk in read_chunks(c, topic, starts, ends, timeout_s=timeout_s):
            yield from chunk
    finally:
        c.close()


def watermarks(consumer: Consumer, topic: str, *, timeout_s: float) -> tuple[dict[int, int], dict[int, int]]:
    """Each partition's low and high watermark (first offset, end), asked of the broker; PipelineError when
    the topic does not exist, KafkaException when the broker does not answer in time."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise PipelineError(f"topic {topic} does not exist (run `pipeline topics apply`)")
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for p in meta.partitions:
        starts[p], ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
    return starts, ends


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
    left = sum(ends[p] - starts[p] for p in todo)  # offsets still to pass (records, or gaps on a compacted topic)
    while todo:
        if time.monotonic() > deadline:
            raise ReadTimeout(f"reading {topic} did not reach its end in {timeout_s:.0f}s")
        chunk = []
        # (consume waits its whole timeout unless it gets as many as asked: never ask for more than is left)
        for m in consumer.consume(max(1, min(chunk_size, left)), 0.5):
            part = m.partition()
            if m.error() is not None or part is None or part not in todo:
                continue
            if (m.offset() or 0) < ends[part]:
                chunk.append(m)
        if chunk:
            yield chunk
        left = 0
        for tp in consumer.position([TopicPartition(topic, p) for p in list(todo)]):
            if tp.offset >= ends[tp.partition]:
                todo.discard(tp.partition)
            else:
                left += ends[tp.partition] - max(tp.offset, starts[tp.partition])


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


def follow(kafka: Kafka, topic: str, on_messages: Callable[[list[Message]], None], *, stop: threading.Event,
           caught_up: Callable[[], None] | None = None, error_cb: Callable[[Any], None] | None = None,
           group: str = "cdp-follow", wait_s: float = FOLLOW_WAIT_S,
           consumer_config: dict[str, Any] | None = None) -> None:
    """Read `topic` from its beginning, then keep following it until `stop` is set (blocking: run it in a
    thread). `on_messages` gets each batch (records and tombstones, in order per partition; never an error
    event); an exception it raises is logged and the follower goes on. In order:
    1. a consumer of a group of its own, committing nothing; librdkafka's errors go to `error_cb` (a worker
       counts connection errors instead of logging each);
    2. the partitions and their end offsets (`watermarks`); while the broker does not answer or the topic is
       missing, wait a growing delay (pipeline.backoff, or until `stop`) and ask again;
    3. assign every partition from its beginning;
    4. wait up to `wait_s` for a message (a blocking poll: an idle follower sleeps, and takes no CPU), take
       what else has already arrived without waiting, hand them to `on_messages`;
    5. the first time every partition's *position* reaches the end read in 2 (as `read_chunks`: the last
       offsets of a compacted topic may hold no record), call `caught_up`: at once for an empty topic;
    6. repeat 4-5 until `stop`, then close the consumer. A broker away meanwhile is librdkafka's to reconnect:
       the poll only finds nothing until it is back."""
    c = Consumer(client_config(kafka, {"group.id": f"{group}-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False,
                                       "enable.partition.eof": False, "fetch.wait.max.ms": FOLLOW_FETCH_WAIT_MS,
                                       **(consumer_config or {})},
                                 error_cb=error_cb))
    try:
        retry = Backoff(FOLLOW_RETRY_FIRST_S, FOLLOW_RETRY_MAX_S, jitter=True)
        failures = 0
        while True:
            try:
                starts, ends = watermarks(c, topic, timeout_s=FOLLOW_REQUEST_TIMEOUT_S)
                break
            except (KafkaException, PipelineError) as exc:
                failures += 1  # said once; the worker's outage watch reports a broker that stays away
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "following %s: its end offsets could not be read (%s); asking again", topic, exc)
                if stop.wait(retry.next()):
                    return
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        todo: list[TopicPartition] | None = [TopicPartition(topic, p) for p in ends if ends[p] > starts[p]]
        while not stop.is_set():
            if todo is not None:
                todo = [tp for tp in c.position(todo) if tp.offset < ends[tp.partition]] if todo else []
                if not todo:
                    todo = None
                    if caught_up is not None:
                        _call(topic, caught_up)
            first = c.poll(wait_s)
            if first is None:
                continue
            batch = [m for m in (first, *c.consume(FOLLOW_BATCH, 0)) if m.error() is None]
            if batch:
                _call(topic, on_messages, batch)
    finally:
        c.close()


def _call(topic: str, callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - a follower outlives one batch its caller could not handle
        log.exception("following %s: a batch could not be handled", topic)
