"""Pure request handling for the API: validation (4xx with a JSON body) and profile rendering."""

from __future__ import annotations

from typing import Any

from pipeline.identity.namespaces import normalise_identities
from pipeline.model import ProfileState
from pipeline.profiles.config import ProfileConfig


class ApiError(Exception):
    """A client error: status and a JSON-able body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        self.status = status
        self.body = {"error": error, "detail": detail}
        super().__init__(detail)


def identity_key(params: dict[str, Any], cfg: ProfileConfig) -> str:
    """namespace + id query parameters -> the normalised identity table key."""
    ns, value = params.get("namespace"), params.get("id")
    if not ns or not value:
        raise ApiError(400, "missing-parameter", "both 'namespace' and 'id' are required")
    if ns not in cfg.identity.namespaces:
        raise ApiError(400, "unknown-namespace",
                       f"unknown namespace {str(ns)[:64]!r}; valid: {', '.join(sorted(cfg.identity.namespaces))}")
    ids, problems = normalise_identities([(str(ns), str(value))], cfg.identity)
    match = [i for i in ids if i.namespace == ns]
    if not match:
        raise ApiError(400, "invalid-identity", "; ".join(problems) or "invalid identity value")
    return match[0].key


def render_profile(p: ProfileState, recent: int = 20) -> dict[str, Any]:
    return {
        "profile_id": p.profile_id,
        "created_ms": p.created_ms,
        "identities": {ns: sorted(ids) for ns, ids in sorted(p.identities.items())},
        "attributes": {k: {"value": v.value, "dataset": v.dataset, "ts_ms": v.ts_ms}
                       for k, v in sorted(p.attributes.items()) if v.value is not None},
        "memberships": {a: {"status": m.status, "since_ms": m.since_ms, "version": m.version, "reason": m.reason}
                        for a, m in sorted(p.memberships.items())},
        "event_count": len(p.events),
        "recent_events": [{"event_id": e.event_id, "event_type": e.event_type, "ts_ms": e.ts_ms,
                           "dataset": e.dataset, "fields": e.fields} for e in p.events[-recent:][::-1]],
        "next_deadline_ms": p.next_deadline_ms,
    }
