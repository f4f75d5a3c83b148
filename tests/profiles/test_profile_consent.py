"""What the profile stage sends for consent at activation: consent attributes on every membership message,
and profile changes that say which memberships changed with them and what the consent values were."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pipeline.model import Identity, ProfileRecord, ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import OpResult, ProfileProcessor
from pipeline.segments import AudienceDef, SegmentEngine, parse_query
from pipeline.stages.messages import Apply, Send, record_to_wire
from pipeline.topics import PROFILE_CHANGES_TOPIC

HOME = Identity("CRMID", "42")
AUDIENCES = [
    # gold does not list the consent attribute; subscribers' query reads it
    AudienceDef("gold", "gold", "", 'loyalty.tier = "gold"', 1, ("loyalty.tier",), parse_query('loyalty.tier = "gold"')),
    AudienceDef("subscribers", "subscribers", "", 'consents.email = "yes"', 1, (),
                parse_query('consents.email = "yes"')),
]


@pytest.fixture
def processor(make_config: Callable[..., ProfileConfig]) -> ProfileProcessor:
    engine = SegmentEngine(AUDIENCES, carried_attributes=("consents.email",))
    return ProfileProcessor(make_config(), engine, clock=lambda: 1_800_000_000.0)


def apply(processor: ProfileProcessor, entry: ProfileState | None, rec: ProfileRecord) -> OpResult:
    return processor.handle("p1", entry, Apply(pid="p1", rec=record_to_wire(rec), home=HOME.key, hop=True))


def profile_change(res: OpResult) -> dict[str, Any]:
    [send] = [s for s in res.sends if s.topic == PROFILE_CHANGES_TOPIC]
    assert isinstance(send, Send)
    return {k: send.value[k] for k in ("attributes", "changed_attributes", "memberships", "memberships_changed",
                                        "previous_attributes")}


def test_membership_messages_carry_the_consent_attribute_their_audience_does_not_list(
        processor: ProfileProcessor, make_record: Callable[..., ProfileRecord]) -> None:
    # Given an engine told to carry consents.email (a destination's consent rule reads it)
    # When a CRM record makes a profile gold and a subscriber
    res = apply(processor, None, make_record(1_000, attributes={"loyalty.tier": "gold", "consents.email": "yes"}))
    # Then both membership messages carry consents.email, gold's own attribute first
    assert {c.audience_id: c.attributes for c in res.changes} == {
        "gold": {"loyalty.tier": "gold", "consents.email": "yes"},
        "subscribers": {"consents.email": "yes"},
    }
    # And the profile change lists both memberships as changed by this handling, with no value before
    assert profile_change(res) == {
        "attributes": {"loyalty.tier": "gold", "consents.email": "yes"},
        "changed_attributes": ["consents.email", "loyalty.tier"],
        "memberships": ["gold", "subscribers"],
        "memberships_changed": ["gold", "subscribers"],
        "previous_attributes": {"consents.email": None},
    }


def test_a_withdrawal_says_the_value_before_and_the_memberships_it_changed(
        processor: ProfileProcessor, make_record: Callable[..., ProfileRecord]) -> None:
    # Given a gold subscriber who consented
    first = apply(processor, None, make_record(1_000, attributes={"loyalty.tier": "gold", "consents.email": "yes"}))
    assert isinstance(first.write, ProfileState)
    # When the CRM says consent is withdrawn
    res = apply(processor, first.write, make_record(2_000, attributes={"consents.email": "no"}, record_id="r2"))
    # Then the subscriber exit carries the new value, gold's membership is unchanged
    assert [(c.audience_id, c.status, c.attributes) for c in res.changes] == [
        ("subscribers", "exited", {"consents.email": "no"})]
    # And the profile change says what the value was and that only subscribers changed with it
    assert profile_change(res) == {
        "attributes": {"loyalty.tier": "gold", "consents.email": "no"},
        "changed_attributes": ["consents.email"],
        "memberships": ["gold"],
        "memberships_changed": ["subscribers"],
        "previous_attributes": {"consents.email": "yes"},
    }


def test_without_consent_rules_messages_carry_only_their_audience_attributes(
        make_config: Callable[..., ProfileConfig], make_record: Callable[..., ProfileRecord]) -> None:
    # Given no destination with a consent rule (nothing to carry)
    processor = ProfileProcessor(make_config(), SegmentEngine(AUDIENCES), clock=lambda: 1_800_000_000.0)
    # When a record makes a profile gold
    res = apply(processor, None, make_record(1_000, attributes={"loyalty.tier": "gold", "consents.email": "yes"}))
    # Then gold's message carries gold's attributes only, and no previous values are sent
    assert {c.audience_id: c.attributes for c in res.changes} == {"gold": {"loyalty.tier": "gold"},
                                                                 "subscribers": {}}
    assert profile_change(res)["previous_attributes"] == {}
