"""The identity-rules simulator: records stitched by the pipeline's own handlers over in-memory tables, under the
configured identity rules and under changed ones (priorities, unique namespaces, the graph limit), side by side.

The same code the worker runs (pipeline.identity.stitch for the identity stage, ProfileProcessor for the profile
stage), messages round-tripped through their wire form (pipeline.stages.messages) and table values through the profile codec; one
ordering of the many Kafka allows: the records arrive one after the other and each is stitched to quiescence
before the next (every message to a key in the order it was sent). No audiences are evaluated.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.errors import ConfigError
from pipeline.identity.namespaces import IdentityConfig, normalise_identities
from pipeline.identity.stitch import handle_identity, home_key, start_resolve
from pipeline.model import ExperienceEvent, IngestRecord, ProfileRecord, ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.stages import messages
from pipeline.stages.messages import Send, StageMessage, record_to_wire
from pipeline.state.codec import Forward, decode_profile_entry, encode_forward, encode_profile
from pipeline.topics import IDENTITY_TOPIC, PROFILE_TOPIC

MAX_RECORDS = 1000
MAX_MESSAGES = 200_000  # per simulation: stitching a thousand records takes a few thousand
START_MS = 1_700_000_000_000


class SimulationError(ConfigError):
    """The records or the rules given to the simulator are not valid; `records:N:` names a record's line."""

    def __init__(self, problem: str, *, line: int | None = None) -> None:
        super().__init__(problem, file="records" if line is not None else None, line=line)


@dataclass(frozen=True)
class Rules:
    """Changes to the identity rules; None or missing: as configured."""

    priorities: Mapping[str, int] = field(default_factory=dict)
    unique: frozenset[str] | None = None
    max_identities_per_graph: int | None = None


@dataclass(frozen=True)
class SimRecord:
    """One input line: its id, kind (event or profile), identities as given (namespace, value) and time."""

    id: str
    kind: str
    identities: tuple[tuple[str, str], ...]
    ts_ms: int
    line: int


@dataclass
class Outcome:
    """The profiles a rule set makes of the records, and what it left out."""

    profiles: list[ProfileState]
    merged: int  # profiles absorbed into another
    dropped: list[str]  # identities left out (namespace and reason, no value), per record
    messages: int  # stage messages handled

    def to_dict(self) -> dict[str, Any]:
        return {"profiles": [{"profile_id": p.profile_id,
                              "identities": {ns: sorted(ids) for ns, ids in sorted(p.identities.items())},
                              "events": len(p.events), "attributes": len(p.attributes)} for p in self.profiles],
                "merged": self.merged, "dropped": self.dropped, "messages": self.messages}


def rules_of(identity: IdentityConfig) -> dict[str, Any]:
    """The identity rules the simulator can change, as configured."""
    return {"namespaces": [{"name": ns.name, "priority": ns.priority, "unique": ns.unique, "kind": ns.kind}
                           for ns in sorted(identity.namespaces.values(), key=lambda n: (-n.priority, n.name))],
            "max_identities_per_graph": identity.max_identities_per_graph}


def with_rules(cfg: ProfileConfig, rules: Rules) -> ProfileConfig:
    """`cfg` with the identity rules changed; SimulationError for an unknown namespace or a bad value."""
    ident = cfg.identity
    unknown = sorted((set(rules.priorities) | set(rules.unique or ())) - set(ident.namespaces))
    if unknown:
        raise SimulationError(f"unknown namespace(s) {unknown}; valid: {', '.join(sorted(ident.namespaces))}")
    if any(not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= 1000 for p in rules.priorities.values()):
        raise SimulationError("a priority is a whole number from 0 to 1000")
    limit = rules.max_identities_per_graph
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000):
        raise SimulationError("the graph limit is a whole number from 1 to 10000")
    namespaces = [replace(ns, priority=rules.priorities.get(ns.name, ns.priority),
                          unique=ns.unique if rules.unique is None else ns.name in rules.unique)
                  for ns in ident.namespaces.values()]
    changed = IdentityConfig.build(namespaces, limit if limit is not None else ident.max_identities_per_graph,
                                   default_region=ident.default_region, hygiene=ident.hygiene, source=ident.source)
    return ProfileConfig(changed, cfg.datasets)


def parse_records(text: str) -> list[SimRecord]:
    """JSON lines, one record each: {"id": "r1", "kind": "event" | "profile", "identities": {"Email": "a@b.c",
    "ECID": ["c1", "c2"]}, "ts": ms (optional)}. SimulationError names the line of the first bad one."""
    out: list[SimRecord] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as exc:  # (RecursionError: nested deeper than the parser goes)
            raise SimulationError(f"not JSON: {exc.args[0] if exc.args else exc}", line=n) from None
        if not isinstance(item, dict):
            raise SimulationError("a record is a JSON object", line=n)
        rid, kind, idents = item.get("id", f"line-{n}"), item.get("kind", "event"), item.get("identities")
        ts = item.get("ts", START_MS + n * 1000)
        if not isinstance(rid, str) or kind not in ("event", "profile") or not isinstance(ts, int):
            raise SimulationError("'id' is a string, 'kind' event or profile, 'ts' a whole number of ms", line=n)
        if not isinstance(idents, dict) or not idents:
            raise SimulationError("'identities' is an object of namespace: value (or a list of values)", line=n)
        pairs: list[tuple[str, str]] = []
        for ns, values in idents.items():
            for value in values if isinstance(values, list) else [values]:
                if not isinstance(value, str):
                    raise SimulationError(f"the {ns} identities are strings", line=n)
                pairs.append((ns, value))
        out.append(SimRecord(rid, kind, tuple(pairs), ts, n))
        if len(out) > MAX_RECORDS:
            raise SimulationError(f"at most {MAX_RECORDS} records", line=n)
    return out


def _decoded(rec: SimRecord, cfg: ProfileConfig, dropped: list[str]) -> IngestRecord | None:
    ids, problems = normalise_identities(rec.identities, cfg.identity)
    dropped.extend(f"line {rec.line}: {p}" for p in problems)
    if not ids:
        return None
    if rec.kind == "event":
        return ExperienceEvent(rec.id, rec.ts_ms, "simulated", "web-events", tuple(ids), ids[0], {})
    return ProfileRecord(rec.id, rec.ts_ms, "crm", tuple(ids), ids[0], {})


def simulate(records: list[SimRecord], cfg: ProfileConfig) -> Outcome:
    """Stitch `records` under `cfg` with the pipeline's handlers; the profiles it ends with, oldest first."""
    clock = [START_MS]
    processor = ProfileProcessor(cfg, SegmentEngine([]), lambda: clock[0] / 1000)
    identities: dict[str, str] = {}
    profiles: dict[str, bytes] = {}
    queue: deque[tuple[str, str, StageMessage]] = deque()
    dropped: list[str] = []
    handled = 0

    def send(s: Send) -> None:
        if s.topic in (IDENTITY_TOPIC, PROFILE_TOPIC):  # activation output is not part of stitching
            queue.append((s.topic, s.key, messages.decode(messages.encode(s.value))))

    for rec in records:
        decoded = _decoded(rec, cfg, dropped)
        if decoded is None:
            continue
        clock[0] = max(clock[0], rec.ts_ms)
        home = home_key([i.key for i in decoded.identities], cfg.identity.unique_namespaces)
        send(start_resolve(record_to_wire(decoded), home, clock[0]))
        while queue:
            handled += 1
            if handled > MAX_MESSAGES:
                raise SimulationError(f"no quiescence after {MAX_MESSAGES} messages")
            topic, key, msg = queue.popleft()
            if topic == IDENTITY_TOPIC:
                res = handle_identity(key, identities.get(key), msg)  # type: ignore[arg-type]
                if res.write is not None:
                    identities[key] = res.write
                elif res.delete:
                    identities.pop(key, None)
                sends = res.sends
            else:
                raw = profiles.get(key)
                out = processor.handle(key, decode_profile_entry(raw) if raw else None, msg)  # type: ignore[arg-type]
                if out.delete:
                    profiles.pop(key, None)
                elif isinstance(out.write, Forward):
                    profiles[key] = encode_forward(out.write)
                elif out.write is not None:
                    profiles[key] = encode_profile(out.write)
                sends = out.sends
            for s in sends:
                send(s)
    entries = {k: decode_profile_entry(v) for k, v in sorted(profiles.items())}
    alive = [e for e in entries.values() if isinstance(e, ProfileState)]
    return Outcome(alive, sum(isinstance(e, Forward) for e in entries.values()), dropped, handled)
