"""Membership transitions: turn decisions into profile.memberships updates and membership-change messages."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import cast, get_args

from pipeline.model import (
    EvaluationKind,
    Membership,
    MembershipChange,
    MembershipStatus,
    ProfileState,
    Scalar,
)
from pipeline.segments.engine import Decision, SegmentEngine

_KINDS = frozenset(get_args(EvaluationKind))


def idempotency_key(profile_id: str, audience_id: str, version: int, status: str, since_ms: int) -> str:
    """sha256 of profile_id|audience_id|audience_version|status|since_ms, first 32 hex chars."""
    raw = f"{profile_id}|{audience_id}|{version}|{status}|{since_ms}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def _kind(kind: str) -> EvaluationKind:
    if kind not in _KINDS:
        raise ValueError(f"unknown evaluation kind {kind!r}; valid: {', '.join(sorted(_KINDS))}")
    return cast(EvaluationKind, kind)


def grouped_identities(profile: ProfileState) -> dict[str, list[str]]:
    """The profile's identities as messages carry them: namespaces in order, each with its ids sorted."""
    return {ns: sorted(ids) for ns, ids in sorted(profile.identities.items())}


def _carried(profile: ProfileState, attributes: Sequence[str]) -> dict[str, Scalar]:
    # Missing attributes are sent as null so every message of an audience has the same keys.
    out: dict[str, Scalar] = {}
    for path in attributes:
        av = profile.attributes.get(path)
        out[path] = av.value if av is not None else None
    return out


def carried_paths(engine: SegmentEngine, audience_attributes: Sequence[str]) -> tuple[str, ...]:
    """What a membership message carries: its audience's attributes, then the consent attributes."""
    extra = engine.carried_attributes
    if not extra:
        return tuple(audience_attributes)
    return tuple(dict.fromkeys((*audience_attributes, *extra)))


def _change(profile: ProfileState, audience_id: str, version: int, status: MembershipStatus,
            previous: MembershipStatus | None, since_ms: int, attributes: Sequence[str],
            identities: dict[str, list[str]], reason: str, cause: str | None, kind: EvaluationKind,
            event_time_ms: int, now_ms: int) -> MembershipChange:
    return MembershipChange(
        profile_id=profile.profile_id, audience_id=audience_id, audience_version=version, status=status,
        previous_status=previous, identities=identities, attributes=_carried(profile, attributes),
        reason=reason, cause_event_id=cause, evaluation=kind, event_time_ms=event_time_ms, emit_time_ms=now_ms,
        idempotency_key=idempotency_key(profile.profile_id, audience_id, version, status, since_ms))


def apply_decisions(profile: ProfileState, decisions: Sequence[Decision], engine: SegmentEngine, *, now_ms: int,
                    event_time_ms: int, kind: str, identities: dict[str, list[str]] | None = None,
                    ) -> list[MembershipChange]:
    """Update profile.memberships in place and return the membership changes to emit.

    Newly qualifies -> 'realized' (message); qualified before and still does -> 'existing' silently;
    stops qualifying -> 'exited' (message); no message for a non-change. since_ms is the event time, so
    replaying the same input yields the same idempotency key.
    """
    ek = _kind(kind)
    idents = identities
    out: list[MembershipChange] = []
    for d in decisions:
        audience = engine.audiences[d.audience_id]
        prev = profile.memberships.get(d.audience_id)
        active = prev is not None and prev.status != "exited"
        if d.qualified and active:
            assert prev is not None
            if prev.status == "realized" or prev.version != audience.version:
                prev.status = "existing"  # silent: consumers already know it is a member
                prev.version = audience.version
                prev.changed_ms = now_ms
            continue
        if not d.qualified and not active:
            continue
        status: MembershipStatus = "realized" if d.qualified else "exited"
        previous = prev.status if prev is not None else None
        # (what the destinations last got is kept: until they acknowledge this change, it is the previous one)
        profile.memberships[d.audience_id] = Membership(
            audience_id=d.audience_id, status=status, since_ms=event_time_ms, version=audience.version,
            reason=d.reason, changed_ms=now_ms, deliveries=prev.deliveries if prev is not None else {})
        if idents is None:
            idents = grouped_identities(profile)
        out.append(_change(profile, d.audience_id, audience.version, status, previous, event_time_ms,
                           carried_paths(engine, audience.attributes), idents, d.reason, d.cause_event_id if d.qualified else None,
                           ek, event_time_ms, now_ms))
    return out


def exit_all(profile: ProfileState, engine: SegmentEngine, *, now_ms: int, kind: str,
             reason: str) -> list[MembershipChange]:
    """Exit every active membership (the profile was merged away, or its audiences were removed)."""
    ek = _kind(kind)
    idents = grouped_identities(profile)
    out: list[MembershipChange] = []
    for aid, m in sorted(profile.memberships.items()):
        if m.status == "exited":
            continue
        audience = engine.audiences.get(aid)
        # A removed audience keeps the version that decided the membership and carries only consent attributes.
        version = audience.version if audience is not None else m.version
        attrs = carried_paths(engine, audience.attributes if audience is not None else ())
        previous = m.status
        profile.memberships[aid] = Membership(audience_id=aid, status="exited", since_ms=now_ms, version=version,
                                              reason=reason, changed_ms=now_ms, deliveries=m.deliveries)
        out.append(_change(profile, aid, version, "exited", previous, now_ms, attrs, idents, reason, None, ek,
                           now_ms, now_ms))
    return out
