"""The log format every command and the destination runner set up (pipeline.observability.logformat)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from pipeline.observability.logformat import add_to_context, configure, message_context


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_lines_carry_the_process_name_and_the_ids_of_the_message_in_hand(
        root_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a command's logging set up for JSON as runner "dest-1"
    configure("json", "dest-1")
    log = logging.getLogger("pipeline.test")
    # When it logs outside a message, inside one, after the message's event id is known, and an exception
    log.info("starting %s", "up")
    with message_context(topic="ingest.events", partition=3, offset=41):
        log.warning("about a record")
        add_to_context(event_id="e-7")
        with message_context(profile_id="p1"):
            log.warning("deeper")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    # Then each line is one JSON object with exactly those fields
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    for line in lines:
        assert line.pop("time")
    exc_info = lines[3].pop("exc_info")
    assert lines == [
        {"level": "INFO", "logger": "pipeline.test", "message": "starting up", "worker": "dest-1"},
        {"level": "WARNING", "logger": "pipeline.test", "message": "about a record", "worker": "dest-1",
         "topic": "ingest.events", "partition": 3, "offset": 41},
        {"level": "WARNING", "logger": "pipeline.test", "message": "deeper", "worker": "dest-1",
         "topic": "ingest.events", "partition": 3, "offset": 41, "event_id": "e-7", "profile_id": "p1"},
        {"level": "ERROR", "logger": "pipeline.test", "message": "failed", "worker": "dest-1"},
    ]
    assert "ValueError: boom" in exc_info


def test_text_lines_are_the_classic_format(root_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("text", "w1")
    logging.getLogger("pipeline.test").warning("plain %d", 1)
    assert capsys.readouterr().err.endswith("WARNING pipeline.test: plain 1\n")
