"""Reading a topic to its end (pipeline.kafka_reads): the one copy that backfills, snapshots and the tests use."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka_helpers import wait_topic_ready

from pipeline.kafka_reads import read_to_end
from pipeline.state.snapshot import read_changelog
from pipeline.topics import TopicRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def compacted_topic(bootstrap: str, partitions: int = 2) -> str:
    name = f"read-to-end-{uuid.uuid4().hex[:8]}"
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
