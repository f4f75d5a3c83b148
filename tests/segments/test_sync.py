"""Audience definitions shared through `control.audiences`: the record, the decision to write it, and a worker's
file written from it (no broker: the reader thread's `apply`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.segments.follow import DefinitionsSync
from pipeline.segments.sync import SharedDefinitions, decide, digest, read_record, shared
from pipeline.settings import load_topics

OLD = """audiences:
  - id: gold
    query: loyalty.tier = "gold"
  - id: silver
    query: loyalty.tier = "silver"
"""
NEW = """audiences:
  - id: gold
    version: 2
    query: loyalty.tier = "gold" and loyalty.points > 100
  - id: vip
    query: loyalty.points > 10000
"""
BROKEN = "audiences:\n  - id: gold\n    query: loyalty.tier = \n"


def test_a_record_carries_the_whole_file_its_hash_the_worker_and_the_time() -> None:
    # Given a saved file, When its record is built and read back, Then it is the same, with the text's SHA-256
    record = shared(NEW, "worker-2", 1_700_000_000_000).to_record()
    assert record == {"file": "segments.yaml", "text": NEW, "sha256": digest(NEW), "worker": "worker-2",
                      "at_ms": 1_700_000_000_000}
    assert read_record(record) == SharedDefinitions(NEW, digest(NEW), "worker-2", 1_700_000_000_000)


@pytest.mark.parametrize("value", [None, b"x", {"file": "other.yaml"}, {"file": "segments.yaml", "text": NEW},
                                   {**shared(NEW, "w", 1).to_record(), "sha256": digest(OLD)}])
def test_a_foreign_or_damaged_record_is_refused(value: object) -> None:
    with pytest.raises(ConfigError):
        read_record(value)


def test_a_different_valid_file_is_written_naming_the_audiences_it_changes() -> None:
    decision = decide(shared(NEW, "w", 1), OLD)
    assert (decision.write, decision.changed, decision.problem) == (True, ("gold", "silver", "vip"), None)


def test_the_same_file_is_not_written_again() -> None:
    assert decide(shared(OLD, "w", 1), OLD).write is False


def test_a_missing_or_broken_local_file_is_replaced_whole() -> None:
    assert decide(shared(OLD, "w", 1), None).changed == ("gold", "silver")
    assert decide(shared(OLD, "w", 1), BROKEN).changed == ("gold", "silver")


def test_a_record_that_does_not_load_is_never_written() -> None:
    decision = decide(shared(BROKEN, "w", 1), OLD)
    assert decision.write is False and decision.problem is not None and decision.problem.line == 3


def test_a_worker_writes_a_newer_file_once_and_ignores_a_broken_one(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Given a worker's segments.yaml
    path = tmp_path / "segments.yaml"
    path.write_text(OLD)
    sync = DefinitionsSync(path, "worker-1", writable=True)
    caplog.set_level(logging.INFO, "pipeline.segments.follow")
    # When another worker's save arrives, Then the file is that text (no temporary file left) and one line says
    # which audiences changed
    assert sync.apply(shared(NEW, "worker-2", 1).to_record()) is True
    assert path.read_text() == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["segments.yaml"]
    assert [r.getMessage() for r in caplog.records] == [
        f"control.audiences: definitions saved by worker-2 written into {path}; audiences changed: gold, silver, vip"]
    # When the same arrives again, or a broken file, Then nothing is written
    caplog.clear()
    assert sync.apply(shared(NEW, "worker-2", 2).to_record()) is False
    assert sync.apply(shared(BROKEN, "worker-3", 3).to_record()) is False
    assert path.read_text() == NEW
    assert [r.getMessage() for r in caplog.records] == [
        f"control.audiences: the definitions saved by worker-3 are not valid segments (line 3, column 26): "
        f"ignored, {path} unchanged"]


def test_a_worker_whose_definitions_are_managed_elsewhere_does_not_follow(tmp_path: Path) -> None:
    # Given PIPELINE_AUDIENCES_WRITABLE off (a ConfigMap, say), When the follower starts, Then no reader runs
    sync = DefinitionsSync(tmp_path / "segments.yaml", "worker-1", writable=False)
    sync.follow(load_topics(), "127.0.0.1:1")
    assert sync._thread is None
