"""Identity hygiene (issue 16 item 6): phone numbers through libphonenumber, blocked placeholder values, the
identity.yaml keys that configure them, and blocked values never linking two people through stitching."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stitching import Rec

from pipeline.errors import ConfigError
from pipeline.identity.datasets import load_datasets_config
from pipeline.identity.namespaces import (
    DEFAULT_BLOCKED_VALUES,
    IdentityConfig,
    InvalidValue,
    NormaliserSettings,
    get_normaliser,
    load_identity_config,
    normalise_identities,
    normalise_identities_detailed,
    parse_identity_config,
)
from pipeline.ingest.decode import Decoder
from pipeline.model import ExperienceEvent, Identity
from pipeline.profiles.config import ProfileConfig
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.serde.avro import AvroCodec

from .stitch_sim import StitchSim

NOW = 1_800_000_000_000
NAMESPACES = """\
namespaces:
  - {name: ECID, kind: cookie, priority: 10, normaliser: trim}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: EMAIL_LC_SHA256, kind: person, priority: 55, normaliser: sha256hex, derived_from: Email}
  - {name: Phone, kind: person, priority: 50, normaliser: phone_e164}
  - {name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}
"""


def config(head: str = "", namespaces: str = NAMESPACES) -> IdentityConfig:
    return parse_identity_config("max_identities_per_graph: 50\n" + head + namespaces, "identity.yaml")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- phone numbers --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("region", "raw", "e164"), [
    # GB: the "(0)" national trunk prefix written inside an international number, national and 00 forms
    ("US", "+44 (0)20 7946 0958", "+442079460958"),
    ("GB", "020 7946 0958", "+442079460958"),
    ("GB", "0044 20 7946 0958", "+442079460958"),
    ("US", "0044 20 7946 0958", "+442079460958"),  # 00 read as "+" where the region dials out otherwise
    ("GB", "07911 123456", "+447911123456"),
    # US: national with and without the 1, international from another default region
    ("US", "(201) 555-0123", "+12015550123"),
    ("US", "1-201-555-0123", "+12015550123"),
    ("DE", "+1 201 555 0123", "+12015550123"),
    ("US", "011 44 20 7946 0958", "+442079460958"),  # the US international call prefix
    # DE, FR, IN, JP: national (with their trunk 0) under their own region, and international under another
    ("DE", "030 1234567", "+49301234567"),
    ("US", "+49 30 1234567", "+49301234567"),
    ("FR", "01 42 68 53 00", "+33142685300"),
    ("GB", "+33 1 42 68 53 00", "+33142685300"),
    ("IN", "098765 43210", "+919876543210"),
    ("IN", "98765 43210", "+919876543210"),
    ("US", "+91 98765 43210", "+919876543210"),
    ("JP", "03-1234-5678", "+81312345678"),
    ("JP", "090-1234-5678", "+819012345678"),
    ("US", "+81 3-1234-5678", "+81312345678"),
    ("US", "  +81 3 1234 5678 ", "+81312345678"),
])
def test_phone_numbers_from_several_countries_become_e164(region: str, raw: str, e164: str) -> None:
    # Given the phone normaliser with a default region / When a number is normalised / Then it is E.164
    fn = get_normaliser("phone_e164", NormaliserSettings(region))
    assert fn(raw) == e164
    # and normalising again changes nothing
    assert fn(e164) == e164


@pytest.mark.parametrize(("region", "raw", "reason"), [
    ("US", "020 7946 0958", "not a valid phone number (libphonenumber)"),  # a GB number read as a US one
    ("US", "(555) 123-4567", "not a valid phone number (libphonenumber)"),  # the fictional 555 range
    ("GB", "+44 20 7946 095", "not a valid phone number (libphonenumber)"),  # a digit short
    ("US", "12345", "not a valid phone number (libphonenumber)"),
    ("US", "+999 1234 5678", "a phone number with an unknown country code"),
    ("US", "1" * 40, "too many digits for a phone number"),
    ("GB", "0", "not a phone number"),
    ("US", "call 020 7946 0958", "a phone number may only hold digits, spaces, ()-./ and a leading +"),
    ("US", "+", "a phone number may only hold digits, spaces, ()-./ and a leading +"),
    ("US", "  ", "empty value"),
])
def test_invalid_phone_numbers_are_rejected_with_a_fixed_reason(region: str, raw: str, reason: str) -> None:
    # Given the phone normaliser / When an invalid number is normalised / Then InvalidValue has a fixed phrase
    with pytest.raises(InvalidValue) as info:
        get_normaliser("phone_e164", NormaliserSettings(region))(raw)
    assert info.value.reason == reason
    assert str(info.value) == reason  # the value is in neither


def test_default_region_comes_from_the_file_and_a_namespace_can_have_its_own() -> None:
    # Given phone.default_region GB, and a second phone namespace for Japanese numbers
    cfg = config("phone: {default_region: GB}\n", NAMESPACES
                 + "  - {name: PhoneJP, kind: person, priority: 50, normaliser: phone_e164, default_region: JP}\n")
    # When national numbers are normalised in each
    ids, problems = normalise_identities([("Phone", "020 7946 0958"), ("PhoneJP", "03-1234-5678")], cfg)
    # Then each is read in its own region
    assert ids == [Identity("Phone", "+442079460958"), Identity("PhoneJP", "+81312345678")]
    assert problems == []
    assert cfg.default_region == "GB"


def test_the_older_default_country_code_is_still_read_as_its_region() -> None:
    # Given a file of before this change, with default_country_code 44 / When loaded
    cfg = config('default_country_code: "44"\n')
    # Then it means region GB
    assert cfg.default_region == "GB"
    assert normalise_identities([("Phone", "020 7946 0958")], cfg)[0] == [Identity("Phone", "+442079460958")]
    # and without either key, the region is US (what default_country_code 1 meant)
    assert config().default_region == "US"


# --- config errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("head", "extra", "line", "problem"), [
    ('default_country_code: "1"\nphone: {default_region: US}\n', "", 2,
     "default_country_code and phone are both set: keep only phone.default_region (default_country_code is "
     "the older form of it)"),
    ('default_country_code: "999"\n', "", 2,
     "default_country_code 999 is no country's calling code; write phone: {default_region: XX} instead"),
    ("phone: {default_region: UK}\n", "", 2,
     "phone.default_region: unknown region 'UK'; a two-letter region code libphonenumber knows, e.g. GB, US, "
     "DE, FR, IN, JP"),
    ("phone: {region: GB}\n", "", 2, "phone: unknown key 'region'; valid: default_region"),
    ("hygiene: {blocklist: []}\n", "", 2, "hygiene: unknown key 'blocklist'; valid: blocked_values, on_violation"),
    ("hygiene:\n  on_violation: {too_short: dead-letter}\n", "", 3,
     "hygiene.on_violation: unknown key 'too_short'; valid: blocked_value, too_long, too_many"),
    ("hygiene:\n  on_violation: {too_many: drop}\n", "", 3,
     "hygiene.on_violation.too_many: unknown mode 'drop'; valid: dead-letter, drop-identity"),
    ("hygiene: {blocked_values: [null]}\n", "", 2,
     "hygiene.blocked_values: entries must be quoted strings (YAML reads 'null' unquoted as NoneType)"),
    ("hygiene: {blocked_values: nope}\n", "", 2, "hygiene.blocked_values must be a list"),
    ("", "  - {name: X, kind: cookie, priority: 1, normaliser: trim, default_region: GB}\n", 8,
     "namespace 'X': default_region only applies to the phone_e164 normaliser, not trim"),
    ("", "  - {name: X, kind: cookie, priority: 1, normaliser: trim, max_length: 0}\n", 8,
     "namespace 'X': max_length must be >= 1"),
    ("", "  - {name: X, kind: cookie, priority: 1, normaliser: trim, blocked: []}\n", 8,
     "namespace: unknown key 'blocked'; valid: blocked_values, default_region, derived_from, kind, max_length, "
     "name, normaliser, priority, unique"),
])
def test_config_errors_name_file_line_and_problem(head: str, extra: str, line: int, problem: str) -> None:
    # Given identity.yaml with one mistake in the new keys / When parsed / Then the error says where and what
    with pytest.raises(ConfigError) as info:
        config(head, NAMESPACES + extra)
    assert (info.value.file, info.value.line, info.value.problem) == ("identity.yaml", line, problem)


def test_the_example_file_documents_the_defaults() -> None:
    # Given the shipped example / When loaded / Then its hygiene is the defaults and Phone is capped at 64
    cfg = load_identity_config(EXAMPLE_CONFIG_DIR / "identity.yaml")
    assert cfg.default_region == "US"
    assert cfg.hygiene.blocked_values == DEFAULT_BLOCKED_VALUES
    assert dict(cfg.hygiene.on_violation) == {"blocked_value": "drop-identity", "too_long": "drop-identity",
                                              "too_many": "dead-letter"}
    assert dict(cfg.max_lengths) == {"Phone": 64}
    # and every default listed in its comments is the code's
    text = (EXAMPLE_CONFIG_DIR / "identity.yaml").read_text()
    assert '#   blocked_values: ["", "null", "undefined", "anonymous", "0", "-1", "n/a", "none", "nan"]' in text


# --- blocked values ------------------------------------------------------------------------------------

def test_blocked_values_are_dropped_with_their_reason_whatever_their_case_and_padding() -> None:
    # Given the default blocked list
    cfg = config()
    raw = [("ECID", " NULL "), ("ECID", "undefined"), ("ECID", "Anonymous"), ("CRMID", "0"), ("CRMID", "-1"),
           ("ECID", "N/A"), ("ECID", "None"), ("ECID", "NaN"), ("ECID", "   "), ("Email", "null"),
           ("EMAIL_LC_SHA256", sha("null")), ("EMAIL_LC_SHA256", sha("undefined").upper()),
           ("ECID", "c-1"), ("Email", "null@example.com"), ("ECID", "nullish")]
    # When normalised
    ids, dropped = normalise_identities_detailed(raw, cfg)
    # Then only the real values stay (whole values are compared: null@example.com and nullish are kept)
    assert ids == [Identity("Email", "null@example.com"), Identity("EMAIL_LC_SHA256", sha("null@example.com")),
                   Identity("ECID", "c-1"), Identity("ECID", "nullish")]
    assert [(d.namespace, d.reason) for d in dropped] == [
        ("ECID", "blocked-value"), ("ECID", "blocked-value"), ("ECID", "blocked-value"),
        ("CRMID", "blocked-value"), ("CRMID", "blocked-value"), ("ECID", "blocked-value"),
        ("ECID", "blocked-value"), ("ECID", "blocked-value"), ("ECID", "blocked-value"),
        ("Email", "blocked-value"), ("EMAIL_LC_SHA256", "blocked-value"), ("EMAIL_LC_SHA256", "blocked-value")]
    assert {d.detail for d in dropped} == {f"blocked {ns} value: a placeholder on the blocked_values list"
                                           for ns in ("ECID", "CRMID", "Email", "EMAIL_LC_SHA256")}


def test_a_namespace_list_replaces_the_file_list() -> None:
    # Given a file list with one extra placeholder, and CRMID with its own list (where 0 is a real id)
    cfg = config('hygiene: {blocked_values: ["null", "guest"]}\n', NAMESPACES.replace(
        "unique: true, normaliser: trim}", 'unique: true, normaliser: trim, blocked_values: ["unknown"]}'))
    # When values are normalised
    ids, problems = normalise_identities([("ECID", "Guest"), ("ECID", "undefined"), ("CRMID", "0"),
                                          ("CRMID", "UNKNOWN"), ("CRMID", "null")], cfg)
    # Then ECID follows the file list, CRMID only its own
    assert ids == [Identity("CRMID", "0"), Identity("CRMID", "null"), Identity("ECID", "undefined")]
    assert problems == ["blocked ECID value: a placeholder on the blocked_values list",
                        "blocked CRMID value: a placeholder on the blocked_values list"]


BLOCKED_FORMS = {v.strip().casefold() for v in DEFAULT_BLOCKED_VALUES}
BLOCKED_DIGESTS = {sha(v) for v in BLOCKED_FORMS if v}


def padded(value: str) -> st.SearchStrategy[str]:
    """`value` in random case with random whitespace around it."""
    cased = st.lists(st.booleans(), min_size=len(value), max_size=len(value)).map(
        lambda ups: "".join(c.upper() if u else c.lower() for c, u in zip(value, ups, strict=True)))
    pad = st.text(alphabet=" \t\n", max_size=3)
    return st.tuples(pad, cased, pad).map("".join)


VALUES = st.one_of(st.sampled_from(DEFAULT_BLOCKED_VALUES).flatmap(padded),
                   st.sampled_from(sorted(BLOCKED_DIGESTS)).flatmap(padded),
                   st.text(max_size=12), st.from_regex(r"\+?[0-9 ]{1,14}", fullmatch=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ECID", "Email", "EMAIL_LC_SHA256", "Phone", "CRMID"]), VALUES),
                max_size=10))
def test_no_blocked_value_ever_appears_in_a_normalised_identity_set(raw: list[tuple[str, str]]) -> None:
    # Given any values, placeholders among them in any case and padding (and their digests)
    # When normalised
    ids, dropped = normalise_identities_detailed(raw, config())
    # Then no identity is a placeholder, none in a hashed namespace the digest of one, and each left out has
    # its reason
    assert not [i for i in ids if i.id.strip().casefold() in BLOCKED_FORMS]
    assert not [i for i in ids if i.namespace == "EMAIL_LC_SHA256" and i.id in BLOCKED_DIGESTS]
    assert {d.reason for d in dropped} <= {"blocked-value", "invalid-value"}


# --- blocked values never link two people ---------------------------------------------------------------

def decode_all(identity: IdentityConfig, records: list[dict[str, Any]]) -> list[Rec]:
    """The records through the ingest decoder (as a worker decodes them), as stitching records."""
    datasets = load_datasets_config(EXAMPLE_CONFIG_DIR / "datasets.yaml")
    decoder = Decoder("event", AvroCodec("ExperienceEvent"), identity, datasets)
    out = []
    for r in records:
        got = decoder.decode(decoder.codec.encode({"timestamp": NOW, "eventType": "pageView",
                                                   "dataset": "web-events", **r}), NOW)
        assert isinstance(got, ExperienceEvent), got
        out.append(Rec(got.event_id, got.identities))
    return out


STRANGERS = [
    {"eventId": "ann-1", "identityMap": {"Email": [{"id": "ann@example.com"}], "ECID": [{"id": "undefined"}],
                                         "CRMID": [{"id": "null"}]}},
    {"eventId": "bob-1", "identityMap": {"Email": [{"id": "bob@example.com"}], "ECID": [{"id": " UNDEFINED"}],
                                         "CRMID": [{"id": "null "}]}},
    {"eventId": "cy-1", "identityMap": {"Email": [{"id": "cy@example.com"}, {"id": "null"}],
                                        "ECID": [{"id": "undefined"}]}},
]


def owners(identity: IdentityConfig, seed: int) -> dict[str, str | None]:
    """Each stranger's profile (by their e-mail) once their records are stitched."""
    recs = decode_all(identity, STRANGERS)
    sim = StitchSim(ProfileConfig(identity, load_datasets_config(EXAMPLE_CONFIG_DIR / "datasets.yaml")))
    sim.run(recs, random.Random(seed))
    snap = sim.snapshot()
    return {p: snap.owner(f"Email:{p}@example.com") for p in ("ann", "bob", "cy")}


@pytest.mark.parametrize("seed", range(5))
def test_placeholder_ids_never_link_two_peoples_profiles(seed: int) -> None:
    # Given three strangers whose records carry ECID "undefined" (in any case), two of them CRMID "null" and
    # one an e-mail "null" besides a real one
    # When their records are decoded and stitched with the default blocked list (any interleaving)
    found = owners(parse_identity_config((EXAMPLE_CONFIG_DIR / "identity.yaml").read_text()), seed)
    # Then each has a profile of their own
    assert None not in found.values()
    assert len(set(found.values())) == 3


def test_without_the_blocked_list_the_same_records_merge_strangers() -> None:
    # Given the same records, with the blocked list emptied (what happened before)
    text = (EXAMPLE_CONFIG_DIR / "identity.yaml").read_text().replace(
        "namespaces:\n", "hygiene: {blocked_values: []}\nnamespaces:\n", 1)
    # When stitched / Then all three strangers end on one profile: the list is what keeps them apart
    assert len(set(owners(parse_identity_config(text), 0).values())) == 1
