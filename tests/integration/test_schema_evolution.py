"""A schema evolves while records of its old version are still on the topic: a worker reads every version into
its own (reader) schema, old records get the new field's default, through a secured Schema Registry.

The pipeline's ExperienceEvent is the new version; the old one is the same record before `dataset` was added
(with its default, web-events). Producers use confluent-kafka's standard AvroSerializer, so subjects are named
`<topic>-value` as Confluent names them. The registry is the tests' fake
(tests/schema_registry_fake.py) over HTTPS with HTTP basic auth, which the worker reaches through
SCHEMA_REGISTRY_URL, _USERNAME, _PASSWORD_FILE and _CA_FILE with credentials that may read the ingest subjects
but not register under them, as a production role binding would give."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import SerializingProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import StringSerializer
from http_client import HTTP
from kafka_helpers import Collector
from schema_registry_fake import FakeSchemaRegistry

from pipeline.serde.avro import EmbeddedCatalog
from pipeline.serde.registry import SchemaRegistryConnection

pytestmark = pytest.mark.integration

PRODUCER, WORKER, PASSWORD = "sr-producer", "sr-worker", "sr-s3cret"


@pytest.fixture
def secured_registry(tmp_path: Path, registry: Any) -> Iterator[FakeSchemaRegistry]:
    """HTTPS, basic auth: producers may register anywhere, the worker may read every subject but register
    only under the topics it writes (a read-only role binding on the ingest subjects)."""
    r = FakeSchemaRegistry(tmp_path, users={PRODUCER: PASSWORD, WORKER: PASSWORD},
                           read_only={WORKER: (registry.name("ingest.events"), registry.name("ingest.profiles"))})
    r.start()
    yield r
    r.stop()


def event(eid: str, cookie: str, **extra: Any) -> dict[str, Any]:
    return {"eventId": eid, "timestamp": int(time.time() * 1000), "eventType": "pageView",
            "identityMap": {"ECID": [{"id": cookie, "primary": True, "authenticatedState": "ambiguous"}]},
            "ecid": None, "web": None, "product": None, "commerce": None, "fields": {}, **extra}


def publish(bootstrap: str, client: SchemaRegistryClient, schema: dict[str, Any], topic: str,
            values: list[dict[str, Any]]) -> None:
    """What a producer of that schema version does: AvroSerializer, auto-registering under `<topic>-value`."""
    producer = SerializingProducer({"bootstrap.servers": bootstrap, "key.serializer": StringSerializer(),
                                    "value.serializer": AvroSerializer(client, json.dumps(schema))})
    for v in values:
        producer.produce(topic, key=v["eventId"], value=v)
    assert producer.flush(15) == 0
    producer.close()  # not left to reconnect to the session's broker once it has stopped


def recent_events(url: str, cookie: str) -> list[tuple[str, str]]:
    """(event id, dataset) of the profile's recent events; [] until it exists."""
    try:
        r = HTTP.get(f"{url}/profiles", params={"namespace": "ECID", "id": cookie}, timeout=5)
    except httpx.HTTPError:
        return []
    return sorted((e["event_id"], e["dataset"]) for e in r.json()["recent_events"]) if r.status_code == 200 else []


def test_old_and_new_versions_of_an_event_are_read_into_the_new_one_through_a_secured_registry(
        registry, kafka_bootstrap, start_worker, secured_registry, tmp_path):
    current = EmbeddedCatalog().raw_schema("ExperienceEvent")
    old = copy.deepcopy(current)
    old["fields"] = [f for f in old["fields"] if f["name"] != "dataset"]
    newer = copy.deepcopy(current)  # and a producer already one version ahead of the pipeline
    newer["fields"].append({"name": "channel", "type": ["null", "string"], "default": None})
    conn = SchemaRegistryConnection(secured_registry.url, username=PRODUCER, password=PASSWORD,
                                    ca_file=secured_registry.ca_file)
    client = SchemaRegistryClient(conn.client_config())
    topic = registry.name("ingest.events")
    # Given events of the old version (no dataset) on the topic before the worker starts
    publish(kafka_bootstrap, client, old, topic, [event(f"old{i}", f"evo-{i}") for i in range(3)])
    # When a worker reads them through the registry (password from a file, the registry's CA), and events of
    # the current and of a newer version follow
    (tmp_path / "sr-password").write_text(PASSWORD + "\n")
    worker = start_worker(extra_env={
        "SCHEMA_REGISTRY_URL": secured_registry.url, "SCHEMA_REGISTRY_USERNAME": WORKER,
        "SCHEMA_REGISTRY_PASSWORD_FILE": str(tmp_path / "sr-password"),
        "SCHEMA_REGISTRY_CA_FILE": str(secured_registry.ca_file)})
    publish(kafka_bootstrap, client, current, topic,
            [event("cur0", "evo-0", dataset="app-events"), event("cur3", "evo-3", dataset="app-events")])
    publish(kafka_bootstrap, client, newer, topic, [event("new4", "evo-4", dataset="app-events", channel="app")])
    # Then every event is applied: the old ones with the new field's default, the others with their own value
    expected = {"evo-0": [("cur0", "app-events"), ("old0", "web-events")], "evo-1": [("old1", "web-events")],
                "evo-2": [("old2", "web-events")], "evo-3": [("cur3", "app-events")],
                "evo-4": [("new4", "app-events")]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(recent_events(worker.url, c) != e for c, e in expected.items()):
        assert worker.proc.poll() is None, worker.log()[-5000:]
        time.sleep(0.3)
    assert {c: recent_events(worker.url, c) for c in expected} == expected, worker.log()[-5000:]
    # And nothing was dead-lettered
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    dlq.poll(2)
    assert dlq.messages == []
    dlq.close()
    # And the three versions are registered under the topic's subject; the worker, whose credentials may only
    # read the ingest subjects, never tried to register there; no request went without the credentials
    assert len(secured_registry.subjects[f"{topic}-value"]) == 3
    assert f"{registry.name('ingest.profiles')}-value" not in secured_registry.subjects
    assert secured_registry.denied == []
    assert secured_registry.refused == 0
