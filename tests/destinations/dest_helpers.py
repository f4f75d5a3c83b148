"""Builders of membership- and profile-change messages and destination configs for the tests."""

from __future__ import annotations

from typing import Any

from pipeline.destinations.config import DestinationConfig, parse_destinations
from pipeline.model import MembershipChange


def membership(profile_id: str = "p1", audience_id: str = "vip", status: str = "realized", *,
               email: str | None = "Jane.Doe@Example.com ", crm: str | None = "C-1",
               consent: str | None = "yes", key: str | None = None, t: int = 1_000) -> dict[str, Any]:
    """A membership-change message as MembershipChange.to_dict() produces it."""
    identities: dict[str, list[str]] = {"ECID": ["ecid-" + profile_id]}
    if email is not None:
        identities["Email"] = [email]
    if crm is not None:
        identities["CRMID"] = [crm]
    attributes: dict[str, Any] = {"loyalty.tier": "gold", "person.name.firstName": "Jane"}
    if consent is not None:
        attributes["consents.email"] = consent
    return MembershipChange(
        profile_id=profile_id, audience_id=audience_id, audience_version=3, status=status,  # type: ignore[arg-type]
        previous_status=None if status == "realized" else "realized", identities=identities,
        attributes=attributes, reason="rule matched", cause_event_id="e1", evaluation="streaming",
        event_time_ms=t, emit_time_ms=t + 5, idempotency_key=key or f"{profile_id}:{audience_id}:{status}:{t}",
    ).to_dict()


def profile_change(profile_id: str = "p1", *, changed_attributes: list[str], memberships: list[str],
                   changed_identities: list[str] | None = None, consent: str = "yes",
                   key: str = "pc-1", previous: dict[str, Any] | None = None,
                   memberships_changed: list[str] | None = None) -> dict[str, Any]:
    """A profile-change message; `previous` and `memberships_changed` are left out unless given (as from a
    worker before consent at activation)."""
    extra: dict[str, Any] = {}
    if previous is not None:
        extra["previous_attributes"] = previous
    if memberships_changed is not None:
        extra["memberships_changed"] = memberships_changed
    return {**extra,
        "profile_id": profile_id,
        "identities": {"Email": ["jane@example.com"], "CRMID": ["C-1"]},
        "attributes": {"loyalty.tier": "platinum", "consents.email": consent, "person.age": 41},
        "changed_attributes": changed_attributes,
        "changed_identities": changed_identities or [],
        "memberships": memberships,
        "event_time_ms": 2_000,
        "idempotency_key": key,
    }


def dest_config(kind: str = "http", *, name: str = "d1", audiences: str = "[vip, churn]",
                extra: str = "", identities: str | None = None,
                consent: str = "{attribute: consents.email, deny_values: [\"no\"]}") -> DestinationConfig:
    """One destination config parsed from YAML, so tests exercise the real loader."""
    kind_settings = {
        "http": "    url: http://127.0.0.1:1/hook\n",
        "kafka": "    topic: activation.out\n",
        "file": "    path: /tmp/unused\n",
    }[kind]
    ids = identities or ("      - {namespace: Email, transform: sha256_lower}\n"
                         "      - {namespace: CRMID}\n")
    text = (
        "destinations:\n"
        f"  - name: {name}\n"
        f"    kind: {kind}\n"
        f"    audiences: {audiences}\n"
        "    identities:\n" + ids +
        "    attributes: [loyalty.tier, consents.email]\n"
        + (f"    consent: {consent}\n" if consent else "")
        + kind_settings + extra
    )
    return parse_destinations(text, file="test.yaml").destinations[0]
