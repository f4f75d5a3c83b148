"""The profile stage of stitching: pure handlers for messages keyed by profile id.

Invariants (with those of pipeline.identity.stitch):
  P1. A profile-table entry is a live ProfileState or a Forward(into) left by a merged-away profile;
      `into` is always a smaller (older) id, so following forwards terminates.
  P2. Any message addressed to a forwarded profile is passed on to its `into`, unchanged.
  P3. Merges always go larger -> smaller: the merged-away side ships its whole state ("absorb") and
      becomes a Forward at the same moment, so nothing addressed to it afterwards is lost (P2).
  P4. A profile never holds two different ids of a unique namespace (e.g. CRMID): a record that would
      add one is re-addressed, without merging, to the owner of its unique identity; a merge that would
      collapse two customers is refused before it starts (merge) or rolled back (absorb -> restore).
  P5. Every change re-evaluates only the audiences it can affect; a merge re-evaluates all of the
      survivor's and exits all of the merged-away profile's memberships.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.identity.stitch import IDENTITY_TOPIC, PROFILE_TOPIC, Send, start_resolve
from pipeline.ingest.wire import record_from_wire
from pipeline.model import ExperienceEvent, Identity, MembershipChange, ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import (
    ChangeSummary,
    absorb,
    apply_event,
    apply_record,
    enforce_identity_limit,
    live_attributes,
    unique_conflicts,
)
from pipeline.segments import Decision, SegmentEngine, apply_decisions, exit_all
from pipeline.segments.membership import grouped_identities
from pipeline.state.codec import Forward, decode_profile, encode_profile

log = logging.getLogger(__name__)

MEMBERSHIP_TOPIC = "activation.memberships"
MEMBERSHIP_STATE_TOPIC = "activation.membership-state"
PROFILE_CHANGES_TOPIC = "activation.profile-changes"

Entry = ProfileState | Forward | None


@dataclass
class OpResult:
    """What handling one profile message does: the new table entry (if it changed) and the sends."""

    write: ProfileState | Forward | None = None
    sends: list[Send] = field(default_factory=list)
    changes: list[MembershipChange] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


def unique_ids(p: ProfileState, cfg: ProfileConfig) -> dict[str, str]:
    return {ns: next(iter(ids)) for ns, ids in p.identities.items()
            if ns in cfg.identity.unique_namespaces and ids}


class ProfileProcessor:
    """Handles profile-stage messages; one per worker, shared by all its partitions (no per-key state)."""

    def __init__(self, config: ProfileConfig, engine: SegmentEngine, clock: Callable[[], float]) -> None:
        self.config = config
        self.engine = engine
        self.clock = clock

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def handle(self, pid: str, entry: Entry, msg: dict[str, Any]) -> OpResult:
        if isinstance(entry, Forward):  # P2
            res = OpResult()
            res.sends.append(Send(PROFILE_TOPIC, entry.into, {**msg, "pid": entry.into}))
            res.count("forwarded")
            if msg["op"] == "merge" and msg["into"] != entry.into:
                # the merged-away side already merged elsewhere: merge the two survivors instead
                a, b = sorted((entry.into, msg["into"]))
                res.sends[0] = Send(PROFILE_TOPIC, b, {**msg, "pid": b, "into": a})
            elif msg["op"] == "merge":
                res.sends.clear()
            elif msg["op"] == "restore":
                return self._restore(pid, msg)
            return res
        op = msg["op"]
        if op == "restore":
            return self._restore(pid, msg)
        handler = getattr(self, f"_{op}", None) if op in _OPS else None
        if handler is None:
            raise ValueError(f"unknown profile op {op!r}")
        return handler(pid, entry, msg)  # type: ignore[no-any-return]

    # -- record application -------------------------------------------------------------------------
    def _apply(self, pid: str, entry: ProfileState | None, msg: dict[str, Any]) -> OpResult:
        """1. create the profile if new; 2. refuse unique-namespace conflicts (P4) by re-addressing;
        3. add identities and apply the record; 4. enforce the size guardrail; 5. ask the other owners
        to merge in; 6. evaluate affected audiences and emit changes."""
        res = OpResult()
        rec = record_from_wire(msg["rec"])
        owners: dict[str, str] = msg["owners"]
        now = self.now_ms()
        profile = entry if entry is not None else ProfileState(pid, created_ms=now)
        no_merge = bool(msg.get("nm"))
        identities = list(rec.identities)
        if msg.get("fast") and (entry is None or any(i.id not in profile.identities.get(i.namespace, ())
                                                    for i in identities)):
            # the identity read that skipped the hops was stale: resolve the record the normal way
            res.sends.append(start_resolve(msg["rec"], now))
            res.count("fast_path_rerouted")
            return res
        if no_merge:  # only what this profile owns (or claimed for it)
            identities = [i for i in identities if owners.get(i.key) == msg["to"]]
            rec = _with_identities(rec, identities)
        else:
            conflicts = unique_conflicts(profile, identities, self.config)
            if conflicts:
                uniq = self.config.identity.unique_namespaces
                culprit = next(i for i in identities if i.namespace in uniq and i.namespace in conflicts)
                other = owners[culprit.key]
                log.warning("link refused: record would give profile %s a second %s; applied to %s instead",
                            pid, culprit.namespace, other)
                res.count("links_refused")
                res.sends.append(Send(PROFILE_TOPIC, other, {**msg, "pid": other, "to": other, "nm": True}))
                return res
        summary = (apply_event(profile, rec, self.config) if isinstance(rec, ExperienceEvent)
                   else apply_record(profile, rec, self.config))
        if summary.duplicate:
            res.count("duplicates")
        removed = enforce_identity_limit(profile, self.config)
        self._release(pid, removed, res)
        if not no_merge:
            # msg["to"] differs from pid only when the record was forwarded here: it is merged already
            for other in sorted(set(owners.values()) - {pid, msg["to"]}):
                claimed = [k for k, o in owners.items() if o == other]
                res.sends.append(Send(PROFILE_TOPIC, other, {"op": "merge", "pid": other, "into": pid,
                                                             "ids": claimed, "uniq": unique_ids(profile, self.config)}))
        cause = rec.event_id if isinstance(rec, ExperienceEvent) else rec.record_id
        self._evaluate(profile, summary, res, now=now, event_time=rec.timestamp_ms, cause=cause,
                       kind="streaming", created=entry is None)
        res.write = profile
        return res

    # -- merges -------------------------------------------------------------------------------------
    def _merge(self, pid: str, entry: ProfileState | None, msg: dict[str, Any]) -> OpResult:
        """At the merged-away profile: 1. refuse if it would collapse two customers (P4); 2. exit its
        memberships; 3. ship the state to the survivor; 4. become a Forward; 5. repoint its identities."""
        res = OpResult()
        into = msg["into"]
        now = self.now_ms()
        if into >= pid:  # P3 guard; cannot happen by construction, never loop
            raise ValueError(f"merge must go to a smaller id: {pid} -> {into}")
        if entry is None:  # a candidate id that never became a profile: just leave the forward
            res.write = Forward(into)
            for key in msg.get("ids", []):
                res.sends.append(Send(IDENTITY_TOPIC, key, {"op": "repoint", "from": pid, "to": into}))
            return res
        uniq_into: dict[str, str] = msg.get("uniq", {})
        mine = unique_ids(entry, self.config)
        if any(ns in mine and mine[ns] != v for ns, v in uniq_into.items()):
            log.warning("merge refused: profiles %s and %s hold different unique identities", pid, into)
            res.count("merges_refused")
            return res
        res.changes.extend(exit_all(entry, self.engine, now_ms=now, kind="merge",
                                    reason=f"merged into {into}"))
        res.sends.append(Send(PROFILE_TOPIC, into, {"op": "absorb", "pid": into, "from": pid,
                                                    "state": encode_profile(entry)}))
        res.write = Forward(into)
        for ident in entry.identity_list():
            res.sends.append(Send(IDENTITY_TOPIC, ident.key, {"op": "repoint", "from": pid, "to": into}))
        res.count("merges")
        return res

    def _absorb(self, pid: str, entry: ProfileState | None, msg: dict[str, Any]) -> OpResult:
        """At the survivor: 1. re-check uniqueness (it may have changed since); roll back if needed;
        2. absorb the state; 3. enforce the guardrail; 4. re-evaluate every audience."""
        res = OpResult()
        other = decode_profile(msg["state"])
        now = self.now_ms()
        profile = entry if entry is not None else ProfileState(pid, created_ms=other.created_ms)
        if unique_conflicts(profile, other.identities, self.config):
            log.warning("merge rolled back: %s gained a conflicting unique identity meanwhile", pid)
            res.count("merges_refused")
            res.sends.append(Send(PROFILE_TOPIC, msg["from"], {"op": "restore", "pid": msg["from"],
                                                               "state": msg["state"]}))
            return res
        other.memberships.clear()
        summary = absorb(profile, other, self.config)
        removed = enforce_identity_limit(profile, self.config)
        self._release(pid, removed, res)
        self._evaluate(profile, summary, res, now=now, event_time=now, cause=None, kind="merge", all_=True,
                       created=entry is None)
        res.write = profile
        return res

    def _restore(self, pid: str, msg: dict[str, Any]) -> OpResult:
        res = OpResult()
        profile = decode_profile(msg["state"])
        now = self.now_ms()
        self._evaluate(profile, ChangeSummary(changed=True), res, now=now, event_time=now, cause=None,
                       kind="merge", all_=True)
        res.write = profile
        return res

    # -- time and batch -----------------------------------------------------------------------------
    def _tick(self, pid: str, entry: ProfileState | None, msg: dict[str, Any]) -> OpResult:
        """A deadline came due: re-evaluate without new data (windows closing, abandonment hours)."""
        res = OpResult()
        if entry is None:
            return res
        now = self.now_ms()
        if entry.next_deadline_ms is not None and entry.next_deadline_ms > now:
            return res  # a stale timer entry: a newer evaluation moved the deadline
        self._evaluate(entry, ChangeSummary(), res, now=now, event_time=now, cause=None, kind="deadline",
                       all_=True)
        res.write = entry
        return res

    def _evaluate_op(self, pid: str, entry: ProfileState | None, msg: dict[str, Any]) -> OpResult:
        res = OpResult()
        if entry is None:
            return res
        now = self.now_ms()
        # no audience list (or an empty one) means every audience, not "those the (empty) change affects"
        audiences = msg.get("audiences") or None
        self._evaluate(entry, ChangeSummary(), res, now=now, event_time=now, cause=None,
                       kind=msg.get("kind", "batch"), audience_ids=audiences, all_=audiences is None)
        res.write = entry
        return res

    # -- definition changes -------------------------------------------------------------------------
    def fingerprints(self) -> dict[str, str]:
        """A fingerprint per audience: what a membership depends on (query, version, carried attributes)."""
        return {a.id: hashlib.sha256(f"{a.query}|{a.version}|{','.join(a.attributes)}".encode()).hexdigest()[:16]
                for a in self.engine.audiences.values()}

    def definitions_diff(self, old: dict[str, str] | None) -> tuple[list[str], list[str]]:
        """(new or edited audience ids in evaluation order, removed audience ids) since `old`."""
        new = self.fingerprints()
        old = old or {}
        changed = {a for a, fp in new.items() if old.get(a) != fp}
        ordered = [a for a in self.engine.affected(all_=True) if a in changed]
        return ordered, sorted(set(old) - set(new))

    def exit_removed(self, profile: ProfileState, removed: list[str]) -> OpResult:
        """A removed audience exits its members (kind 'definition')."""
        res = OpResult()
        gone = {a: m for a, m in profile.memberships.items() if a in removed and m.status != "exited"}
        if gone:
            kept = {a: m for a, m in profile.memberships.items() if a not in gone}
            profile.memberships = gone
            res.changes.extend(exit_all(profile, self.engine, now_ms=self.now_ms(), kind="definition",
                                        reason="audience removed"))
            profile.memberships.update(kept)
            res.write = profile
        return res

    # -- shared steps -------------------------------------------------------------------------------
    def _release(self, pid: str, removed: list[Identity], res: OpResult) -> None:
        if removed:
            by_ns: dict[str, int] = {}
            for ident in removed:
                by_ns[ident.namespace] = by_ns.get(ident.namespace, 0) + 1
            log.info("identity guardrail: profile %s dropped %d identities (%s)", pid, len(removed),
                     ", ".join(f"{ns}={n}" for ns, n in sorted(by_ns.items())))
            res.count("identities_dropped", len(removed))
        for ident in removed:
            res.sends.append(Send(IDENTITY_TOPIC, ident.key, {"op": "release", "pid": pid}))

    def _evaluate(self, profile: ProfileState, summary: ChangeSummary, res: OpResult, *, now: int,
                  event_time: int, cause: str | None, kind: str, all_: bool = False, created: bool = False,
                  audience_ids: list[str] | None = None) -> None:
        """Evaluate the audiences the change can affect, record memberships and the next deadline,
        and emit membership changes and (for streaming destinations) the profile change."""
        if audience_ids is None:
            audience_ids = self.engine.affected(
                event_types=summary.event_types_added | summary.event_types_dropped,
                attributes=summary.attributes_changed, all_=all_ or created)
        if audience_ids:
            decisions, deadline = self.engine.decide(profile, now, audience_ids)
            if cause is not None:
                decisions = [d if d.cause_event_id or not d.qualified else _with_cause(d, cause)
                             for d in decisions]
            if decisions:
                res.changes.extend(apply_decisions(profile, decisions, self.engine, now_ms=now,
                                                   event_time_ms=event_time, kind=kind))
            current = profile.next_deadline_ms
            if current is not None and current <= now:
                current = None
            if deadline is not None and (current is None or deadline < current):
                current = deadline
            profile.next_deadline_ms = current
        if summary.attributes_changed or summary.identities_added or summary.identities_removed:
            changed_ns = sorted({i.namespace for i in (*summary.identities_added, *summary.identities_removed)})
            key_src = f"{profile.profile_id}|{profile.seq}|{','.join(sorted(summary.attributes_changed))}"
            res.sends.append(Send(PROFILE_CHANGES_TOPIC, profile.profile_id, {
                "profile_id": profile.profile_id,
                "identities": grouped_identities(profile),
                "attributes": live_attributes(profile),
                "changed_attributes": sorted(summary.attributes_changed),
                "changed_identities": changed_ns,
                "memberships": sorted(profile.active_segments()),
                "event_time_ms": event_time,
                "idempotency_key": hashlib.sha256(key_src.encode()).hexdigest()[:32],
            }))


_OPS = {"apply", "merge", "absorb", "tick", "evaluate_op"}


def _with_identities(rec: Any, identities: list[Identity]) -> Any:
    return replace(rec, identities=tuple(identities))


def _with_cause(d: Decision, cause: str) -> Decision:
    return d._replace(cause_event_id=cause)
