"""Shared builders for the segment tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pipeline.model import AttributeValue, Membership, ProfileState, Scalar, StoredEvent
from pipeline.segments import AudienceDef, SegmentEngine, parse_query

DAY = 86_400_000
HOUR = 3_600_000
MINUTE = 60_000


def make_profile(attrs: Mapping[str, Scalar] | None = None,
                 events: Iterable[tuple[str, int, Mapping[str, Scalar]]] = (),
                 memberships: Mapping[str, str] | None = None, profile_id: str = "p1") -> ProfileState:
    """A profile with attributes, events (type, ts, fields; sorted here by ts) and membership statuses."""
    evs = [StoredEvent(f"e{i}", t, ts, "web", dict(f)) for i, (t, ts, f) in enumerate(events)]
    evs.sort(key=lambda e: e.ts_ms)
    p = ProfileState(profile_id=profile_id, created_ms=0,
                     identities={"email": {"a@example.com": 1}, "crm": {"42": 2}},
                     attributes={k: AttributeValue(v, "crm", 0) for k, v in (attrs or {}).items()},
                     events=evs)
    for aid, status in (memberships or {}).items():
        p.memberships[aid] = Membership(aid, status, 0, 1, "seed", 0)  # type: ignore[arg-type]
    return p


def audience(aid: str, query: str, *, version: int = 1, attributes: tuple[str, ...] = ()) -> AudienceDef:
    return AudienceDef(aid, aid, "", query, version, attributes, parse_query(query))


def engine(**queries: str) -> SegmentEngine:
    """An engine from keyword id=query pairs (underscores in ids become dashes)."""
    return SegmentEngine([audience(k.replace("_", "-"), q) for k, q in queries.items()])


def decide(query: str, profile: ProfileState, now: int, **others: str) -> tuple[bool, int | None, str | None]:
    """(qualified, next_check_ms, cause_event_id) of one query (id 'q'), with other audiences before it."""
    eng = SegmentEngine([audience(k.replace("_", "-"), v) for k, v in others.items()] + [audience("q", query)])
    d = {x.audience_id: x for x in eng.evaluate(profile, now)}["q"]
    return d.qualified, d.next_check_ms, d.cause_event_id
