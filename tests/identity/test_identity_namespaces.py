"""Tests of namespace config loading, the normalisers and normalise_identities."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ConfigError, UnknownNameError
from pipeline.identity.namespaces import (
    NORMALISERS,
    IdentityConfig,
    InvalidValue,
    Namespace,
    NormaliserSettings,
    get_normaliser,
    load_identity_config,
    normalise_identities,
    parse_identity_config,
)
from pipeline.model import Identity
from pipeline.resources import EXAMPLE_CONFIG_DIR

EXAMPLE = EXAMPLE_CONFIG_DIR / "identity.yaml"

GOOD = """\
max_identities_per_graph: 50
namespaces:
  - {name: ECID, kind: cookie, priority: 10, unique: false, normaliser: trim}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: EMAIL_LC_SHA256, kind: person, priority: 55, normaliser: sha256hex, derived_from: Email}
  - {name: Phone, kind: person, priority: 50, normaliser: phone_e164}
  - {name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}
"""


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def identity_config() -> Callable[..., IdentityConfig]:
    """Factory: parse identity YAML text (defaults to GOOD) into a config."""
    def make(text: str = GOOD) -> IdentityConfig:
        return parse_identity_config(text, "identity.yaml")
    return make


# --- config ---------------------------------------------------------------------------------

def test_example_file_loads_with_all_namespaces() -> None:
    # Given the shipped example / When it is loaded
    config = load_identity_config(EXAMPLE)
    # Then every namespace is there, with the unique and derived ones indexed
    assert list(config.namespaces) == ["ECID", "GAID", "IDFA", "Email", "EMAIL_LC_SHA256", "Phone", "CRMID"]
    assert config.max_identities_per_graph == 50
    assert config.unique_namespaces == frozenset({"CRMID"})
    assert dict(config.derived) == {"Email": ("EMAIL_LC_SHA256",)}
    assert config.namespaces["IDFA"].kind == "device"


@pytest.mark.parametrize(("text", "line", "fragment"), [
    (GOOD.replace("unique: false, normaliser: trim}", "uniq: false, normaliser: trim}"), 3,
     "unknown key 'uniq'"),
    (GOOD + "  - {name: ECID, kind: cookie, priority: 1, normaliser: trim}\n", 8,
     "duplicate namespace 'ECID' (first at line 3)"),
    (GOOD.replace("normaliser: phone_e164", "normaliser: phone"), 6,
     "unknown normaliser 'phone'; valid: email, lower, phone_e164, sha256hex, trim, upper"),
    (GOOD.replace("derived_from: Email", "derived_from: Mail"), 5,
     "derived_from names unknown namespace 'Mail'"),
    (GOOD.replace("kind: cookie", "kind: browser"), 3, "unknown kind 'browser'"),
    (GOOD.replace("priority: 10", "priority: high"), 3, "priority must be an integer"),
    (GOOD.replace("unique: true", "unique: 1"), 7, "unique must be true or false"),
    (GOOD.replace("max_identities_per_graph: 50", "max_identities_per_graph: 0"), 1, "must be >= 1"),
    (GOOD.replace("{name: Phone, ", "{"), 6, "missing key(s) name"),
    (GOOD.replace("name: CRMID", "name: 'CRM:ID'"), 7, "must be letters, digits"),
    (GOOD + "extra: 1\n", 8, "unknown key 'extra'"),
    ("namespaces: [\n", 2, "invalid YAML"),
])
def test_bad_config_names_file_line_and_problem(identity_config: Callable[..., IdentityConfig],
                                                text: str, line: int, fragment: str) -> None:
    # Given a config with one mistake / When it is parsed / Then the error says where and what
    with pytest.raises(ConfigError) as info:
        identity_config(text)
    assert info.value.file == "identity.yaml"
    assert info.value.line == line
    assert fragment in info.value.problem
    assert str(info.value).startswith(f"identity.yaml:{line}:")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_identity_config(tmp_path / "nope.yaml")
    assert info.value.file == str(tmp_path / "nope.yaml")


def test_unknown_normaliser_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_normaliser("soundex")
    assert info.value.valid == ["email", "lower", "phone_e164", "sha256hex", "trim", "upper"]


# --- normalisers ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "raw", "expected"), [
    ("trim", "  abc \t", "abc"),
    ("lower", " AbC-123 ", "abc-123"),
    ("upper", " ab-cd ", "AB-CD"),
    ("email", "  John.Doe@Example.COM ", "john.doe@example.com"),
    ("phone_e164", "(201) 555-0123", "+12015550123"),
    ("phone_e164", "+44 20 7946 0958", "+442079460958"),
    ("phone_e164", "0044 20 7946 0958", "+442079460958"),
    ("phone_e164", "1-201-555-0123", "+12015550123"),
    ("phone_e164", "201.555.0123", "+12015550123"),
    ("sha256hex", "A" * 64, "a" * 64),
    ("sha256hex", "hello", sha("hello")),
])
def test_normalisers_canonicalise(name: str, raw: str, expected: str) -> None:
    assert get_normaliser(name)(raw) == expected


def test_phone_uses_configured_default_region() -> None:
    # Given GB as default region / When a national number with trunk 0 is normalised / Then +44 replaces 0
    assert get_normaliser("phone_e164", NormaliserSettings("GB"))("020 7946 0958") == "+442079460958"


@pytest.mark.parametrize(("name", "raw", "reason"), [
    ("trim", "   ", "empty value"),
    ("email", "john.example.com", "an e-mail needs exactly one '@'"),
    ("email", "a@b@c", "an e-mail needs exactly one '@'"),
    ("email", "@example.com", "an e-mail needs text on both sides of '@'"),
    ("email", "john@", "an e-mail needs text on both sides of '@'"),
    ("email", "jo hn@x.com", "an e-mail cannot contain whitespace"),
    ("phone_e164", "12345", "not a valid phone number (libphonenumber)"),
    ("phone_e164", "+1234567890123456", "not a valid phone number (libphonenumber)"),
    ("phone_e164", "1" * 40, "too many digits for a phone number"),
    ("phone_e164", "+999 1234 5678", "a phone number with an unknown country code"),
    ("phone_e164", "call 555 1234", "a phone number may only hold digits, spaces, ()-./ and a leading +"),
])
def test_normalisers_reject_invalid_values(name: str, raw: str, reason: str) -> None:
    with pytest.raises(InvalidValue) as info:
        get_normaliser(name)(raw)
    assert info.value.reason == reason


@given(st.sampled_from(sorted(NORMALISERS)), st.text(max_size=40))
def test_normalisers_are_idempotent(name: str, raw: str) -> None:
    fn = get_normaliser(name)
    try:
        once = fn(raw)
    except InvalidValue:
        return
    # sha256hex of a digest is the digest itself, so every normaliser is a projection.
    assert fn(once) == once


# --- normalise_identities ---------------------------------------------------------------------

def test_normalise_identities_orders_dedups_and_derives(identity_config: Callable[..., IdentityConfig]) -> None:
    # Given raw pairs with duplicates after normalisation, and an e-mail
    raw = [("ECID", " c1 "), ("Email", "Ann@X.com"), ("ECID", "c1"), ("CRMID", "42"),
           ("Phone", "(201) 555-0123"), ("Email", " ann@x.COM ")]
    # When normalised
    identities, problems = normalise_identities(raw, identity_config())
    # Then: priority desc, namespace, id; one hashed e-mail derived
    assert identities == [
        Identity("CRMID", "42"),
        Identity("Email", "ann@x.com"),
        Identity("EMAIL_LC_SHA256", sha("ann@x.com")),
        Identity("Phone", "+12015550123"),
        Identity("ECID", "c1"),
    ]
    assert problems == []


def test_plain_value_in_derived_namespace_hashes_like_the_derivation(
        identity_config: Callable[..., IdentityConfig]) -> None:
    identities, problems = normalise_identities([("EMAIL_LC_SHA256", " Ann@X.com ")], identity_config())
    assert identities == [Identity("EMAIL_LC_SHA256", sha("ann@x.com"))]
    assert problems == []


def test_problems_never_echo_personal_values(identity_config: Callable[..., IdentityConfig]) -> None:
    # Given invalid personal values and an unknown namespace
    raw = [("Email", "secret.person.example.com"), ("Phone", "5551"), ("Fax", "12345"), ("ECID", "ok")]
    # When normalised
    identities, problems = normalise_identities(raw, identity_config())
    # Then the valid one survives, and problems name namespace and reason but not the value
    assert identities == [Identity("ECID", "ok")]
    assert problems == [
        "invalid Email value: an e-mail needs exactly one '@'",
        "invalid Phone value: not a valid phone number (libphonenumber)",
        "unknown namespace 'Fax'",
    ]
    assert not any("secret" in p or "5551" in p or "12345" in p for p in problems)


REASONS = ["empty value", "an e-mail needs exactly one '@'", "an e-mail needs text on both sides of '@'",
           "an e-mail cannot contain whitespace", "too few digits for a phone number",
           "too many digits for a phone number", "a phone number with an unknown country code",
           "not a phone number", "not a valid phone number (libphonenumber)",
           "a phone number may only hold digits, spaces, ()-./ and a leading +"]
ALLOWED_PROBLEMS = {f"invalid {ns} value: {r}" for ns in ["ECID", "Email", "Phone", "CRMID"] for r in REASONS}
ALLOWED_PROBLEMS |= {f"blocked {ns} value: a placeholder on the blocked_values list"
                     for ns in ["ECID", "Email", "Phone", "CRMID"]}
ALLOWED_PROBLEMS.add("unknown namespace 'Nope'")


@given(st.lists(st.tuples(st.sampled_from(["ECID", "Email", "Phone", "CRMID", "Nope"]),
                          st.text(min_size=1, max_size=20)), max_size=8))
def test_problems_never_contain_raw_values_and_output_is_order_free(raw: list[tuple[str, str]]) -> None:
    config = parse_identity_config(GOOD)
    identities, problems = normalise_identities(raw, config)
    # Every problem is one of a fixed set of phrases, so no raw value can leak into it.
    assert set(problems) <= ALLOWED_PROBLEMS
    assert normalise_identities(list(reversed(raw)), config)[0] == identities
    assert len(set(identities)) == len(identities)


def test_derived_namespace_cannot_derive_from_a_derived_one(identity_config: Callable[..., IdentityConfig]) -> None:
    text = GOOD + "  - {name: H2, kind: person, priority: 1, normaliser: sha256hex, derived_from: EMAIL_LC_SHA256}\n"
    with pytest.raises(ConfigError) as info:
        identity_config(text)
    assert (info.value.line, info.value.problem) == (
        8, "namespace 'H2': derived_from must name a namespace that is not itself derived")


def test_programmatic_build_checks_names() -> None:
    # Given namespaces built in code rather than YAML / Then the same checks apply
    email = Namespace("Email", "person", 60, False, "email")
    with pytest.raises(UnknownNameError):
        IdentityConfig.build([email, Namespace("H", "person", 1, False, "sha256hex", "Mail")], 5)
    with pytest.raises(ConfigError, match="duplicate namespace 'Email'"):
        IdentityConfig.build([email, email], 5)
    assert IdentityConfig.build([email], 5).derived == {}
