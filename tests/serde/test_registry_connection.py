"""Tests of the Schema Registry connection: environment and file, validation, what the client gets, subject names."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.errors import ConfigError
from pipeline.local.cluster import make_tls
from pipeline.serde.avro import AvroCodec, RegistryCatalog
from pipeline.serde.registry import SchemaRegistryConnection


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return make_tls(tmp_path)[1]


def test_no_url_means_no_registry() -> None:
    assert SchemaRegistryConnection.from_env({}) is None


def test_a_plain_url_gives_the_client_its_url_and_the_outage_settings() -> None:
    conn = SchemaRegistryConnection.from_env({"SCHEMA_REGISTRY_URL": "http://sr:8081"})
    assert conn is not None and conn.subject_strategy == "topic-name"
    assert conn.client_config() == {"url": "http://sr:8081", "max.retries": 0, "timeout": 5}
    assert conn.describe() == "http://sr:8081 (no auth, topic-name subjects)"


def test_basic_auth_and_a_ca_from_the_environment_reach_the_client_and_no_description(ca: Path) -> None:
    # Given a secured registry's settings in the environment
    env = {"SCHEMA_REGISTRY_URL": "https://sr1:8081,https://sr2:8081", "SCHEMA_REGISTRY_USERNAME": "APIKEY1",
           "SCHEMA_REGISTRY_PASSWORD": "s3cret", "SCHEMA_REGISTRY_CA_FILE": str(ca),
           "SCHEMA_REGISTRY_SUBJECT_STRATEGY": "Record-Name"}
    conn = SchemaRegistryConnection.from_env(env)
    assert conn is not None
    # Then confluent-kafka's client gets them under its own keys, and accepts them (it rejects unknown ones)
    assert conn.client_config() == {"url": "https://sr1:8081,https://sr2:8081", "max.retries": 0, "timeout": 5,
                                    "basic.auth.user.info": "APIKEY1:s3cret", "ssl.ca.location": str(ca)}
    client = SchemaRegistryClient(conn.client_config())
    assert client._rest_client.auth == ("APIKEY1", "s3cret")
    # And the secret is in no description of it
    assert "s3cret" not in repr(conn) and "s3cret" not in conn.describe()
    assert conn.describe() == (f"https://sr1:8081,https://sr2:8081 (basic auth as APIKEY1, CA {ca}, "
                               "record-name subjects)")


@pytest.mark.parametrize(("value", "strategy"), [
    ("topic-name", "topic-name"), ("Record-Name", "record-name"), ("TopicRecordNameStrategy", "topic-record-name"),
    ("io.confluent.kafka.serializers.subject.RecordNameStrategy", "record-name")])
def test_the_strategy_is_named_as_confluent_names_it(value: str, strategy: str) -> None:
    conn = SchemaRegistryConnection.from_env({"SCHEMA_REGISTRY_URL": "http://sr",
                                              "SCHEMA_REGISTRY_SUBJECT_STRATEGY": value})
    assert conn is not None and conn.subject_strategy == strategy


def test_the_password_can_come_from_a_file_and_the_environment_overrides_the_config_file(tmp_path: Path) -> None:
    # Given a config file with a password file, and an environment that sets the URL again
    (tmp_path / "pw").write_text("from-file\n")
    f = tmp_path / "registry.yaml"
    f.write_text(f"url: https://sr:8081\nusername: svc\npassword_file: {tmp_path / 'pw'}\n"
                 "subject_strategy: topic-record-name\n")
    # When it is read
    conn = SchemaRegistryConnection.from_env({"PIPELINE_SCHEMA_REGISTRY_CONFIG": str(f),
                                              "SCHEMA_REGISTRY_URL": "https://other:8081"})
    # Then the environment wins, the password is the file's first line
    assert conn is not None
    assert (conn.url, conn.username, conn.password, conn.subject_strategy) == (
        "https://other:8081", "svc", "from-file", "topic-record-name")


@pytest.mark.parametrize(("env", "problem"), [
    ({"SCHEMA_REGISTRY_URL": "sr:8081"},
     "SCHEMA_REGISTRY_URL 'sr:8081' is not a URL list; each one starts with http://, https://, mock://"),
    ({"SCHEMA_REGISTRY_URL": "https://key:secret@sr:8081"},
     "SCHEMA_REGISTRY_URL carries credentials: set SCHEMA_REGISTRY_USERNAME and SCHEMA_REGISTRY_PASSWORD instead"),
    ({"SCHEMA_REGISTRY_URL": "http://sr", "SCHEMA_REGISTRY_SUBJECT_STRATEGY": "ByTopic"},
     "SCHEMA_REGISTRY_SUBJECT_STRATEGY 'ByTopic' is not one of topic-name, record-name, topic-record-name"),
    ({"SCHEMA_REGISTRY_URL": "http://sr", "SCHEMA_REGISTRY_USERNAME": "svc"},
     "SCHEMA_REGISTRY_USERNAME and SCHEMA_REGISTRY_PASSWORD go together (HTTP basic auth)"),
    ({"SCHEMA_REGISTRY_URL": "http://sr", "SCHEMA_REGISTRY_USERNAME": "a:b", "SCHEMA_REGISTRY_PASSWORD": "c"},
     "SCHEMA_REGISTRY_USERNAME must not contain ':'"),
    ({"SCHEMA_REGISTRY_URL": "http://sr", "SCHEMA_REGISTRY_CA_FILE": "/nowhere/ca.pem"},
     "SCHEMA_REGISTRY_CA_FILE /nowhere/ca.pem is not a readable file"),
    ({"SCHEMA_REGISTRY_URL": "http://sr", "SCHEMA_REGISTRY_USERNAME": "svc",
      "SCHEMA_REGISTRY_PASSWORD_FILE": "/nowhere/pw"},
     "SCHEMA_REGISTRY_PASSWORD_FILE /nowhere/pw cannot be read"),
    ({"SCHEMA_REGISTRY_USERNAME": "svc", "SCHEMA_REGISTRY_PASSWORD": "s3cret"},
     "SCHEMA_REGISTRY_USERNAME, SCHEMA_REGISTRY_PASSWORD set without SCHEMA_REGISTRY_URL"),
])
def test_a_bad_setting_names_the_variable_and_the_valid_values(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        SchemaRegistryConnection.from_env(env)
    assert problem in str(info.value) and "s3cret" not in str(info.value)


def test_a_bad_file_names_the_file_the_key_and_the_line(tmp_path: Path) -> None:
    f = tmp_path / "registry.yaml"
    f.write_text("url: http://sr\nsubject_stratgy: record-name\n")
    with pytest.raises(ConfigError) as info:
        SchemaRegistryConnection.from_env({"PIPELINE_SCHEMA_REGISTRY_CONFIG": str(f)})
    assert f"{f}:2:1: Schema Registry connection: unknown key 'subject_stratgy'" in str(info.value)
    f.write_text("url: http://sr\nsubject_strategy: by-topic\n")
    with pytest.raises(ConfigError) as info:
        SchemaRegistryConnection.from_env({"PIPELINE_SCHEMA_REGISTRY_CONFIG": str(f)})
    assert f"{f}: subject_strategy 'by-topic' is not one of topic-name" in str(info.value)


@pytest.mark.parametrize(("strategy", "subject"), [
    ("topic-name", "t1.cdp.ingest.events-value"),
    ("record-name", "cdp.ExperienceEvent"),
    ("topic-record-name", "t1.cdp.ingest.events-cdp.ExperienceEvent"),
])
def test_subjects_are_named_as_confluents_serializers_name_them(strategy: str, subject: str) -> None:
    # Given a registry catalog with that strategy (confluent-kafka's in-process mock registry)
    conn = SchemaRegistryConnection("mock://subjects-" + strategy, subject_strategy=strategy)
    client = SchemaRegistryClient.new_client(conn.client_config())
    catalog = RegistryCatalog(conn, client=client)
    # When the codec of a topic registers its schema
    sid = catalog.id_for("ExperienceEvent", "t1.cdp.ingest.events")
    # Then it is registered under the strategy's subject, once
    assert client.get_subjects() == [subject]
    assert catalog.id_for("ExperienceEvent", "t1.cdp.ingest.events") == sid
    assert client.get_latest_version(subject).schema_id == sid


def test_a_codec_of_a_topic_registers_under_the_topic_and_one_of_no_topic_under_the_record() -> None:
    # Given the topic-name strategy (the default)
    conn = SchemaRegistryConnection("mock://subjects-default")
    client = SchemaRegistryClient.new_client(conn.client_config())
    catalog = RegistryCatalog(conn, client=client)
    # Then each topic has its subject, and a codec attached to no topic (tools, tests) the record name
    catalog.id_for("ProfileChange", "cdp.activation.profile-changes")
    catalog.id_for("ExperienceEvent")
    assert sorted(client.get_subjects()) == ["cdp.ExperienceEvent", "cdp.activation.profile-changes-value"]


def test_a_codec_that_only_reads_registers_nothing_and_one_that_writes_registers_on_its_first_record() -> None:
    # Given a registry where a producer registered the event schema under its topic's subject
    conn = SchemaRegistryConnection("mock://subjects-read-only")
    client = SchemaRegistryClient.new_client(conn.client_config())
    producer_side = RegistryCatalog(conn, client=client)
    event = {"eventId": "e1", "timestamp": 1, "eventType": "pageView", "dataset": "web-events",
             "identityMap": {"ECID": [{"id": "c1", "primary": True}]}, "ecid": None, "web": None,
             "product": None, "commerce": None, "fields": {}}
    data = AvroCodec("ExperienceEvent", producer_side, topic="cdp.ingest.events").encode(event)
    # When the worker's codecs of an ingest topic (which it reads) and an activation topic (which it writes)
    # are made, and the first decodes a record
    worker_side = RegistryCatalog(conn, client=client)
    ingest = AvroCodec("ExperienceEvent", worker_side, topic="cdp.ingest.events")
    activation = AvroCodec("MembershipChange", worker_side, topic="cdp.activation.memberships")
    decoded = ingest.decode(data)
    # Then reading registered nothing more: read-only credentials on the ingest subjects are enough
    assert decoded["eventId"] == "e1"
    assert client.get_subjects() == ["cdp.ingest.events-value"]
    # And the writing codec registers its subject on its first record, once
    change = {"profile_id": "p1", "audience_id": "a1", "audience_version": 1, "status": "realized",
              "previous_status": None, "identities": {}, "attributes": {}, "reason": "r", "cause_event_id": None,
              "evaluation": "streaming", "event_time_ms": 1, "emit_time_ms": 2, "idempotency_key": "k"}
    assert activation.decode(activation.encode(change))["profile_id"] == "p1"
    activation.encode(change)
    assert sorted(client.get_subjects()) == ["cdp.activation.memberships-value", "cdp.ingest.events-value"]
    assert [v for v in client.get_versions("cdp.activation.memberships-value")] == [1]
