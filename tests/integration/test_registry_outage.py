"""A Schema Registry outage is waited out (issue 14, item 3): records with a schema the worker has not seen
yet are held, not dead-lettered, while the registry cannot be asked; /readyz says so; they are applied once it
answers again.

The worker talks to the tests' fake registry (tests/schema_registry_fake.py), closed for the outage (connection
refused) and opened again on the same port. The broker is the session's."""

from __future__ import annotations

import copy
import re
import struct
import time
from io import BytesIO
from typing import Any

import fastavro
import httpx
import pytest
from http_client import HTTP
from kafka_helpers import Collector, produce
from schema_registry_fake import FakeSchemaRegistry

from pipeline.serde.avro import EmbeddedCatalog

pytestmark = pytest.mark.integration


@pytest.fixture
def fake_registry() -> Any:
    r = FakeSchemaRegistry()
    r.start()
    yield r
    r.stop()


def newer_event_schema() -> dict[str, Any]:
    """ExperienceEvent with one more optional field: what another producer's newer version looks like."""
    schema = copy.deepcopy(EmbeddedCatalog().raw_schema("ExperienceEvent"))
    schema["fields"].append({"name": "channel", "type": ["null", "string"], "default": None})
    return schema


def encode(schema: dict[str, Any], sid: int, value: dict[str, Any]) -> bytes:
    out = BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(copy.deepcopy(schema)), value)
    return struct.pack(">bI", 0, sid) + out.getvalue()


def event(eid: str, cookie: str, **extra: Any) -> dict[str, Any]:
    return {"eventId": eid, "timestamp": int(time.time() * 1000), "eventType": "pageView", "dataset": "web-events",
            "identityMap": {"ECID": [{"id": cookie}]}, "ecid": None, "web": None, "product": None, "commerce": None,
            "fields": {}, **extra}


def get(url: str, path: str, **params: str) -> httpx.Response | None:
    try:
        return HTTP.get(f"{url}{path}", params=params, timeout=5)
    except httpx.HTTPError:  # the event loop did not answer in time (a registry client sleeping on it)
        return None


def events_of(url: str, cookie: str) -> list[str]:
    r = get(url, "/profiles", namespace="ECID", id=cookie)
    return sorted(e["event_id"] for e in r.json()["recent_events"]) if r is not None and r.status_code == 200 else []


def readyz(url: str) -> tuple[int, Any]:
    r = get(url, "/readyz")
    if r is None:
        return 0, {}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {}


def wait(what: str, check: Any, worker: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, f"the worker exited while waiting for {what}:\n{worker.log()[-5000:]}"
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what}: not after {timeout_s}s:\n{worker.log()[-5000:]}")


def test_records_with_a_new_schema_wait_for_the_registry_instead_of_being_dead_lettered(
        registry, kafka_bootstrap, start_worker, fake_registry):
    # Given a worker reading its schemas from a Schema Registry (where the producer registered its own), and
    # applying events
    fake_registry.add(EmbeddedCatalog().raw_schema("ExperienceEvent"), registry.name("ingest.events") + "-value")
    worker = start_worker(extra_env={"SCHEMA_REGISTRY_URL": fake_registry.url})
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    produce(registry, kafka_bootstrap, "ingest.events", [event("e0", "rc-0")])
    wait("the first event applied", lambda: events_of(worker.url, "rc-0") == ["e0"], worker)
    newer = newer_event_schema()
    sid = fake_registry.add(newer)  # registered by the other producer, never seen by the worker
    # When the registry goes away, and events arrive written with that newer schema (and older ones after)
    fake_registry.stop()
    newer_events = [encode(newer, sid, event(f"n{i}", f"rc-{i}", channel="app")) for i in range(1, 6)]
    produce(registry, kafka_bootstrap, "ingest.events", newer_events, raw=True, key=lambda _v: "one-partition")
    produce(registry, kafka_bootstrap, "ingest.events", [event("after", "rc-1")], key=lambda _v: "one-partition")
    # Then they are not dead-lettered: the worker says it is not ready, for that reason, and stays up
    def held_or_dead_lettered() -> bool:
        dlq.poll(0.2)
        return bool(dlq.messages) or readyz(worker.url)[0] == 503

    wait("the records held or dead-lettered", held_or_dead_lettered, worker)
    assert [m["headers"]["reason"] for m in dlq.messages] == []
    status, body = readyz(worker.url)
    assert body["ready"] is False and any(r.startswith("schema-registry:") for r in body["reasons"]), body
    assert events_of(worker.url, "rc-2") == []  # held, not applied without its schema

    def unavailable_for() -> int:
        reasons = readyz(worker.url)[1].get("reasons", [])
        found = [re.search(r"unavailable for (\d+) s", r) for r in reasons if r.startswith("schema-registry:")]
        return int(found[0].group(1)) if found and found[0] else 0

    # (the reason's time is updated at each retry, 1, 2, 4, 8 ... s apart with jitter: waiting to see 6 s
    # often meant seeing it only at the 11 s retry, and the registry's return was then noticed at ~25 s)
    wait("the registry asked again with backoff for 3 s", lambda: unavailable_for() >= 3, worker)
    assert events_of(worker.url, "rc-2") == []
    # And when the registry answers again (same address), every held record is applied, in order, once
    fake_registry.start()
    wait("the held records applied", lambda: all(events_of(worker.url, f"rc-{i}") == (
        ["after", "n1"] if i == 1 else [f"n{i}"]) for i in range(1, 6)), worker, 90)
    wait("ready again", lambda: readyz(worker.url)[0] == 200, worker)
    assert sid in fake_registry.gets
    # And nothing was dead-lettered, and the log has a few lines about it
    dlq.poll(2)
    assert dlq.messages == [], dlq.messages[:3]
    lines = [line for line in worker.log().splitlines() if "Schema Registry" in line]
    assert 2 <= len(lines) <= 10, lines
    dlq.close()
