"""Reading a topic to its end and following it (pipeline.kafka_reads): the one copy that backfills, snapshots,
the worker's followers and the tests use."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka_helpers import wait_topic_ready

from pipeline.kafka_reads import follow, read_to_end
from pipeline.state.snapshot import read_changelog
from pipeline.topics import TopicRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def compacted_topic(bootstrap: str, partitions: int = 2, name: str | None = None) -> str:
    name = name or f"read-to-end-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1, config={"cleanup.policy": "compact"})])[name].result(15)
    wait_topic_ready(bootstrap, name)
    return name


def write_in_a_transaction(bootstrap: str, topic: str, records: list[tuple[bytes, bytes | None, int]]) -> None:
    """A transactional producer, as Kafka Streams' exactly-once writes changelogs: its commit marker takes the
    partition's last offset, so no record is ever read at `end - 1`, as after compaction removed the last ones."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"t-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(15)
    producer.begin_transaction()
    for key, value, partition in records:
        producer.produce(topic, key=key, value=value, partition=partition)
    producer.commit_transaction(15)


def test_a_topic_whose_last_offset_holds_no_record_is_read_to_its_end_without_waiting(kafka_bootstrap: str) -> None:
    # Given a compacted topic whose partitions end with a transaction marker, a key updated and one deleted
    topic = compacted_topic(kafka_bootstrap)
    write_in_a_transaction(kafka_bootstrap, topic, [
        (b"k1", b"v1", 0), (b"k2", b"v2", 0), (b"k1", b"v3", 0), (b"k3", b"x", 1), (b"k3", None, 1)])
    # When it is read to its end (the 60 s test timeout fails a read that waits for a record at end - 1)
    state = read_to_end(kafka_bootstrap, topic, timeout_s=120)
    # Then every key's latest value is there, the deleted one as a tombstone
    assert state == {b"k1": b"v3", b"k2": b"v2", b"k3": None}


def test_a_changelog_snapshot_leaves_deleted_keys_out_and_does_not_wait_for_a_missing_last_record(
        kafka_bootstrap: str, registry: TopicRegistry) -> None:
    # Given the identity changelog of this test's topics, ending with a transaction marker on each partition
    topic = registry.name("state.identity-changelog")
    partitions = registry["state.identity-changelog"].partitions
    write_in_a_transaction(kafka_bootstrap, topic, [
        *((f"ECID:c{p}".encode(), f"p{p}".encode(), p) for p in range(partitions)),
        (b"ECID:gone", b"p0", 0), (b"ECID:gone", None, 0)])
    # When the operators' snapshot reads it (with a timeout far past the test's)
    state = read_changelog(registry, kafka_bootstrap, "state.identity-changelog", timeout_s=120)
    # Then it has every live key, and not the deleted one
    assert state == {f"ECID:c{p}".encode(): f"p{p}".encode() for p in range(partitions)}


class Following:
    """`follow` in a thread, what it handed over kept in order: ("record", key, value) and ("caught up",)."""

    def __init__(self, bootstrap: str, topic: str, fail_on: bytes | None = None) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.errors: list[Any] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._fail_on = fail_on
        self.thread = threading.Thread(
            target=follow, args=(bootstrap, topic, self._on_messages),
            kwargs={"stop": self.stop, "caught_up": self._caught_up, "error_cb": self.errors.append}, daemon=True)
        self.thread.start()

    def _on_messages(self, batch: list[Message]) -> None:
        with self._lock:
            self.seen.extend(("record", m.key(), m.value()) for m in batch)
        if self._fail_on is not None and any(m.value() == self._fail_on for m in batch):
            raise RuntimeError("the caller could not handle this batch")

    def _caught_up(self) -> None:
        with self._lock:
            self.seen.append(("caught up",))

    def until(self, condition: Callable[[list[tuple[Any, ...]]], bool], timeout_s: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                seen = list(self.seen)
            if condition(seen):
                return seen
            time.sleep(0.05)
        raise AssertionError(f"not seen in {timeout_s:g} s; seen: {self.seen}")

    def stop_within(self) -> float:
        """Stop it; how long it took to end."""
        started = time.monotonic()
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return time.monotonic() - started


@pytest.fixture
def following() -> Iterator[Callable[..., Following]]:
    started: list[Following] = []

    def start(bootstrap: str, topic: str, **kw: Any) -> Following:
        started.append(Following(bootstrap, topic, **kw))
        return started[-1]

    yield start
    for f in started:
        f.stop.set()
    for f in started:
        f.thread.join(10)


def test_a_follower_reads_what_a_topic_holds_says_it_caught_up_then_sees_each_new_record(
        kafka_bootstrap: str, following: Callable[..., Following]) -> None:
    # Given a compacted topic whose partition ends with a transaction marker (no record at end - 1)
    topic = compacted_topic(kafka_bootstrap, partitions=1)
    write_in_a_transaction(kafka_bootstrap, topic, [(b"k1", b"v1", 0), (b"k2", b"v2", 0), (b"k1", None, 0)])
    # When it is followed
    f = following(kafka_bootstrap, topic)
    # Then every record, the tombstone too, comes before it says it caught up (not waiting for a record at end - 1)
    assert f.until(lambda seen: ("caught up",) in seen, 20) == [
        ("record", b"k1", b"v1"), ("record", b"k2", b"v2"), ("record", b"k1", None), ("caught up",)]
    # When a record is written later, Then it comes too, and the follower said it caught up once
    write_in_a_transaction(kafka_bootstrap, topic, [(b"k3", b"v3", 0)])
    assert f.until(lambda seen: len(seen) == 5) == [
        ("record", b"k1", b"v1"), ("record", b"k2", b"v2"), ("record", b"k1", None), ("caught up",),
        ("record", b"k3", b"v3")]


def test_a_follower_of_an_empty_topic_says_it_caught_up_and_stops_promptly(
        kafka_bootstrap: str, following: Callable[..., Following]) -> None:
    # Given an empty topic of two partitions, When it is followed, Then it has caught up with nothing read
    topic = compacted_topic(kafka_bootstrap)
    f = following(kafka_bootstrap, topic)
    assert f.until(lambda seen: bool(seen), 20) == [("caught up",)]
    # When it is stopped while it waits for a record, Then it ends within its poll's wait (0.2 s) and a close
    assert f.stop_within() < 1.5
    assert f.seen == [("caught up",)]


def test_a_follower_waits_for_its_topic_to_exist_and_outlives_a_batch_its_caller_fails_on(
        kafka_bootstrap: str, following: Callable[..., Following], caplog: pytest.LogCaptureFixture) -> None:
    # Given a follower of a topic not created yet, whose caller fails on the record "bad"
    name = f"follow-later-{uuid.uuid4().hex[:8]}"
    f = following(kafka_bootstrap, name, fail_on=b"bad")
    # When the topic is created (the follower asks again for its end offsets, backing off), Then it catches up
    compacted_topic(kafka_bootstrap, partitions=1, name=name)
    assert f.until(lambda seen: bool(seen), 30) == [("caught up",)]
    # When the record its caller fails on and then another are written, Then both came and the failure is logged
    write_in_a_transaction(kafka_bootstrap, name, [(b"k", b"bad", 0)])
    f.until(lambda seen: len(seen) == 2)
    write_in_a_transaction(kafka_bootstrap, name, [(b"k", b"good", 0)])
    assert f.until(lambda seen: len(seen) == 3) == [("caught up",), ("record", b"k", b"bad"), ("record", b"k", b"good")]
    assert [r.getMessage() for r in caplog.records if r.name == "pipeline.kafka_reads"][-1] == (
        f"following {name}: a batch could not be handled")


def test_a_follower_whose_broker_cannot_be_reached_says_so_once_and_stops_while_it_backs_off(
        following: Callable[..., Following], caplog: pytest.LogCaptureFixture) -> None:
    # Given a follower of a broker that is not there (a closed port)
    f = following("127.0.0.1:1", "control-nowhere")
    # When its first request for the end offsets has failed (one warning), and it is stopped while it backs off
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(r.name == "pipeline.kafka_reads" for r in caplog.records):
        time.sleep(0.02)
    # Then it ends without waiting out its backoff, having read nothing and said one warning
    assert f.stop_within() < 1.0
    assert f.seen == []
    assert [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records if r.name == "pipeline.kafka_reads"] == [
        ("WARNING", "following control-nowhere: its end offsets could not be read")]
