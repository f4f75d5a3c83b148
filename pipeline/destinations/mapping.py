"""Pure mapping of membership- and profile-change messages to destination payloads (or a Skip)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pipeline import consent as consent_rule
from pipeline.destinations.base import Payload, PayloadStatus
from pipeline.destinations.config import DestinationConfig, IdentityTransform
from pipeline.model import Scalar
from pipeline.privacy.erasure import REASON as ERASURE

# Skip reasons: short, stable strings the runner counts per destination.
SKIP_AUDIENCE_NOT_ACTIVATED: Final = "audience_not_activated"
SKIP_NO_IDENTITY: Final = "no_identity"
SKIP_CONSENT_DENIED: Final = "consent_denied"
SKIP_CONSENT_UNKNOWN: Final = "consent_unknown"  # no value of the rule's attribute, and on_missing: deny
SKIP_NO_MAPPED_CHANGE: Final = "no_mapped_change"
SKIP_NOT_A_MEMBER: Final = "not_a_member"
SKIP_KIND_NOT_EXPORTED: Final = "attributes_not_exported"


@dataclass(frozen=True)
class Skip:
    """A message this destination does not receive, and why (one of the SKIP_* reasons)."""

    reason: str


def transform_identity(value: str, transform: IdentityTransform) -> str:
    """Apply one identity transform; hashing is of the trimmed value (lowercased for *_lower)."""
    v = value.strip()
    if transform == "none":
        return v
    if transform == "lower":
        return v.lower()
    if transform == "sha256_lower":
        v = v.lower()
    return hashlib.sha256(v.encode("utf-8")).hexdigest()


def map_identities(identities: dict[str, list[str]], dest: DestinationConfig) -> dict[str, list[str]]:
    """The destination's namespaces that the profile has, transformed; absent ones are left out."""
    out: dict[str, list[str]] = {}
    for m in dest.identities:
        values = [v for v in identities.get(m.namespace) or [] if v and v.strip()]
        if values:
            # Transforms can collapse values (e.g. two casings of one e-mail): dedupe, keep order.
            out[m.namespace] = list(dict.fromkeys(transform_identity(v, m.transform) for v in values))
    return out


def project_attributes(attributes: dict[str, Scalar], dest: DestinationConfig) -> dict[str, Scalar]:
    """Only the dotted paths the destination maps; a mapped path the profile lacks is left out."""
    return {path: attributes[path] for path in dest.attributes if path in attributes}


def to_ms(value: Any) -> int:
    """Epoch milliseconds from an int or from the datetime Avro's timestamp-millis decodes to."""
    if value is None:
        return 0
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    return int(value)


def is_membership_message(msg: dict[str, Any]) -> bool:
    """Membership changes carry audience_id and status; profile changes carry changed_attributes."""
    return "audience_id" in msg and "status" in msg


def map_change(msg: dict[str, Any], dest: DestinationConfig) -> Payload | Skip:
    """Map one membership-change message (MembershipChange.to_dict()) for one destination.

    Skips, in this order: audience not activated; realized/existing membership whose consent the
    destination's rule does not permit: denied, or unknown (the message has no value of the rule's attribute)
    with `on_missing: deny` (exits are still sent: removing someone is always allowed); no identity the
    destination needs.
    """
    audience_id = str(msg["audience_id"])
    if not dest.activates(audience_id):
        return Skip(SKIP_AUDIENCE_NOT_ACTIVATED)
    attributes: dict[str, Scalar] = dict(msg.get("attributes") or {})
    status = msg["status"]
    rule = dest.consent
    if status != "exited" and rule is not None:
        value = attributes.get(rule.attribute)
        if not consent_rule.permits(rule, value):
            return Skip(SKIP_CONSENT_DENIED if value is not None else SKIP_CONSENT_UNKNOWN)
    identities = map_identities(dict(msg.get("identities") or {}), dest)
    if not identities:
        return Skip(SKIP_NO_IDENTITY)
    event_time = to_ms(msg.get("event_time_ms"))
    return Payload(
        destination=dest.name,
        profile_id=str(msg["profile_id"]),
        audience_id=audience_id,
        kind="membership",
        status=status,
        identities=identities,
        attributes=project_attributes(attributes, dest),
        idempotency_key=str(msg["idempotency_key"]),
        event_time_ms=event_time,
        source_emit_ms=to_ms(msg.get("emit_time_ms")) or event_time,
        reason=ERASURE if status == "exited" and msg.get("reason") == ERASURE else None,
    )


def map_profile_change(msg: dict[str, Any], dest: DestinationConfig) -> list[Payload] | Skip:
    """Map one profile-change message for one destination.

    1. The profile must be a member of at least one audience the destination activates.
    2. Consent withdrawn (the rule no longer permits the new value of its attribute, see
       pipeline.consent.flip): one `exited` payload (reason `consent_withdrawn`) per activated audience;
       consent granted: one `realized` payload (reason `consent_granted`) per activated audience. Audiences
       whose membership changed in the same handling (`memberships_changed`) are left out: their own
       membership message says it, checked against the new value (none left: go on with 3. and 4.).
    3. Consent not permitted and not changing: nothing (the profile was exited, or never entered).
    4. Otherwise an `updated` attributes payload, only if a changed attribute or identity namespace
       is mapped by the destination (file destinations skip these: they export memberships).
    """
    active = [a for a in msg.get("memberships") or [] if dest.activates(str(a))]
    if not active:
        return Skip(SKIP_NOT_A_MEMBER)
    identities = map_identities(dict(msg.get("identities") or {}), dest)
    if not identities:
        return Skip(SKIP_NO_IDENTITY)
    attributes: dict[str, Scalar] = dict(msg.get("attributes") or {})
    changed_attrs = set(msg.get("changed_attributes") or [])
    key = str(msg["idempotency_key"])
    event_time = to_ms(msg.get("event_time_ms"))
    emit_time = to_ms(msg.get("emit_time_ms")) or event_time
    profile_id = str(msg["profile_id"])
    projected = project_attributes(attributes, dest)

    rule = dest.consent
    if rule is not None:
        previous = msg.get("previous_attributes")
        flip = consent_rule.flip(rule, attributes, changed_attrs, previous)
        if flip is not None:
            decided = set(map(str, msg.get("memberships_changed") or ()))
            status: PayloadStatus = "exited" if flip == "withdrawn" else "realized"
            tag = "consent-exit" if flip == "withdrawn" else "consent-enter"
            reason = consent_rule.REASON_WITHDRAWN if flip == "withdrawn" else consent_rule.REASON_GRANTED
            out = [Payload(
                destination=dest.name, profile_id=profile_id, audience_id=a, kind="membership",
                status=status, identities=identities, attributes=projected,
                idempotency_key=f"{key}:{tag}:{a}", event_time_ms=event_time, source_emit_ms=emit_time,
                reason=reason,
            ) for a in sorted(map(str, active)) if a not in decided]
            if out:
                return out
            # every activated membership was decided with it: an ordinary change (3. or 4.)
        value = attributes.get(rule.attribute)
        if not consent_rule.permits(rule, value):
            # Not permitted before this change either: the profile was exited then (or never entered).
            return Skip(SKIP_CONSENT_DENIED if value is not None else SKIP_CONSENT_UNKNOWN)

    changed_ns = set(msg.get("changed_identities") or [])
    if not (changed_attrs & set(dest.attributes)) and not (changed_ns & dest.identity_namespaces):
        return Skip(SKIP_NO_MAPPED_CHANGE)
    if dest.kind == "file":
        return Skip(SKIP_KIND_NOT_EXPORTED)
    return [Payload(
        destination=dest.name, profile_id=profile_id, audience_id=None, kind="attributes",
        status="updated", identities=identities, attributes=projected, idempotency_key=key,
        event_time_ms=event_time, source_emit_ms=emit_time,
    )]


def map_message(msg: dict[str, Any], dest: DestinationConfig) -> list[Payload] | Skip:
    """Map either message type: the runner's single entry point."""
    if is_membership_message(msg):
        result = map_change(msg, dest)
        return result if isinstance(result, Skip) else [result]
    return map_profile_change(msg, dest)
