"""The topic registry: topics.yaml parsing with located errors, unknown names, and `apply` on the broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError, TopicPlanError, UnknownNameError
from pipeline.resources import TOPICS_FILE
from pipeline.topics import TopicRegistry, apply


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
    reg = TopicRegistry.load(TOPICS_FILE, prefix=topic_prefix)
    first = apply(reg, kafka_bootstrap, out=lambda *_: None)
    assert {i.action for i in first} == {"create"}
    # When applied again, nothing changes
    again = apply(reg, kafka_bootstrap, out=lambda *_: None)
    assert {i.action for i in again} == {"ok"}
    # And a file that asks for fewer partitions is refused with a clear message, before any change
    shrunk = write(tmp_path, TOPICS_FILE.read_text().replace("partitions: 4", "partitions: 2", 1))
    with pytest.raises(TopicPlanError, match="cannot shrink partitions"):
        apply(TopicRegistry.load(shrunk, prefix=topic_prefix), kafka_bootstrap, out=lambda *_: None)
    # And growing partitions is planned as such
    grown = write(tmp_path, TOPICS_FILE.read_text().replace("partitions: 4", "partitions: 6", 1))
    items = apply(TopicRegistry.load(grown, prefix=topic_prefix), kafka_bootstrap, out=lambda *_: None)
    assert [i.action for i in items if i.topic.logical == "ingest.events"] == ["add-partitions"]
