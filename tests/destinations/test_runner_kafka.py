"""DestinationRunner against a real Kafka broker (the `kafka_bootstrap` fixture comes from tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from dest_helpers import dest_config, membership, profile_change
from http_receiver import Receiver

from pipeline.destinations.config import DestinationConfig
from pipeline.destinations.files import FileSettings
from pipeline.destinations.http import HttpSettings
from pipeline.destinations.runner import DestinationRunner, RunnerSettings

pytestmark = pytest.mark.integration


class PrefixTopics:
    """A TopicResolver like the lead's registry: logical name -> physical name (here: a run prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def name(self, logical: str) -> str:
        return f"{self.prefix}.{logical}"


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1)
                                    for n in names]).values():
        fut.result(timeout=30)
    # Wait until every partition has a leader, so the first produce does not stall on metadata.
    deadline = time.monotonic() + 30
    while True:
        md = admin.list_topics(timeout=10).topics
        if all(n in md and md[n].partitions and all(p.leader >= 0 for p in md[n].partitions.values())
               for n in names):
            return
        assert time.monotonic() < deadline, "topics got no leaders"
        time.sleep(0.05)


def produce(bootstrap: str, topic: str, messages: list[dict[str, Any]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    for m in messages:
        p.produce(topic, key=m["profile_id"].encode(), value=json.dumps(m).encode())
    assert p.flush(30) == 0


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


async def wait_until(cond: Callable[[], bool], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.05)


def configs(receiver: Receiver, tmp_path: Path) -> list[DestinationConfig]:
    hook = dest_config(name="hook", extra="    batch: {max_records: 20, max_age_ms: 20}\n"
                       "    retry: {max_attempts: 2, base_delay_ms: 5, max_delay_ms: 10}\n")
    hook = replace(hook, settings=replace(hook.settings_as(HttpSettings), url=receiver.base_url + "/hook"))
    stream = dest_config("kafka", name="stream", audiences='"*"')
    files = dest_config("file", name="files", extra="    format: jsonl\n")
    files = replace(files, settings=replace(files.settings_as(FileSettings), path=str(tmp_path / "exports")))
    return [hook, stream, files]


def fresh_topics(kafka_bootstrap: str) -> tuple[str, PrefixTopics, RunnerSettings]:
    """A unique run id, its prefixed topic names and runner settings, with the topics created."""
    run = f"t{uuid.uuid4().hex[:8]}"
    topics = PrefixTopics(run)
    settings = RunnerSettings(commit_interval_ms=200)
    create_topics(kafka_bootstrap, [topics.name(settings.membership_topic),
                                    topics.name(settings.profile_change_topic),
                                    topics.name("activation.out")])
    return run, topics, settings


async def test_runner_delivers_dead_letters_redrives_and_resumes(kafka_bootstrap: str, receiver: Receiver,
                                                                 tmp_path: Path) -> None:
    run, topics, settings = fresh_topics(kafka_bootstrap)
    # Given 60 vip/churn memberships, 10 of another audience, one without identities, a consent withdrawal
    members = [membership(f"p{i}", ["vip", "churn"][i % 2], t=i) for i in range(60)]
    others = [membership(f"o{i}", "other") for i in range(10)]
    nobody = [membership("anon", "vip", email=None, crm=None)]
    withdrawal = profile_change("p0", changed_attributes=["consents.email"], memberships=["vip"], consent="no",
                                key="withdraw-p0")
    produce(kafka_bootstrap, topics.name(settings.membership_topic), members + others + nobody)
    produce(kafka_bootstrap, topics.name(settings.profile_change_topic), [withdrawal])
    # And a receiver that refuses one batch for good (400) and then accepts
    receiver.plan("/hook", "400")
    runner = DestinationRunner(configs(receiver, tmp_path), kafka=kafka_bootstrap, topics=topics,
                               settings=settings)
    await runner.start()
    try:
        expected_hook = {m["idempotency_key"] for m in members} | {"withdraw-p0:consent-exit:vip"}
        # When the runner has consumed everything and committed
        def refused() -> int:
            return sum(len(r.body["records"]) for r in receiver.requests if r.outcome == "400")

        async def settled() -> bool:
            st = await runner.status()
            return all(s.lag == 0 for s in st.values()) and 0 < refused() == st["hook"].dead_letter_depth

        deadline = time.monotonic() + 60
        while not await settled():
            assert time.monotonic() < deadline, await runner.status()
            await asyncio.sleep(0.2)
        st = await runner.status()
        # Then the receiver got every key except the refused batch, which is on the dead-letter topic
        got = set(receiver.keys("/hook"))
        n_dead = refused()
        assert len(got) == len(expected_hook) - n_dead and got <= expected_hook
        dlq = read_all(kafka_bootstrap, topics.name("activation.dest-dlq"), n_dead)
        assert len(dlq) == n_dead
        assert dict(dlq[0].headers())["reason"] == b"http_400"
        assert {dict(m.headers())["destination"] for m in dlq} == {b"hook"}
        assert {json.loads(m.value())["idempotency_key"] for m in dlq} == expected_hook - got
        assert st["hook"].skipped == {"audience_not_activated": 10, "no_identity": 1}
        assert st["hook"].breaker == "closed" and st["hook"].last_delivery_ms is not None
        # And the kafka destination wrote all 71 activated records keyed by profile id
        out = read_all(kafka_bootstrap, topics.name("activation.out"), 71)
        assert len(out) == 71 and all(m.key().decode() == json.loads(m.value())["profile_id"] for m in out)

        # When the dead letters are redriven (the receiver is healthy now)
        assert await runner.redrive("hook") == n_dead
        # Then every key has arrived and the dead-letter depth is zero
        assert set(receiver.keys("/hook")) == expected_hook
        assert (await runner.status())["hook"].dead_letter_depth == 0
        assert await runner.redrive("hook") == 0
    finally:
        await runner.stop()

    # When the runner restarts and new messages arrive, only the new ones are delivered (offsets committed)
    before = len(receiver.keys("/hook"))
    produce(kafka_bootstrap, topics.name(settings.membership_topic), [membership("n1", "vip", key="new-1")])
    again = DestinationRunner(configs(receiver, tmp_path), kafka=kafka_bootstrap, topics=topics,
                              settings=settings)
    await again.start()
    try:
        await wait_until(lambda: "new-1" in receiver.keys("/hook"))
        assert receiver.keys("/hook")[before:] == ["new-1"]
    finally:
        await again.stop()


async def test_undecodable_messages_go_to_the_dead_letter_topic(kafka_bootstrap: str, receiver: Receiver,
                                                                tmp_path: Path) -> None:
    run, topics, settings = fresh_topics(kafka_bootstrap)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(topics.name(settings.membership_topic), key=b"x", value=b"\x00not json")
    assert p.flush(30) == 0
    produce(kafka_bootstrap, topics.name(settings.membership_topic), [membership("p1", "vip", key="ok-1")])
    hook = configs(receiver, tmp_path)[0]
    runner = DestinationRunner([hook], kafka=kafka_bootstrap, topics=topics, settings=settings)
    await runner.start()
    try:
        await wait_until(lambda: "ok-1" in receiver.keys("/hook"))
        dlq = read_all(kafka_bootstrap, topics.name("activation.dest-dlq"), 1)
        headers = dict(dlq[0].headers())
        assert dlq[0].value() == b"\x00not json" and headers["reason"].startswith(b"decode_error")
        assert headers["destination"] == b"hook"
        st = (await runner.status())["hook"]
        assert st.errors == {"decode": 1} and st.dead_lettered == 1 and st.dead_letter_depth == 1
        # A redrive cannot re-deliver a message that never decoded: it counts it and moves past it
        assert await runner.redrive("hook") == 0
        st = (await runner.status())["hook"]
        assert st.errors["redrive_undecodable"] == 1 and st.dead_letter_depth == 0
    finally:
        await runner.stop()
