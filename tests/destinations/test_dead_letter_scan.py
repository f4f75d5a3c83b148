"""The destinations' dead-letter scan (depth, redrive) reads to the end with `kafka_reads.read_chunks` on a broker."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka_helpers import wait_topic_ready

from pipeline.destinations.base import Payload
from pipeline.destinations.deadletters import DeadLetters, Headers
from pipeline.destinations.lane import LogicalTopics, RunnerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def dead_letter_topic(bootstrap: str, partitions: int = 2) -> str:
    name = f"dest-dlq-scan-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(15)
    wait_topic_ready(bootstrap, name)
    return name


def payload(profile_id: str, destination: str = "hook") -> Payload:
    return Payload(destination=destination, profile_id=profile_id, audience_id="vip", kind="membership",
                   status="realized", identities={"CRMID": [f"C-{profile_id}"]}, attributes={"tier": "gold"},
                   idempotency_key=f"{profile_id}:vip", event_time_ms=1_000, source_emit_ms=1_005)


def letter(p: Payload) -> tuple[bytes, bytes, Headers]:
    """A dead letter as DeadLetters.write makes it: JSON payload, keyed by profile, `destination` header."""
    return (p.profile_id.encode(), json.dumps(p.to_dict()).encode(),
            [("destination", p.destination.encode()), ("reason", b"http 503")])


def dead_letters(bootstrap: str, topic: str, *, max_poll_records: int = 500,
                 consumer_config: dict[str, Any] | None = None) -> DeadLetters:
    return DeadLetters(bootstrap, LogicalTopics(), RunnerSettings(
        dead_letter_topic=topic, create_dead_letter_topic=False, max_poll_records=max_poll_records,
        consumer_config=consumer_config or {}))


async def test_a_dead_letter_topic_ending_with_a_transaction_marker_is_scanned_to_its_end(
        kafka_bootstrap: str) -> None:
    # Given a dead-letter topic whose partitions end with a transaction marker (no record at end - 1), holding
    # two of hook's dead letters, one of another destination's and a raw one of hook's (its source undecodable)
    topic = dead_letter_topic(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(15)
    producer.begin_transaction()
    for partition, p in [(0, payload("p1")), (1, payload("p2")), (1, payload("p3", "other"))]:
        key, value, headers = letter(p)
        producer.produce(topic, key=key, value=value, headers=headers, partition=partition)
    producer.produce(topic, key=b"p4", value=b"\x00not json", headers=[("destination", b"hook")], partition=0)
    producer.commit_transaction(15)
    dl = dead_letters(kafka_bootstrap, topic)
    # When its depth is measured and it is redriven (the test's 60 s timeout fails a scan waiting for end - 1)
    depth = await dl.depth("hook")
    redriven: list[Payload] = []

    async def deliver(chunk: list[Payload]) -> None:
        redriven.extend(chunk)

    counts = await dl.redrive("hook", deliver)
    # Then the depth counts hook's three, the redrive hands over its two payloads and skips the raw one
    assert depth == 3
    assert counts == (2, 1)
    assert sorted(redriven, key=lambda p: p.profile_id) == [payload("p1"), payload("p2")]
    # And the redrive group committed the end, past the markers: nothing is left, and a second redrive is empty
    assert await dl.depth("hook") == 0
    assert await dl.redrive("hook", deliver) == (0, 0)
    assert len(redriven) == 2


async def test_a_dead_letter_written_during_a_redrive_is_left_for_the_next_one(kafka_bootstrap: str) -> None:
    # Given one of hook's dead letters on partition 0 and many of another destination's on partition 1, read by
    # a consumer that fetches little at a time (so partition 0 is fetched again while partition 1 is read)
    topic = dead_letter_topic(kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    for partition, p in [(0, payload("p1"))] + [(1, payload(f"o{i}", "other")) for i in range(20)]:
        key, value, headers = letter(p)
        producer.produce(topic, key=key, value=value, headers=headers, partition=partition)
        producer.flush(15)
    dl = dead_letters(kafka_bootstrap, topic, max_poll_records=1, consumer_config={
        "queued.min.messages": 1, "max.partition.fetch.bytes": 1, "fetch.wait.max.ms": 10,
        "fetch.queue.backoff.ms": 5})
    redriven: list[Payload] = []

    async def fail_again(chunk: list[Payload]) -> None:
        # the receiver still refuses: the runner dead-letters the payloads anew (here on partition 0)
        redriven.extend(chunk)
        for p in chunk:
            key, value, headers = letter(p)
            producer.produce(topic, key=key, value=value, headers=headers, partition=0)
        assert producer.flush(15) == 0

    # When hook is redriven and its payload fails again
    first = await dl.redrive("hook", fail_again)
    # Then the new dead letter is not read in that redrive, but it is the next redrive's
    assert first == (1, 0)
    assert await dl.depth("hook") == 1
    assert await dl.redrive("hook", fail_again) == (1, 0)
    assert redriven == [payload("p1"), payload("p1")]
