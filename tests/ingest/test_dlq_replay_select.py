"""`pipeline dlq replay`'s pure part: --since in its two forms, and which ingest.dlq entries are replayed where."""

from __future__ import annotations

import pytest

from pipeline.ingest.replay import DeadLetter, Replay, choose, parse_since

NOW = 1_780_000_000_000  # ms
SOURCES = {"cdp.ingest.events": ("ingest.events", 4), "cdp.ingest.profiles": ("ingest.profiles", 4)}
REASONS = frozenset({"no-usable-identity", "unknown-dataset"})


def entry(offset: int = 7, reason: str = "no-usable-identity", ts: int = NOW - 1000, value: bytes | None = b"avro",
          **headers: str) -> DeadLetter:
    hdrs = {"reason": reason, "source_topic": "cdp.ingest.events", "source_partition": "2", "source_offset": "41",
            **headers}
    return DeadLetter(0, offset, ts, b"ECID:c1", value, {k: v.encode() for k, v in hdrs.items()})


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", NOW - 90_000), ("30m", NOW - 1_800_000), ("2h", NOW - 7_200_000), ("1.5h", NOW - 5_400_000),
    ("7d", NOW - 7 * 86_400_000), ("1w", NOW - 7 * 86_400_000), (" 2H ", NOW - 7_200_000),
    ("2026-05-01T08:00:00", 1_777_622_400_000), ("2026-05-01T10:00:00+02:00", 1_777_622_400_000),
    ("2026-05-01", 1_777_593_600_000),
])
def test_since_is_a_time_or_an_age(text: str, expected: int) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2 hours", "-2h", "5y", ""])
def test_since_refuses_anything_else_saying_what_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601 time .* or an age \(90s, 30m, 2h, 7d, 1w\)"):
        parse_since(text, NOW)


def test_an_entry_of_a_chosen_reason_goes_back_to_its_topic_and_partition_marked_with_its_entry() -> None:
    # Given an entry dead-lettered for a chosen reason from partition 2 of the events topic
    e = entry()
    # When it is chosen
    r = choose(e, REASONS, NOW - 3_600_000, set(), SOURCES)
    # Then it is replayed to that topic and partition, with the entry and reason in its headers
    assert r == Replay(e, "ingest.events", 2)
    assert isinstance(r, Replay)
    assert r.headers() == [("replay_of", f"0:7:{NOW - 1000}".encode()), ("replay_reason", b"no-usable-identity")]


@pytest.mark.parametrize(("e", "replayed", "why"), [
    (entry(reason="too-many-identities"), set(), "other reason"),
    (entry(ts=NOW - 3_600_001), set(), "dead-lettered before --since"),
    (entry(), {f"0:7:{NOW - 1000}"}, "already replayed"),
    (entry(value=None), set(), "null value (nothing to replay)"),
    (entry(truncated="true"), set(), "truncated copy (the record was bigger than the dead-letter copy)"),
    (entry(source_topic="cdp.other"), set(), "source topic not an ingest topic of this deployment"),
])
def test_other_entries_are_left_saying_why(e: DeadLetter, replayed: set[str], why: str) -> None:
    assert choose(e, REASONS, NOW - 3_600_000, replayed, SOURCES) == why


def test_the_same_offset_at_another_time_is_another_entry_and_a_gone_partition_lets_the_producer_choose() -> None:
    # Given a marker for offset 7 of an earlier ingest.dlq (deleted and made again since), and an entry from a
    # partition the topic no longer has
    e = entry(source_partition="9")
    # When it is chosen
    r = choose(e, REASONS, None, {f"0:7:{NOW - 5000}"}, SOURCES)
    # Then it is replayed, to a partition the producer picks
    assert r == Replay(e, "ingest.events", None)
