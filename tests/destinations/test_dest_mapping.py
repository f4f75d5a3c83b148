"""Given/When/Then tests of the pure mapping: skip reasons, identity transforms, consent withdrawal."""

from __future__ import annotations

import hashlib

from dest_helpers import dest_config, membership, profile_change

from pipeline.destinations.base import Payload
from pipeline.destinations.mapping import (
    SKIP_AUDIENCE_NOT_ACTIVATED,
    SKIP_CONSENT_DENIED,
    SKIP_CONSENT_UNKNOWN,
    SKIP_KIND_NOT_EXPORTED,
    SKIP_NO_IDENTITY,
    SKIP_NO_MAPPED_CHANGE,
    SKIP_NOT_A_MEMBER,
    Skip,
    map_change,
    map_message,
    map_profile_change,
    transform_identity,
)


def test_membership_is_mapped_with_transformed_identities_and_projected_attributes() -> None:
    # Given a destination activating "vip" with Email as sha256_lower and CRMID as-is
    dest = dest_config()
    # When a realized membership arrives
    result = map_change(membership(), dest)
    # Then one membership payload carries only the mapped identities and attributes
    assert isinstance(result, Payload)
    assert result.kind == "membership" and result.status == "realized" and result.audience_id == "vip"
    assert result.identities == {
        "Email": [hashlib.sha256(b"jane.doe@example.com").hexdigest()],
        "CRMID": ["C-1"],
    }
    assert "ECID" not in result.identities
    assert result.attributes == {"loyalty.tier": "gold", "consents.email": "yes"}
    assert result.idempotency_key == "p1:vip:realized:1000"
    assert result.source_emit_ms == 1005 and result.destination == "d1"


def test_audience_not_activated_is_skipped() -> None:
    # Given a destination for vip/churn, When a membership of another audience arrives, Then skip
    assert map_change(membership(audience_id="other"), dest_config()) == Skip(SKIP_AUDIENCE_NOT_ACTIVATED)


def test_star_activates_every_audience() -> None:
    assert isinstance(map_change(membership(audience_id="any"), dest_config(audiences='"*"')), Payload)


def test_profile_without_any_needed_identity_is_skipped_not_sent_half_empty() -> None:
    # Given a profile with neither Email nor CRMID (only ECID, which the destination does not take)
    msg = membership(email=None, crm=None)
    # Then it is skipped (and counted by the runner) rather than sent with empty identities
    assert map_change(msg, dest_config()) == Skip(SKIP_NO_IDENTITY)


def test_profile_with_some_identities_sends_only_those_it_has() -> None:
    result = map_change(membership(email=None), dest_config())
    assert isinstance(result, Payload)
    assert result.identities == {"CRMID": ["C-1"]}


def test_blank_identity_values_count_as_missing() -> None:
    assert map_change(membership(email="  ", crm=None), dest_config()) == Skip(SKIP_NO_IDENTITY)


def test_realized_membership_with_denied_consent_is_skipped() -> None:
    # Given consent "no" (case-insensitive), When a realized membership arrives, Then it is skipped
    assert map_change(membership(consent="No"), dest_config()) == Skip(SKIP_CONSENT_DENIED)


def test_exit_is_sent_even_when_consent_denied() -> None:
    result = map_change(membership(status="exited", consent="no"), dest_config())
    assert isinstance(result, Payload) and result.status == "exited"


def test_consent_withdrawal_sends_an_exit_per_activated_audience() -> None:
    # Given a member of vip and churn (both activated) and of other (not activated)
    msg = profile_change(changed_attributes=["consents.email"], memberships=["vip", "other", "churn"],
                         consent="no")
    # When the consent attribute changes to a deny value
    result = map_profile_change(msg, dest_config())
    # Then one exited membership payload per activated audience, with distinct idempotency keys
    assert isinstance(result, list)
    assert [(p.audience_id, p.status, p.kind) for p in result] == [
        ("churn", "exited", "membership"), ("vip", "exited", "membership")]
    assert len({p.idempotency_key for p in result}) == 2


def test_a_membership_without_the_consent_value_follows_on_missing() -> None:
    # Given a message whose attributes lack the rule's attribute (or hold null)
    absent, null = membership(consent=None), membership(consent=None)
    null["attributes"]["consents.email"] = None
    # When the rule says nothing of a missing value (deny), Then neither is delivered: unknown consent
    assert [map_change(m, dest_config()) for m in (absent, null)] == [Skip(SKIP_CONSENT_UNKNOWN)] * 2
    # When the rule says on_missing: allow, Then both are
    allow = dest_config(consent="{attribute: consents.email, on_missing: allow}")
    assert all(isinstance(map_change(m, allow), Payload) for m in (absent, null))
    # And an exit is delivered whatever the rule
    assert isinstance(map_change(membership(status="exited", consent=None), dest_config()), Payload)


def test_consent_granted_again_sends_an_enter_per_activated_audience_not_decided_with_it() -> None:
    # Given a member of vip, churn (activated) and other, whose consent goes from "no" to "yes", and whose
    # churn membership was decided by the same handling (its own message says it)
    msg = profile_change(changed_attributes=["consents.email"], memberships=["vip", "other", "churn"],
                         consent="yes", previous={"consents.email": "no"}, memberships_changed=["churn"])
    # When mapped, Then one realized payload for vip, saying why
    result = map_profile_change(msg, dest_config())
    assert result == [Payload(
        destination="d1", profile_id="p1", audience_id="vip", kind="membership", status="realized",
        identities={"Email": [hashlib.sha256(b"jane@example.com").hexdigest()], "CRMID": ["C-1"]},
        attributes={"loyalty.tier": "platinum", "consents.email": "yes"}, idempotency_key="pc-1:consent-enter:vip",
        event_time_ms=2_000, source_emit_ms=2_000, reason="consent_granted")]


def test_a_withdrawal_says_why_and_leaves_out_memberships_decided_with_it() -> None:
    msg = profile_change(changed_attributes=["consents.email"], memberships=["vip", "churn"], consent="no",
                         previous={"consents.email": "yes"}, memberships_changed=["vip"])
    result = map_profile_change(msg, dest_config())
    assert isinstance(result, list)
    assert [(p.audience_id, p.status, p.reason, p.idempotency_key) for p in result] == [
        ("churn", "exited", "consent_withdrawn", "pc-1:consent-exit:churn")]
    # When every activated membership was decided with it, Then nothing more is sent
    only = profile_change(changed_attributes=["consents.email"], memberships=["vip"], consent="no",
                          previous={"consents.email": "yes"}, memberships_changed=["vip"])
    assert map_profile_change(only, dest_config()) == Skip(SKIP_CONSENT_DENIED)
    # And a grant decided with every membership is an ordinary attribute update
    grant = profile_change(changed_attributes=["consents.email"], memberships=["vip"], consent="yes",
                           previous={"consents.email": None}, memberships_changed=["vip"])
    result = map_profile_change(grant, dest_config())
    assert isinstance(result, list) and [(p.kind, p.status, p.reason) for p in result] == [
        ("attributes", "updated", None)]


def test_a_change_between_values_the_rule_reads_alike_is_an_attribute_update() -> None:
    # Given consent going from "yes" to "Y" (both granted), When mapped, Then an attributes update only
    msg = profile_change(changed_attributes=["consents.email"], memberships=["vip"], consent="Y",
                         previous={"consents.email": "yes"})
    result = map_profile_change(msg, dest_config())
    assert isinstance(result, list) and [(p.kind, p.status, p.reason) for p in result] == [
        ("attributes", "updated", None)]
    # And between two deny values: nothing (the profile was exited when consent was withdrawn)
    msg = profile_change(changed_attributes=["consents.email"], memberships=["vip"], consent="no",
                         previous={"consents.email": "No"})
    assert map_profile_change(msg, dest_config()) == Skip(SKIP_CONSENT_DENIED)


def test_consent_already_denied_sends_nothing_on_other_changes() -> None:
    msg = profile_change(changed_attributes=["loyalty.tier"], memberships=["vip"], consent="no")
    assert map_profile_change(msg, dest_config()) == Skip(SKIP_CONSENT_DENIED)


def test_mapped_attribute_change_of_a_member_is_sent() -> None:
    # Given a vip member, When a mapped attribute changes, Then one attributes payload (no audience)
    msg = profile_change(changed_attributes=["loyalty.tier"], memberships=["vip"])
    result = map_message(msg, dest_config())
    assert isinstance(result, list) and len(result) == 1
    p = result[0]
    assert (p.kind, p.status, p.audience_id) == ("attributes", "updated", None)
    assert p.attributes == {"loyalty.tier": "platinum", "consents.email": "yes"}
    assert p.idempotency_key == "pc-1"


def test_mapped_identity_change_of_a_member_is_sent() -> None:
    msg = profile_change(changed_attributes=[], changed_identities=["CRMID"], memberships=["vip"])
    assert isinstance(map_profile_change(msg, dest_config()), list)


def test_unmapped_change_is_skipped() -> None:
    msg = profile_change(changed_attributes=["person.age"], changed_identities=["ECID"], memberships=["vip"])
    assert map_profile_change(msg, dest_config()) == Skip(SKIP_NO_MAPPED_CHANGE)


def test_change_of_a_non_member_is_skipped() -> None:
    msg = profile_change(changed_attributes=["loyalty.tier"], memberships=["other"])
    assert map_profile_change(msg, dest_config()) == Skip(SKIP_NOT_A_MEMBER)


def test_file_destinations_do_not_get_attribute_only_changes() -> None:
    msg = profile_change(changed_attributes=["loyalty.tier"], memberships=["vip"])
    assert map_profile_change(msg, dest_config("file")) == Skip(SKIP_KIND_NOT_EXPORTED)


def test_identity_transforms_match_hashlib() -> None:
    raw = "  Jane.Doe@Example.COM "
    assert transform_identity(raw, "sha256_lower") == hashlib.sha256(b"jane.doe@example.com").hexdigest()
    assert transform_identity(raw, "sha256") == hashlib.sha256(b"Jane.Doe@Example.COM").hexdigest()
    assert transform_identity(raw, "lower") == "jane.doe@example.com"
    assert transform_identity(raw, "none") == "Jane.Doe@Example.COM"


def test_transform_collapsing_values_dedupes() -> None:
    msg = membership()
    msg["identities"]["Email"] = ["A@x.com", "a@X.com"]
    result = map_change(msg, dest_config())
    assert isinstance(result, Payload) and len(result.identities["Email"]) == 1


def test_avro_timestamp_millis_datetimes_are_accepted() -> None:
    # Given the message as the Avro serde decodes it (timestamp-millis -> aware datetime)
    from datetime import UTC, datetime
    msg = membership()
    msg["event_time_ms"] = datetime.fromtimestamp(1.5, UTC)
    msg["emit_time_ms"] = datetime.fromtimestamp(2.0, UTC)
    result = map_change(msg, dest_config())
    assert isinstance(result, Payload) and (result.event_time_ms, result.source_emit_ms) == (1500, 2000)
