"""Identity rules at ingest: the length and count caps and blocked values, under both violation modes
(dead-letter the record with its reason, or drop the identity), and how dropped identities are reported."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pipeline.identity.datasets import load_datasets_config
from pipeline.identity.namespaces import Dropped, parse_identity_config
from pipeline.ingest.decode import Decoder, Rejected
from pipeline.ingest.drops import LOG_EVERY_S, DropReporter
from pipeline.model import ExperienceEvent, Identity
from pipeline.observability import metrics
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.serde.avro import AvroCodec

NOW = 1_800_000_000_000
EXAMPLE = (EXAMPLE_CONFIG_DIR / "identity.yaml").read_text()


def decoder(hygiene: str = "", drops: list[Dropped] | None = None) -> Decoder:
    """The example configuration (Phone max_length 64, limits 20 identities and 256 characters), with
    `hygiene` added to identity.yaml; dropped identities appended to `drops`."""
    text = EXAMPLE.replace("namespaces:\n", hygiene + "namespaces:\n", 1)
    return Decoder("event", AvroCodec("ExperienceEvent"), parse_identity_config(text, "identity.yaml"),
                   load_datasets_config(EXAMPLE_CONFIG_DIR / "datasets.yaml"),
                   None if drops is None else drops.extend)


def decode(d: Decoder, identity_map: dict[str, list[str]]) -> Any:
    value = {"eventId": "e1", "timestamp": NOW, "eventType": "pageView", "dataset": "web-events",
             "identityMap": {ns: [{"id": v} for v in ids] for ns, ids in identity_map.items()}}
    return d.decode(d.codec.encode(value), NOW)


DEAD_LETTER_ALL = "hygiene:\n  on_violation: {blocked_value: dead-letter, too_long: dead-letter, too_many: dead-letter}\n"
DROP_ALL = "hygiene:\n  on_violation: {blocked_value: drop-identity, too_long: drop-identity, too_many: drop-identity}\n"

TOO_LONG = {"ECID": ["c" * 257, "c-ok"], "Phone": ["+44 20 7946 0958" + " " * 60]}
TOO_MANY = {"ECID": [f"c{i:02d}" for i in range(22)], "CRMID": ["C-1"]}
BLOCKED = {"ECID": ["undefined", "c-ok"], "Email": ["NULL"]}


def test_dead_letter_mode_rejects_the_record_with_the_rules_reason() -> None:
    # Given every rule set to dead-letter
    d = decoder(DEAD_LETTER_ALL)
    # When records break the length cap (the default one and Phone's own), the count cap, the blocked list
    # Then each is rejected with its reason, and a detail naming the namespace and limit, never the value
    assert decode(d, TOO_LONG) == Rejected("identity-too-long",
                                           "a ECID value longer than limits.max_identity_length (256)")
    assert decode(d, {"Phone": ["+44 20 7946 0958" + " " * 60]}) == Rejected(
        "identity-too-long", "a Phone value longer than Phone max_length (64)")
    assert decode(d, TOO_MANY) == Rejected("too-many-identities",
                                           "23 identities; limits.max_identities_per_record is 20")
    assert decode(d, BLOCKED) == Rejected(
        "blocked-identity-value", "a ECID value is a placeholder on the blocked_values list "
        "(hygiene.on_violation.blocked_value: dead-letter)")


def test_drop_identity_mode_keeps_the_record_without_the_offending_identities() -> None:
    # Given every rule set to drop-identity, and a list collecting what is dropped
    drops: list[Dropped] = []
    d = decoder(DROP_ALL, drops)
    # When the same records are decoded
    long_ = decode(d, TOO_LONG)
    many = decode(d, TOO_MANY)
    blocked = decode(d, BLOCKED)
    # Then each goes on with what is left: the 20 highest-priority identities of 23 (CRMID first, then the
    # cookies in order), the short cookie, the real cookie
    assert isinstance(long_, ExperienceEvent) and long_.identities == (Identity("ECID", "c-ok"),)
    assert isinstance(many, ExperienceEvent)
    assert many.identities == (Identity("CRMID", "C-1"), *(Identity("ECID", f"c{i:02d}") for i in range(19)))
    assert isinstance(blocked, ExperienceEvent) and blocked.identities == (Identity("ECID", "c-ok"),)
    # and every dropped identity was reported with namespace, reason and a detail without its value
    assert [(x.namespace, x.reason) for x in drops] == [
        ("ECID", "too-long"), ("Phone", "too-long"),
        *[("ECID", "too-many-identities")] * 3,
        ("ECID", "blocked-value"), ("Email", "blocked-value")]
    assert [x.detail for x in drops][:3] == ["a ECID value longer than limits.max_identity_length (256)",
                                             "a Phone value longer than Phone max_length (64)",
                                             "a ECID identity over limits.max_identities_per_record (20)"]


def test_the_default_modes_drop_long_and_blocked_identities_and_dead_letter_too_many() -> None:
    # Given the example configuration (no hygiene section: the defaults)
    drops: list[Dropped] = []
    d = decoder(drops=drops)
    # When the three records are decoded / Then
    assert isinstance(decode(d, TOO_LONG), ExperienceEvent)
    assert decode(d, TOO_MANY) == Rejected("too-many-identities",
                                           "23 identities; limits.max_identities_per_record is 20")
    assert isinstance(decode(d, BLOCKED), ExperienceEvent)
    assert {x.reason for x in drops} == {"too-long", "blocked-value"}


def test_a_record_left_with_only_placeholders_is_dead_lettered_with_the_reasons() -> None:
    # Given the defaults / When a record carries only placeholders
    got = decode(decoder(), {"ECID": ["undefined", "null"], "Email": ["n/a"]})
    # Then it has no usable identity, and the detail says why, without values
    assert got == Rejected("no-usable-identity",
                           "blocked ECID value: a placeholder on the blocked_values list; "
                           "blocked ECID value: a placeholder on the blocked_values list; "
                           "blocked Email value: a placeholder on the blocked_values list")


def test_invalid_phone_numbers_are_dropped_and_reported() -> None:
    # Given the defaults (region US) / When a record carries a valid and an invalid number
    drops: list[Dropped] = []
    got = decode(decoder(drops=drops), {"Phone": ["(201) 555-0123", "(555) 123-4567"]})
    # Then the valid one stays as E.164 and the other is reported as invalid
    assert isinstance(got, ExperienceEvent) and got.identities == (Identity("Phone", "+12015550123"),)
    assert drops == [Dropped("Phone", "invalid-value",
                             "invalid Phone value: not a valid phone number (libphonenumber)")]


# --- reporting -----------------------------------------------------------------------------------------

def counter(namespace: str, reason: str) -> float:
    return metrics.IDENTITIES_DROPPED.labels(namespace, reason)._value.get()  # type: ignore[no-any-return]


def test_dropped_identities_are_counted_and_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    # Given a reporter with a controlled clock
    now = [1000.0]
    tally = metrics.Tally()
    reporter = DropReporter(tally, clock=lambda: now[0])
    before = counter("ECID", "blocked-value"), counter("(unknown)", "unknown-namespace")
    blocked = Dropped("ECID", "blocked-value", "blocked ECID value: a placeholder on the blocked_values list")
    unknown = Dropped("(unknown)", "unknown-namespace", "unknown namespace 'Fax'")
    # When drops come in three batches, the third a minute after the first
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest.drops"):
        reporter([blocked])
        now[0] += 1
        reporter([blocked, unknown])
        now[0] += LOG_EVERY_S
        reporter([blocked])
        tally.flush()
    # Then every one is counted by namespace and reason
    assert (counter("ECID", "blocked-value") - before[0], counter("(unknown)", "unknown-namespace") - before[1]) == (3, 1)
    # and two lines were logged (the first at once, then one with what came since), naming no value
    assert [r.getMessage() for r in caplog.records] == [
        f"ingest: 1 identities left out of records (ECID blocked-value: 1; values not logged; "
        f"cdp_identities_dropped_total counts them; at most one such line every {LOG_EVERY_S:.0f} s)",
        f"ingest: 3 identities left out of records ((unknown) unknown-namespace: 1, ECID blocked-value: 2; values "
        f"not logged; cdp_identities_dropped_total counts them; at most one such line every {LOG_EVERY_S:.0f} s)"]
