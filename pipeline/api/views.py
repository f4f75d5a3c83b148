"""Pure request handling for the API: validation (4xx with an RFC 9457 problem body) and profile rendering."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from pipeline.identity.namespaces import normalise_identities
from pipeline.model import ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.segments.config import AudienceDef
from pipeline.segments.explain import membership_evidence

PROBLEM_CONTENT_TYPE = "application/problem+json"
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
MAX_NAMESPACE_CHARS, MAX_ID_CHARS = 256, 2048
# Profile ids are lower-case hex (pipeline.identity.stitch.new_profile_id); the profiles table also holds
# per-partition metadata under keys starting with "__", which must never be decoded as a profile.
PROFILE_ID = re.compile(r"[0-9a-f]{16,64}")


def problem_type(error: str) -> str:
    return f"urn:cdp-pipeline:problem:{error}"


def problem(status: int, error: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem body; `error` (a short slug) names its type."""
    return {"type": problem_type(error), "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, **extra}


class ApiError(Exception):
    """A client error: status, a problem body and any headers to send with it."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.error = error
        self.body = problem(status, error, detail)
        self.headers = headers or {}
        super().__init__(detail)


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body -> its JSON value; 400 for invalid JSON, or nesting deeper than `max_depth` (checked
    before parsing: the parser itself would recurse, and fail with RecursionError, on deep nesting)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid-json", "the body must be UTF-8 JSON") from None
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise ApiError(400, "too-deep", f"the JSON body is nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid-json", "the body must be a JSON object") from None


def identity_key(params: dict[str, Any], cfg: ProfileConfig) -> str:
    """namespace + id (query parameters or a JSON object's members) -> the normalised identity table key."""
    ns, value = params.get("namespace"), params.get("id")
    if ns is None or value is None or ns == "" or value == "":
        raise ApiError(400, "missing-parameter", "both 'namespace' and 'id' are required")
    if not isinstance(ns, str) or not isinstance(value, str):
        raise ApiError(400, "invalid-parameter", "'namespace' and 'id' must be strings")
    if len(ns) > MAX_NAMESPACE_CHARS or len(value) > MAX_ID_CHARS:
        raise ApiError(400, "invalid-parameter",
                       f"'namespace' is at most {MAX_NAMESPACE_CHARS} and 'id' {MAX_ID_CHARS} characters")
    if ns not in cfg.identity.namespaces:
        raise ApiError(400, "unknown-namespace",
                       f"unknown namespace {str(ns)[:64]!r}; valid: {', '.join(sorted(cfg.identity.namespaces))}")
    ids, problems = normalise_identities([(str(ns), str(value))], cfg.identity)
    match = [i for i in ids if i.namespace == ns]
    if not match:
        raise ApiError(400, "invalid-identity", "; ".join(problems) or "invalid identity value")
    return match[0].key


def merge_policy_info(policy: Any) -> dict[str, Any]:
    """The merge policy that picked each attribute's value: its name, and its dataset order if it has one."""
    order = getattr(policy, "order", None)
    return {"type": policy.name, **({"order": list(order)} if order is not None else {})}


def render_profile(p: ProfileState, recent: int = 20, merge_policy: dict[str, Any] | None = None,
                   audiences: Mapping[str, AudienceDef] | None = None, now_ms: int = 0) -> dict[str, Any]:
    """The profile as the API answers it; `merge_policy` (merge_policy_info) says how attributes were chosen;
    each membership of an audience in `audiences` gets its evidence at `now_ms` (computed here, on request: the
    per-event path keeps only the short `reason`)."""
    defs = audiences or {}

    def evidence(aid: str) -> list[str]:
        a = defs.get(aid)
        return membership_evidence(a, p, now_ms) if a is not None else []

    sources = p.identity_sources
    return {
        "profile_id": p.profile_id,
        "created_ms": p.created_ms,
        "identities": {ns: sorted(ids) for ns, ids in sorted(p.identities.items())},
        # when each identity was first seen on this profile, and the dataset of the record that put it here (null:
        # not known, e.g. stored before datasets were kept)
        "identity_links": {ns: {i: {"linked_ms": ts, "dataset": sources.get(f"{ns}:{i}")} for i, ts in sorted(ids.items())}
                           for ns, ids in sorted(p.identities.items())},
        "merged_profiles": list(p.merged),
        "attributes": {k: {"value": v.value, "dataset": v.dataset, "ts_ms": v.ts_ms}
                       for k, v in sorted(p.attributes.items()) if v.value is not None},
        "memberships": {a: {"status": m.status, "since_ms": m.since_ms, "version": m.version, "reason": m.reason,
                            "evidence": evidence(a),
                            # what each destination acknowledged last (receipts of the destination runner)
                            "destinations": [{"name": name, "status": d.status, "delivered_ms": d.delivered_ms}
                                             for name, d in sorted(m.deliveries.items())]}
                        for a, m in sorted(p.memberships.items())},
        "event_count": len(p.events),
        "recent_events": [{"event_id": e.event_id, "event_type": e.event_type, "ts_ms": e.ts_ms,
                           "dataset": e.dataset, "fields": e.fields} for e in p.events[-recent:][::-1]],
        "next_deadline_ms": p.next_deadline_ms,
        **({"merge_policy": merge_policy} if merge_policy is not None else {}),
    }


def render_membership(p: ProfileState, audience_id: str) -> dict[str, Any]:
    """Whether the profile is a member of the audience now, since when and why (the last change's reason);
    status, since_ms, reason and version are null for a profile the audience never held."""
    m = p.memberships.get(audience_id)
    return {"audience_id": audience_id, "profile_id": p.profile_id,
            "member": m is not None and m.status != "exited",
            "status": m.status if m else None, "since_ms": m.since_ms if m else None,
            "reason": m.reason if m else None, "version": m.version if m else None}
