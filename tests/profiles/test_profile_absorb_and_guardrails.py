"""Tests of absorb (incl. order independence), unique_conflicts and enforce_identity_limit."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.model import (
    AttributeValue,
    ExperienceEvent,
    Identity,
    Membership,
    ProfileRecord,
    ProfileState,
    StoredEvent,
)
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import (
    ChangeSummary,
    absorb,
    apply_event,
    apply_record,
    enforce_identity_limit,
    unique_conflicts,
)


def test_absorb_unions_everything_but_memberships(make_config: Callable[..., ProfileConfig],
                                                  make_event: Callable[..., ExperienceEvent],
                                                  make_record: Callable[..., ProfileRecord],
                                                  make_profile: Callable[..., ProfileState]) -> None:
    # Given two profiles sharing one event and one identity
    config = make_config("timestamp")
    survivor, other = make_profile("p1", created_ms=50), make_profile("p2", created_ms=10)
    apply_event(survivor, make_event("e1", 100, identities=(Identity("ECID", "c1"),)), config)
    apply_event(survivor, make_event("e3", 300, identities=(Identity("ECID", "c1"),)), config)
    apply_record(survivor, make_record(100, "crm", {"name": "Ann", "tier": "gold"}, ()), config)
    apply_event(other, make_event("e2", 200, "order", identities=(Identity("ECID", "c1"), Identity("Email", "a@x"))),
                config)
    apply_event(other, make_event("e3", 300, identities=(Identity("ECID", "c1"),)), config)
    apply_record(other, make_record(200, "loyalty", {"tier": "silver", "points": 7}, ()), config)
    other.memberships["aud1"] = Membership("aud1", "realized", 1, 1, "x", 1)
    seq = survivor.seq
    # When the other is absorbed
    summary = absorb(survivor, other, config)
    # Then the survivor holds the union; memberships are not copied
    assert survivor.identities == {"ECID": {"c1": 100}, "Email": {"a@x": 200}}
    assert survivor.attributes == {"name": AttributeValue("Ann", "crm", 100),
                                   "tier": AttributeValue("silver", "loyalty", 200),
                                   "points": AttributeValue(7, "loyalty", 200)}
    assert [(e.event_id, e.ts_ms) for e in survivor.events] == [("e1", 100), ("e2", 200), ("e3", 300)]
    assert survivor.memberships == {}
    assert survivor.created_ms == 10
    assert survivor.profile_id == "p1" and survivor.seq == seq + 1
    assert summary == ChangeSummary(changed=True, event_types_added=frozenset({"order"}),
                                    attributes_changed=frozenset({"tier", "points"}),
                                    identities_added=(Identity("Email", "a@x"),), events_added=1)


def test_absorb_respects_the_event_cap(make_config: Callable[..., ProfileConfig],
                                      make_event: Callable[..., ExperienceEvent],
                                      make_profile: Callable[..., ProfileState]) -> None:
    config = make_config(max_events=3)
    a, b = make_profile("p1"), make_profile("p2")
    for eid, ts in [("a1", 10), ("a2", 40)]:
        apply_event(a, make_event(eid, ts, "ta"), config)
    for eid, ts in [("b1", 20), ("b2", 5), ("b3", 30)]:
        apply_event(b, make_event(eid, ts, "tb"), config)
    summary = absorb(a, b, config)
    assert [(e.event_id, e.ts_ms) for e in a.events] == [("b1", 20), ("b3", 30), ("a2", 40)]
    assert (summary.events_added, summary.events_dropped) == (2, 1)
    assert summary.event_types_dropped == frozenset({"ta"})


def test_absorbing_a_copy_of_yourself_changes_nothing(make_config: Callable[..., ProfileConfig],
                                                      make_event: Callable[..., ExperienceEvent],
                                                      make_profile: Callable[..., ProfileState]) -> None:
    config = make_config()
    a, b = make_profile("p1"), make_profile("p2")
    for p in (a, b):
        apply_event(p, make_event("e1", 10), config)
    assert absorb(a, b, config) == ChangeSummary()


# --- order independence of absorb (hypothesis) -------------------------------------------------

profile_inputs = st.tuples(
    st.integers(0, 100),  # created_ms
    st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 50),
                       st.sampled_from([Identity("ECID", "1"), Identity("ECID", "2"), Identity("Email", "e")])),
             max_size=6),
    st.lists(st.tuples(st.sampled_from(["crm", "loyalty", "web-events"]), st.integers(0, 5),
                       st.sampled_from(["x", "y"]), st.one_of(st.none(), st.integers(0, 2), st.text(max_size=1))),
             max_size=5),
)


def _build(pid: str, spec: tuple[int, list[Any], list[Any]], config: ProfileConfig,
           make_event: Callable[..., ExperienceEvent], make_record: Callable[..., ProfileRecord]) -> ProfileState:
    created, events, records = spec
    p = ProfileState(pid, created)
    for eid, ts, ident in events:
        apply_event(p, make_event(eid, ts, identities=(ident,)), config)
    for ds, ts, path, value in records:
        apply_record(p, make_record(ts, ds, {path: value}, ()), config)
    return p


def _canon(p: ProfileState) -> tuple[Any, ...]:
    return (p.identities, {k: (type(v.value).__name__, v.value, v.dataset, v.ts_ms) for k, v in p.attributes.items()},
            [(e.event_id, e.ts_ms) for e in p.events], p.created_ms)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["timestamp", "precedence"]), st.integers(1, 8),
       st.tuples(profile_inputs, profile_inputs, profile_inputs))
def test_absorb_order_does_not_matter(make_config: Callable[..., ProfileConfig],
                                      make_event: Callable[..., ExperienceEvent],
                                      make_record: Callable[..., ProfileRecord], policy: str, cap: int,
                                      specs: tuple[Any, Any, Any]) -> None:
    # Given three profiles / When merged in every order / Then identities, attributes, events agree
    config = make_config(policy, max_events=cap, retention="30ms")
    results = []
    for order in itertools.permutations(range(3)):
        ps = [_build(f"p{i}", specs[i], config, make_event, make_record) for i in order]
        absorb(ps[0], ps[1], config)
        absorb(ps[0], ps[2], config)
        results.append(_canon(ps[0]))
    assert all(r == results[0] for r in results)


# --- unique_conflicts ---------------------------------------------------------------------------

def test_unique_conflicts_only_for_different_ids_in_unique_namespaces(
        make_config: Callable[..., ProfileConfig], make_profile: Callable[..., ProfileState]) -> None:
    config = make_config()
    a = make_profile(identities={"CRMID": {"1": 5}, "ECID": {"c1": 5}})
    assert unique_conflicts(a, [Identity("CRMID", "2"), Identity("ECID", "c2")], config) == ["CRMID"]
    assert unique_conflicts(a, {"CRMID": {"1": 9}}, config) == []
    assert unique_conflicts(a, make_profile(identities={"Email": {"a@x": 1}}), config) == []
    assert unique_conflicts({"ECID": {"c1": 1}}, [Identity("CRMID", "2")], config) == []


# --- enforce_identity_limit --------------------------------------------------------------------

def test_identity_limit_drops_cookies_then_devices_then_people_oldest_first(
        make_config: Callable[..., ProfileConfig], make_profile: Callable[..., ProfileState]) -> None:
    # Given 8 identities and a limit of 3
    config = make_config(max_ids=3)
    profile = make_profile(identities={
        "ECID": {"new": 50, "old": 10},
        "GAID": {"g": 5},
        "IDFA": {"I": 1},
        "Email": {"e@x": 40, "f@x": 1},
        "Phone": {"+15551234567": 100},
        "CRMID": {"42": 200},
    })
    # When the limit is enforced
    removed = enforce_identity_limit(profile, config)
    # Then cookies go (oldest first), then devices, then the lowest-priority person ids
    assert removed == sorted([Identity("ECID", "old"), Identity("ECID", "new"), Identity("GAID", "g"),
                              Identity("IDFA", "I"), Identity("Phone", "+15551234567")])
    assert profile.identities == {"Email": {"e@x": 40, "f@x": 1}, "CRMID": {"42": 200}}
    # And a second call has nothing to do
    assert enforce_identity_limit(profile, config) == []


def test_identity_limit_within_one_namespace_keeps_newest(make_config: Callable[..., ProfileConfig],
                                                          make_profile: Callable[..., ProfileState]) -> None:
    config = make_config(max_ids=2)
    profile = make_profile(identities={"ECID": {"a": 3, "b": 1, "c": 2}, "Email": {"e": 0}})
    assert enforce_identity_limit(profile, config) == [Identity("ECID", "b"), Identity("ECID", "c")]
    assert profile.identities == {"ECID": {"a": 3}, "Email": {"e": 0}}


def test_stored_events_are_not_shared_with_the_input_event(make_config: Callable[..., ProfileConfig],
                                                           make_event: Callable[..., ExperienceEvent],
                                                           make_profile: Callable[..., ProfileState]) -> None:
    event = make_event(fields={"a": 1})
    profile = make_profile()
    apply_event(profile, event, make_config())
    event.fields["a"] = 2
    assert profile.events == [StoredEvent("e1", "web.pageview", 1_000, "web-events", {"a": 1})]
