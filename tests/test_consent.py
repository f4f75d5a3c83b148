"""The consent rule module: verdicts, on_missing, flips, the attributes the worker carries and their reload."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import fastavro
import pytest

from pipeline.consent import ConsentAttributes, carried_attributes, flip, permits, verdict
from pipeline.destinations.config import ConsentConfig, parse_destinations
from pipeline.errors import ConfigError
from pipeline.resources import EXAMPLE_CONFIG_DIR, SCHEMAS_DIR

DENY = ConsentConfig("consents.email", ("no", "N"))
ALLOW = ConsentConfig("consents.email", ("no",), on_missing="allow")

DESTS = """destinations:
  - name: mail
    kind: http
    audiences: "*"
    identities: [{namespace: Email}]
    consent: {attribute: consents.email, deny_values: ["no"]}
    url: http://127.0.0.1:1/h
    headers: {Authorization: "Bearer ${NOT_SET_ANYWHERE}"}
  - name: sms
    kind: kafka
    audiences: "*"
    identities: [{namespace: Phone}]
    consent: {attribute: consents.sms, on_missing: allow}
    topic: activation.dest-kafka-example
  - name: ads
    kind: kafka
    audiences: "*"
    identities: [{namespace: ECID}]
    consent: {attribute: consents.email}
    topic: activation.dest-kafka-example
  - name: plain
    kind: kafka
    audiences: "*"
    identities: [{namespace: ECID}]
    topic: activation.dest-kafka-example
"""


def test_verdicts_and_what_on_missing_permits() -> None:
    # Given a rule denying "no"/"N" (default on_missing: deny) and one that allows a missing value
    # Then values are granted, denied (trimmed, any case) or unknown (absent / null)
    assert [verdict(DENY, v) for v in ("yes", " n ", "NO", None, True)] == [
        "granted", "denied", "denied", "unknown", "granted"]
    assert [permits(DENY, v) for v in ("yes", "no", None)] == [True, False, False]
    assert [permits(ALLOW, v) for v in ("yes", "no", None)] == [True, False, True]


def test_flips_by_value_before_and_after() -> None:
    a = "consents.email"
    # When the attribute is not among the changed ones: no flip
    assert flip(DENY, {a: "no"}, ["loyalty.tier"], {a: "yes"}) is None
    # When it changes between values the rule reads alike: no flip
    assert flip(DENY, {a: "n"}, [a], {a: "no"}) is None
    assert flip(DENY, {a: "true"}, [a], {a: "yes"}) is None
    assert flip(ALLOW, {a: "yes"}, [a], {a: None}) is None
    # When it changes across the rule: withdrawn / granted (a missing value is denied by default)
    assert flip(DENY, {a: "no"}, [a], {a: "yes"}) == "withdrawn"
    assert flip(DENY, {}, [a], {a: "yes"}) == "withdrawn"
    assert flip(DENY, {a: "yes"}, [a], {a: "no"}) == "granted"
    assert flip(DENY, {a: "yes"}, [a], {a: None}) == "granted"
    # When the message does not say the value before (an older worker): what the new value says
    assert flip(DENY, {a: "no"}, [a], None) == "withdrawn"
    assert flip(DENY, {a: "yes"}, [a], {}) == "granted"


def test_on_missing_is_parsed_and_checked() -> None:
    # Given the destinations above, Then each rule has its on_missing (deny unless said)
    dests = parse_destinations(DESTS, env={"NOT_SET_ANYWHERE": "x"})
    assert [(d.name, d.consent) for d in dests] == [
        ("mail", ConsentConfig("consents.email", ("no",), "deny")),
        ("sms", ConsentConfig("consents.sms", ("no",), "allow")),
        ("ads", ConsentConfig("consents.email", ("no",), "deny")),
        ("plain", None)]
    # And the attributes every membership message must carry are the rules' attributes, once each
    assert carried_attributes(dests) == ("consents.email", "consents.sms")
    # When on_missing has another value, Then the error names file and line
    with pytest.raises(ConfigError) as info:
        parse_destinations(DESTS.replace("on_missing: allow", "on_missing: maybe"), file="d.yaml",
                           env={"NOT_SET_ANYWHERE": "x"})
    assert str(info.value).startswith("d.yaml:13:") and "on_missing must be one of allow, deny" in str(info.value)


def test_the_worker_reads_the_rules_without_the_runner_secrets_and_reloads_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "destinations.yaml"
    consent = ConsentAttributes(path)
    # Given no destinations file, Then nothing is carried
    assert consent.refresh(strict=True) is False and consent.attributes == ()
    # When the file appears (its header names an unset variable: the worker does not resolve it)
    path.write_text(DESTS)
    assert consent.refresh() is True and consent.attributes == ("consents.email", "consents.sms")
    # When nothing changed, Then nothing is read again
    assert consent.refresh() is False
    # When it is saved broken, Then the error is logged with file and line and the attributes stay
    path.write_text(DESTS.replace("kind: kafka", "kind: [kafka]", 1) + "\n")
    with caplog.at_level(logging.ERROR, logger="pipeline.consent"):
        assert consent.refresh() is False
    assert consent.attributes == ("consents.email", "consents.sms")
    assert f"{path}:10:" in caplog.text and "consent rules not reloaded" in caplog.text
    # And a broken file at start-up stops it
    with pytest.raises(ConfigError):
        ConsentAttributes(path).refresh(strict=True)
    # When only the email rule is left, Then only its attribute is carried
    path.write_text(DESTS.split("  - name: sms")[0])
    assert consent.refresh() is True and consent.attributes == ("consents.email",)


def test_the_example_config_carries_the_email_consent() -> None:
    consent = ConsentAttributes(EXAMPLE_CONFIG_DIR / "destinations.yaml")
    consent.refresh(strict=True)
    assert consent.attributes == ("consents.email",)


def test_profile_change_schema_evolution_both_ways() -> None:
    # Given ProfileChange before consent at activation (no memberships_changed, no previous_attributes)
    new = fastavro.parse_schema(fastavro.schema.load_schema(str(SCHEMAS_DIR / "ProfileChange.avsc")))
    old_fields = [f for f in new["fields"] if f["name"] not in ("memberships_changed", "previous_attributes")]
    old = fastavro.parse_schema({**new, "fields": old_fields, "name": "cdp.ProfileChange"})
    base = {"profile_id": "p1", "identities": {}, "attributes": {"consents.email": "no"},
            "changed_attributes": ["consents.email"], "changed_identities": [], "memberships": ["gold"],
            "event_time_ms": 1_000, "idempotency_key": "k"}
    # When an old writer's record is read with the new schema, Then the new fields take their defaults
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, base)
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, old, new)
    assert isinstance(read, dict)
    assert read["memberships_changed"] == [] and read["previous_attributes"] == {}
    # When a new writer's record is read with the old schema, Then the new fields are skipped
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, new, {**base, "memberships_changed": ["gold"],
                                          "previous_attributes": {"consents.email": "yes"}})
    buf.seek(0)
    back = fastavro.schemaless_reader(buf, new, old)
    assert isinstance(back, dict) and "previous_attributes" not in back and back["memberships"] == ["gold"]
