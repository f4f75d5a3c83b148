"""A producer using confluent-kafka's standard AvroSerializer against a Schema Registry can publish to the
ingest topics, and the pipeline's decoder reads those records through the registry catalog.

No real registry runs on this machine (no Docker, none on the package registries), so the registry is
confluent-kafka's own in-process `mock://` client; the broker is real."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import SerializingProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import StringSerializer

from pipeline.ingest.decode import Decoder
from pipeline.model import ExperienceEvent, Identity
from pipeline.serde.avro import AvroCodec, EmbeddedCatalog, RegistryCatalog
from pipeline.settings import DEFAULT_CONFIG, PipelineConfig

pytestmark = pytest.mark.integration


def test_avro_serializer_records_decode_through_the_registry(registry, kafka_bootstrap):
    # Given a producer with the standard AvroSerializer and the ExperienceEvent schema from schemas/
    client = SchemaRegistryClient.new_client({"url": "mock://cdp-test"})
    raw_schema = EmbeddedCatalog().raw_schema("ExperienceEvent")
    producer = SerializingProducer({
        "bootstrap.servers": kafka_bootstrap, "key.serializer": StringSerializer(),
        "value.serializer": AvroSerializer(client, json.dumps(raw_schema))})
    now = int(time.time() * 1000)
    # When it publishes an event to the ingest topic
    producer.produce(registry.name("ingest.events"), key="e1", value={
        "eventId": "e1", "timestamp": now, "eventType": "productView", "dataset": "web-events",
        "identityMap": {"ECID": [{"id": "cookie-7", "primary": True}]}, "ecid": None, "web": None,
        "product": {"sku": "S", "name": None, "category": "shoes", "price": 10.0}, "commerce": None, "fields": {}})
    producer.flush(10)
    # Then the pipeline's decoder, resolving the schema id through the registry, gets the event
    catalog = RegistryCatalog("mock://cdp-test", client=client)
    cfg = PipelineConfig.load(DEFAULT_CONFIG)
    decoder = Decoder("event", AvroCodec("ExperienceEvent", catalog), cfg.profile.identity, cfg.profile.datasets)
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "sr-test", "enable.auto.commit": False})
    consumer.assign([TopicPartition(registry.name("ingest.events"), p, -2) for p in range(4)])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and m.error() is None:
            got = decoder.decode(m.value())
    consumer.close()
    assert got == ExperienceEvent("e1", now, "productView", "web-events", (Identity("ECID", "cookie-7"),),
                                  Identity("ECID", "cookie-7"),
                                  {"product.sku": "S", "product.category": "shoes", "product.price": 10.0})
