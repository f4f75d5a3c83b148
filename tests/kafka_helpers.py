"""Test helpers on the real broker: produce records, collect a topic until a condition holds (with a deadline)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.clients import decode_message
from pipeline.connection import Kafka, client_config
from pipeline.topics import TopicRegistry


def produce(reg: TopicRegistry, bootstrap: Kafka, logical: str, values: Iterable[Any], *,
            key: Callable[[Any], str] | None = None, raw: bool = False) -> int:
    """Publish values (dicts encoded with the topic's codec, or raw bytes) and wait for delivery."""
    spec = reg[logical]
    p = Producer(client_config(bootstrap, {"linger.ms": 5, "acks": "all"}))
    errors: list[Any] = []
    n = 0
    for v in values:
        data = v if raw else spec.codec.encode(v)
        k = key(v) if key else (v.get("eventId") or v.get("recordId") or "") if isinstance(v, dict) else ""
        p.produce(spec.name, key=k.encode(), value=data, on_delivery=lambda e, m: errors.append(e) if e else None)
        n += 1
        p.poll(0)
    p.flush(30)
    assert not errors, errors
    return n


class Collector:
    """Reads a topic from the beginning into `messages` (decoded dicts) while the test waits on conditions."""

    def __init__(self, reg: TopicRegistry, bootstrap: Kafka, logical: str, **config: Any) -> None:
        """`config`: more consumer settings (e.g. `log_level=2` to keep a broker outage out of stderr)."""
        self.reg, self.logical = reg, logical
        spec = reg[logical]
        self.consumer = Consumer(client_config(bootstrap, {
            "group.id": f"test-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False, "auto.offset.reset": "earliest",
            **config}))
        md = self.consumer.list_topics(spec.name, timeout=10).topics[spec.name]
        self.consumer.assign([TopicPartition(spec.name, p, -2) for p in md.partitions])
        self.messages: list[dict[str, Any]] = []

    def poll(self, seconds: float = 0.2) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for msg in self.consumer.consume(500, timeout=0.1):
                if msg.error() is None:
                    self.messages.append(decode_message(self.reg, self.logical, msg))

    def values(self) -> list[Any]:
        return [m.get("value") for m in self.messages]

    def wait_for(self, condition: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 60,
                 what: str = "condition") -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(0.3)
            if condition(self.messages):
                return self.messages
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what} on {self.logical}; "
                             f"got {len(self.messages)} messages: {self.messages[-5:]}")

    def settle(self, quiet_s: float = 3.0, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Wait until no new message arrived for quiet_s (quiescence)."""
        deadline = time.monotonic() + timeout_s
        last_n, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            self.poll(0.3)
            if len(self.messages) != last_n:
                last_n, last_change = len(self.messages), time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                return self.messages
        return self.messages

    def close(self) -> None:
        self.consumer.close()


def wait_topic_ready(bootstrap: str, name: str, timeout_s: float = 30) -> None:
    """Until every partition of a just-created topic has a leader and answers its offsets: the broker's
    metadata lags a creation a little, and a client asking in between gets UNKNOWN_TOPIC_OR_PART."""
    from confluent_kafka import KafkaException

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "wait-topic-ready"})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            meta = consumer.list_topics(name, timeout=5).topics.get(name)
            try:
                if meta is not None and meta.error is None and meta.partitions and all(
                        p.leader >= 0 for p in meta.partitions.values()):
                    for p in meta.partitions:
                        consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5)
                    return
            except KafkaException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {name} not ready after {timeout_s}s")
            time.sleep(0.2)
    finally:
        consumer.close()


def wait_group_stable(bootstrap: str, group: str, members: int, timeout_s: float = 60) -> None:
    """Until the consumer group is stable with exactly `members` members."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = admin.describe_consumer_groups([group])[group].result()
        if d.state == ConsumerGroupState.STABLE and len(d.members) == members:
            return
        time.sleep(0.5)
    raise AssertionError(f"consumer group {group} not stable with {members} members")
