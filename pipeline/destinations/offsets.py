"""A consumer group's position on a topic against the topic's end: what is left to read."""

from __future__ import annotations

from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition


def bounds(consumer: Consumer, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(end offset, start offset) per partition: start = the consumer's group's committed offset, else low."""
    md = consumer.list_topics(topic, timeout=10)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        return {}, {}
    tps = [TopicPartition(topic, p) for p in meta.partitions]
    committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
    ends: dict[int, int] = {}
    starts: dict[int, int] = {}
    for tp in tps:
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        ends[tp.partition] = high
        c = committed.get(tp.partition, OFFSET_INVALID)
        starts[tp.partition] = max(c, low) if c is not None and c >= 0 else low
    return ends, starts
