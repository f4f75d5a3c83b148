"""The topic registry: topics.yaml parsing with located errors, unknown names, and `apply` on the broker."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from pipeline.errors import ConfigError, TopicPlanError, UnknownNameError
from pipeline.resources import TOPICS_FILE
from pipeline.serde.avro import EmbeddedCatalog, RegistryCatalog
from pipeline.settings import Settings, load_topics
from pipeline.topics import MIN_INSYNC_ENV, REPLICATION_ENV, TopicRegistry, apply


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "topics.yaml"
    p.write_text(text)
    return p


def test_every_declared_topic_loads_with_its_codec():
    reg = TopicRegistry.load(TOPICS_FILE, prefix="p-")
    assert reg.name("ingest.events") == "p-cdp.ingest.events"
    assert reg["ingest.events"].codec.name == "ExperienceEvent"  # type: ignore[attr-defined]
    assert {s.cleanup_policy for s in reg if s.logical.startswith("state.")} == {"compact"}


def test_unknown_logical_name_lists_the_valid_ones():
    reg = TopicRegistry.load(TOPICS_FILE, prefix="")
    with pytest.raises(UnknownNameError) as err:
        reg["ingest.event"]
    assert "ingest.events" in str(err.value) and "activation.memberships" in str(err.value)


@pytest.mark.parametrize("body,line,problem", [
    ("topics:\n  a:\n    name: x\n    partitions: 0\n    codec: raw\n", 4, "partitions must be >= 1"),
    ("topics:\n  a:\n    name: x\n    codec: raw\n", 2, "missing key(s) partitions"),
    ("topics:\n  a:\n    name: x\n    partitions: 1\n    codec: raw\n    retention: 5\n", 6, "unknown key 'retention'"),
    ("topics:\n  a:\n    name: x\n    partitions: 1\n    codec: raw\n    cleanup_policy: forever\n", 6,
     "cleanup_policy must be one of"),
    ("topics:\n  a: [1, 2\n", 3, "invalid YAML"),
])
def test_bad_topics_file_names_file_line_and_problem(tmp_path, body, line, problem):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        TopicRegistry.load(path, prefix="")
    assert err.value.file == str(path) and err.value.line == line
    assert problem in str(err.value)


@pytest.mark.integration
def test_apply_is_idempotent_and_refuses_to_shrink(kafka_bootstrap, topic_prefix, tmp_path):
    # Given the declared topics applied once
    reg = load_topics(topic_prefix)
    first = apply(reg, kafka_bootstrap, out=lambda *_: None)
    assert {i.action for i in first} == {"create"}
    # When applied again, nothing changes
    again = apply(reg, kafka_bootstrap, out=lambda *_: None)
    assert {i.action for i in again} == {"ok"}
    # And a file that asks for fewer partitions is refused with a clear message, before any change
    shrunk = write(tmp_path, TOPICS_FILE.read_text().replace("partitions: 4", "partitions: 2", 1))
    with pytest.raises(TopicPlanError, match="cannot shrink partitions"):
        apply(load_topics(topic_prefix, shrunk), kafka_bootstrap, out=lambda *_: None)
    # And growing partitions is planned as such
    grown = write(tmp_path, TOPICS_FILE.read_text().replace("partitions: 4", "partitions: 6", 1))
    items = apply(load_topics(topic_prefix, grown), kafka_bootstrap, out=lambda *_: None)
    assert [i.action for i in items if i.topic.logical == "ingest.events"] == ["add-partitions"]


def test_durability_comes_from_topics_yaml_with_min_insync_in_each_topic_config():
    # Given the shipped topics.yaml with no override in the environment
    env = {k: v for k, v in os.environ.items() if k not in (REPLICATION_ENV, MIN_INSYNC_ENV)}
    with mock.patch.dict(os.environ, env, clear=True):
        reg = load_topics("")
    # Then every topic has 3 replicas and needs 2 in sync, which each topic's config carries
    assert {(s.replication_factor, s.min_insync_replicas) for s in reg} == {(3, 2)}
    assert (reg.replication_factor, reg.min_insync_replicas) == (3, 2)
    assert reg["ingest.events"].config()["min.insync.replicas"] == "2"


def test_the_environment_overrides_replication_for_every_topic(monkeypatch):
    # Given a single development broker's overrides
    monkeypatch.setenv(REPLICATION_ENV, "1")
    monkeypatch.setenv(MIN_INSYNC_ENV, "1")
    reg = load_topics("")
    # Then every topic and the defaults (Faust's own topics) take them
    assert {(s.replication_factor, s.min_insync_replicas) for s in reg} == {(1, 1)}
    assert (reg.replication_factor, reg.min_insync_replicas) == (1, 1)


@pytest.mark.parametrize("rf,isr,problem", [
    ("2", "3", "min_insync_replicas 3 is more than its replication_factor 2"),
    ("0", "", f"{REPLICATION_ENV} must be a whole number of at least 1, not '0'"),
    ("three", "", f"{REPLICATION_ENV} must be a whole number of at least 1, not 'three'"),
])
def test_impossible_replication_from_the_environment_stops_loading(monkeypatch, rf, isr, problem):
    monkeypatch.setenv(REPLICATION_ENV, rf)
    monkeypatch.setenv(MIN_INSYNC_ENV, isr)
    with pytest.raises(ConfigError) as err:
        load_topics("")
    assert problem in str(err.value)


def test_min_insync_above_replication_in_the_file_names_its_line(tmp_path, monkeypatch):
    monkeypatch.delenv(REPLICATION_ENV, raising=False)
    monkeypatch.delenv(MIN_INSYNC_ENV, raising=False)
    path = write(tmp_path, "topics:\n  a:\n    name: x\n    partitions: 1\n    codec: raw\n"
                           "    replication_factor: 1\n    min_insync_replicas: 2\n")
    with pytest.raises(ConfigError) as err:
        TopicRegistry.load(path, prefix="")
    assert err.value.line == 7 and "min_insync_replicas 2 is more than its replication_factor 1" in str(err.value)


def test_a_stage_topic_with_other_partitions_than_its_table_names_its_line(tmp_path):
    # Given receipts with 8 partitions where the profile ops and the profiles changelog have 4
    path = write(tmp_path, "topics:\n"
                           "  internal.profile-ops:\n    name: ops\n    partitions: 4\n    codec: raw\n"
                           "  state.profiles-changelog:\n    name: cl\n    partitions: 4\n    codec: raw\n"
                           "  activation.receipts:\n    name: r\n    partitions: 8\n    codec: raw\n")
    # When the file is loaded
    with pytest.raises(ConfigError) as err:
        TopicRegistry.load(path, prefix="")
    # Then it stops, at the receipts' partitions line, saying which topics must agree
    assert err.value.line == 12
    assert ("topic 'activation.receipts': partitions must equal 'internal.profile-ops''s (4): internal.profile-ops, "
            "state.profiles-changelog, activation.receipts are co-partitioned") in str(err.value)


@pytest.mark.integration
def test_apply_refuses_more_replicas_than_brokers_and_says_what_to_set(kafka_bootstrap, topic_prefix, monkeypatch):
    # Given topics.yaml's production durability (3 replicas) and the one-broker test cluster
    monkeypatch.delenv(REPLICATION_ENV, raising=False)
    monkeypatch.delenv(MIN_INSYNC_ENV, raising=False)
    reg = load_topics(topic_prefix)
    # When applied, the plan refuses before creating anything, naming the override
    with pytest.raises(TopicPlanError) as err:
        apply(reg, kafka_bootstrap, out=lambda *_: None)
    assert "replication factor 3" in str(err.value) and "1 broker(s)" in str(err.value)
    assert f"{REPLICATION_ENV}=1" in str(err.value)


def test_compacted_topics_bound_how_long_a_superseded_record_stays_and_the_broker_takes_it(
        kafka_bootstrap, topic_prefix):
    # Given the shipped topics.yaml
    reg = load_topics(topic_prefix)
    compacted = {s.logical for s in reg if "compact" in s.cleanup_policy}
    # Then every compacted topic (where an erased person's old values would otherwise stay until the cleaner
    # happens to run) carries a bound of 7 days, and no delete-policy topic carries one
    assert compacted >= {"state.identity-changelog", "state.profiles-changelog", "activation.membership-state"}
    assert {s.logical: s.config().get("max.compaction.lag.ms") for s in reg} == {
        s.logical: ("604800000" if s.logical in compacted else None) for s in reg}
    # And when the topics are created, the broker holds it, so a second plan finds nothing to change
    from confluent_kafka.admin import AdminClient, ConfigResource
    from kafka_helpers import wait_topic_ready

    apply(reg, kafka_bootstrap, out=lambda *_: None)
    name = reg.name("activation.membership-state")
    wait_topic_ready(kafka_bootstrap, name)
    res = ConfigResource("topic", name)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    config = admin.describe_configs([res])[res].result()
    assert config["max.compaction.lag.ms"].value == "604800000"
    assert {i.action for i in apply(reg, kafka_bootstrap, out=lambda *_: None)} == {"ok"}


def test_the_settings_pass_prefix_and_replication_overrides_to_the_registry(monkeypatch):
    # Given a prefix and a single development broker's overrides in the environment
    monkeypatch.setenv("PIPELINE_TOPIC_PREFIX", "tenant-")
    monkeypatch.setenv(REPLICATION_ENV, "1")
    monkeypatch.setenv(MIN_INSYNC_ENV, "1")
    # When the settings are read and give the registry
    settings = Settings.from_env()
    reg = settings.topic_registry()
    # Then the settings hold the values and every topic takes them; a registry loaded without them keeps the file's
    assert (settings.topic_prefix, settings.replication_factor, settings.min_insync_replicas) == ("tenant-", 1, 1)
    assert reg.name("ingest.events") == "tenant-cdp.ingest.events"
    assert {(s.replication_factor, s.min_insync_replicas) for s in reg} == {(1, 1)}
    assert {(s.replication_factor, s.min_insync_replicas) for s in TopicRegistry.load()} == {(3, 2)}


def test_the_settings_give_the_avro_codecs_the_schema_registry_when_one_is_configured(monkeypatch):
    # Given a Schema Registry in the environment
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "mock://settings-test")
    # When the settings' registry builds the ingest codec
    codec = Settings.from_env().topic_registry()["ingest.events"].codec
    # Then its schemas come from that registry; without the variable, from the embedded catalog
    assert isinstance(codec.catalog, RegistryCatalog)  # type: ignore[attr-defined]
    assert codec.catalog.connection.url == "mock://settings-test"  # type: ignore[attr-defined]
    monkeypatch.delenv("SCHEMA_REGISTRY_URL")
    assert isinstance(Settings.from_env().topic_registry()["ingest.events"].codec.catalog,  # type: ignore[attr-defined]
                      EmbeddedCatalog)
