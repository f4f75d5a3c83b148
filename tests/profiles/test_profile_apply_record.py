"""Tests of apply_record under both merge policies, including order independence (hypothesis)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.model import AttributeValue, Identity, ProfileRecord, ProfileState, Scalar
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import ChangeSummary, apply_record, live_attributes


def test_first_record_sets_attributes_and_identities(make_config: Callable[..., ProfileConfig],
                                                     make_record: Callable[..., ProfileRecord],
                                                     make_profile: Callable[..., ProfileState]) -> None:
    profile = make_profile()
    summary = apply_record(profile, make_record(100, "crm", {"person.name": "Ann", "loyalty.points": 5}),
                           make_config())
    assert profile.attributes == {"person.name": AttributeValue("Ann", "crm", 100),
                                  "loyalty.points": AttributeValue(5, "crm", 100)}
    assert profile.identities == {"CRMID": {"42": 100}}
    assert summary == ChangeSummary(changed=True, attributes_changed=frozenset({"person.name", "loyalty.points"}),
                                    identities_added=(Identity("CRMID", "42"),))


def test_timestamp_policy_newest_wins_and_ties_go_to_first_dataset_name(
        make_config: Callable[..., ProfileConfig], make_record: Callable[..., ProfileRecord],
        make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config("timestamp")
    apply_record(profile, make_record(200, "loyalty", {"tier": "gold", "city": "Oslo"}), config)
    # an older crm value loses; a newer one wins; an equal-time crm value wins on name order
    older = apply_record(profile, make_record(100, "crm", {"tier": "silver"}), config)
    tie = apply_record(profile, make_record(200, "crm", {"city": "Bergen"}), config)
    # (only the identity's first-seen moved earlier: a change to persist, nothing to re-evaluate)
    assert older == ChangeSummary(changed=True)
    assert not older.needs_evaluation
    assert tie.attributes_changed == frozenset({"city"})
    assert profile.attributes == {"tier": AttributeValue("gold", "loyalty", 200),
                                  "city": AttributeValue("Bergen", "crm", 200)}


def test_precedence_policy_ignores_time_across_datasets(make_config: Callable[..., ProfileConfig],
                                                        make_record: Callable[..., ProfileRecord],
                                                        make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config("precedence")  # order: crm, loyalty, orders
    apply_record(profile, make_record(100, "crm", {"tier": "silver"}), config)
    newer_lower = apply_record(profile, make_record(900, "loyalty", {"tier": "gold"}), config)
    newer_same = apply_record(profile, make_record(150, "crm", {"tier": "bronze"}), config)
    unlisted = apply_record(profile, make_record(999, "web-events", {"tier": "x", "seen": True}), config)
    assert newer_lower.attributes_changed == frozenset()
    assert newer_same.attributes_changed == frozenset({"tier"})
    assert unlisted.attributes_changed == frozenset({"seen"})
    assert profile.attributes == {"tier": AttributeValue("bronze", "crm", 150),
                                  "seen": AttributeValue(True, "web-events", 999)}


def test_none_deletes_when_it_wins_and_blocks_older_values(make_config: Callable[..., ProfileConfig],
                                                           make_record: Callable[..., ProfileRecord],
                                                           make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config("timestamp")
    apply_record(profile, make_record(100, "crm", {"phone_ok": True, "name": "Ann"}), config)
    deleted = apply_record(profile, make_record(200, "crm", {"phone_ok": None}), config)
    late_old = apply_record(profile, make_record(150, "crm", {"phone_ok": False}), config)
    assert deleted.attributes_changed == frozenset({"phone_ok"})
    assert late_old == ChangeSummary()
    assert live_attributes(profile) == {"name": "Ann"}
    assert profile.attributes["phone_ok"] == AttributeValue(None, "crm", 200)  # tombstone


def test_type_change_is_a_visible_change(make_config: Callable[..., ProfileConfig],
                                         make_record: Callable[..., ProfileRecord],
                                         make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config()
    apply_record(profile, make_record(1, "crm", {"v": 1}), config)
    same = apply_record(profile, make_record(2, "crm", {"v": 1}), config)
    retyped = apply_record(profile, make_record(3, "crm", {"v": 1.0}), config)
    assert same.changed and same.attributes_changed == frozenset()  # provenance moved only
    assert retyped.attributes_changed == frozenset({"v"})


scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                    st.sampled_from(["a", "b", ""]))
upserts = st.lists(st.tuples(st.sampled_from(["crm", "loyalty", "orders", "web-events"]),
                             st.integers(0, 5),
                             st.dictionaries(st.sampled_from(["x", "y", "z"]), scalars, max_size=3)),
                   max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["timestamp", "precedence"]), upserts, st.randoms(use_true_random=False))
def test_result_is_independent_of_upsert_order(make_config: Callable[..., ProfileConfig],
                                               make_record: Callable[..., ProfileRecord],
                                               make_profile: Callable[..., ProfileState], policy: str,
                                               batch: list[tuple[str, int, dict[str, Scalar]]],
                                               rnd: object) -> None:
    # Given a set of upserts / When applied in two different orders / Then the profiles agree
    config = make_config(policy)
    records = [make_record(ts, ds, attrs) for ds, ts, attrs in batch]
    shuffled = list(records)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a, b = make_profile(), make_profile()
    for r in records:
        apply_record(a, r, config)
    for r in shuffled:
        apply_record(b, r, config)
    assert _canon(a) == _canon(b)


def _canon(p: ProfileState) -> dict[str, tuple[str, Scalar, str, int]]:
    # type name included: 1 == 1.0 == True would hide a difference
    return {k: (type(v.value).__name__, v.value, v.dataset, v.ts_ms) for k, v in p.attributes.items()}
