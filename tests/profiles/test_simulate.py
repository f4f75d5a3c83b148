"""The identity-rules simulator: pasted records stitched by the stages' own handlers, today's rules and changed ones."""

from __future__ import annotations

import json

import pytest

from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.simulate import Rules, SimulationError, parse_records, rules_of, simulate, with_rules
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.settings import PipelineConfig

# A household: two customers (CRM ids A and B) share the cookie c1; A's e-mail was seen on it first
HOUSEHOLD = "\n".join(json.dumps(r) for r in [
    {"id": "r1", "kind": "profile", "identities": {"CRMID": "A", "Email": "a@x.com"}},
    {"id": "r2", "identities": {"ECID": "c1", "Email": "a@x.com"}},
    {"id": "r3", "kind": "profile", "identities": {"CRMID": "B", "ECID": "c1"}},
    {"id": "r4", "identities": {"ECID": "c2", "Phone": "not a phone"}},
])


@pytest.fixture(scope="module")
def cfg() -> ProfileConfig:
    return PipelineConfig.load(EXAMPLE_CONFIG_DIR).profile


def graphs(outcome: dict) -> list[dict[str, list[str]]]:  # type: ignore[type-arg]
    return [{ns: ids for ns, ids in p["identities"].items() if ns != "EMAIL_LC_SHA256"} for p in outcome["profiles"]]


def test_today_a_shared_cookie_stays_with_the_customer_who_linked_it_first(cfg: ProfileConfig) -> None:
    out = simulate(parse_records(HOUSEHOLD), cfg).to_dict()
    assert graphs(out) == [{"CRMID": ["A"], "ECID": ["c1"], "Email": ["a@x.com"]}, {"CRMID": ["B"]}, {"ECID": ["c2"]}]
    assert (out["merged"], [p["events"] for p in out["profiles"]]) == (0, [1, 0, 1])
    assert out["dropped"] == ["line 4: invalid Phone value: a phone number may only hold digits, spaces, ()-./ and "
                              "a leading +"]


def test_without_a_unique_namespace_the_household_becomes_one_profile(cfg: ProfileConfig) -> None:
    out = simulate(parse_records(HOUSEHOLD), with_rules(cfg, Rules(unique=frozenset()))).to_dict()
    assert graphs(out) == [{"CRMID": ["A", "B"], "ECID": ["c1"], "Email": ["a@x.com"]}, {"ECID": ["c2"]}]
    assert out["merged"] == 1


def test_a_smaller_graph_limit_drops_the_cookie_which_the_other_customer_then_takes(cfg: ProfileConfig) -> None:
    out = simulate(parse_records(HOUSEHOLD), with_rules(cfg, Rules(max_identities_per_graph=2))).to_dict()
    assert graphs(out) == [{"CRMID": ["A"], "Email": ["a@x.com"]}, {"CRMID": ["B"], "ECID": ["c1"]}, {"ECID": ["c2"]}]


def test_changed_priorities_are_the_rules_the_simulation_used(cfg: ProfileConfig) -> None:
    changed = rules_of(with_rules(cfg, Rules(priorities={"ECID": 70}, unique=frozenset({"CRMID", "Email"}))).identity)
    assert changed["namespaces"][:3] == [{"name": "CRMID", "priority": 100, "unique": True, "kind": "person"},
                                         {"name": "ECID", "priority": 70, "unique": False, "kind": "cookie"},
                                         {"name": "Email", "priority": 60, "unique": True, "kind": "person"}]


@pytest.mark.parametrize(("text", "message"), [
    ('{"id": "r1", "identities": {"Email": "a@x.com"}}\n[1', "records:2: not JSON"),
    ('{"id": "r1"}', "records:1: 'identities' is an object"),
    ('{"id": "r1", "kind": "visit", "identities": {"ECID": "c"}}', "records:1: 'id' is a string, 'kind' event"),
    ("[" * 100_000, "records:1: not JSON"),
])
def test_bad_records_name_their_line(text: str, message: str) -> None:
    with pytest.raises(SimulationError) as exc:
        parse_records(text)
    assert str(exc.value).startswith(message), str(exc.value)


def test_unknown_namespaces_and_bad_limits_are_refused(cfg: ProfileConfig) -> None:
    with pytest.raises(SimulationError, match=r"unknown namespace\(s\) \['Nope'\]"):
        with_rules(cfg, Rules(priorities={"Nope": 1}))
    with pytest.raises(SimulationError, match="graph limit"):
        with_rules(cfg, Rules(max_identities_per_graph=0))
