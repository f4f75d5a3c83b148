"""The profile stage of stitching: pure handlers for messages keyed by profile id.

Invariants (with I1-I3 of pipeline.identity.stitch):
  P1. A profile-table entry is a live ProfileState or a Forward(into) left by a merged-away profile;
      `into` is always a smaller (older) id, so following forwards terminates.
  P2. Any message addressed to a forwarded profile is passed on to its `into` (answers to a finished merge
      attempt and stale ticks excepted).
  P3. A profile lists exactly the identities the identity table gives it. A record is applied at the owner
      of its home identity (`home_key`); its other identities are *claimed* (kept as pending until the
      identity table answers): `claimed` lists one, `taken` by another profile asks that profile to link.
  P4. A profile never holds two different ids of a unique namespace (e.g. CRMID), counting pending claims:
      a record identity that would add one is not linked (it is adopted by a profile of its own), and a
      link between two profiles whose unique ids differ is refused.
  P5. Merges go larger -> smaller and are decided by the survivor before any identity moves:
        1. the larger profile ships its state (`absorb`) and freezes: messages that reach it meanwhile are
           held in its entry, in order;
        2. the smaller one (or, through forwards, the survivor it merged into) checks P4 against its current
           state and answers `accepted` (having absorbed it) or `refused` (unchanged);
        3. on `accepted` the larger becomes a Forward, exits its memberships, repoints its identities and
           passes its held messages on; on `refused` it thaws and handles its held messages itself.
      Chains of waiting profiles only ever wait on smaller ids, so they cannot deadlock.
  P6. Every change re-evaluates only the audiences it can affect; a merge re-evaluates all of the
      survivor's and exits all of the merged-away profile's memberships.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.errors import ProfileOverBudget
from pipeline.identity.stitch import claim_msg, release_msg, repoint_msg, start_resolve
from pipeline.model import (
    MAX_DELIVERIES,
    Delivery,
    ExperienceEvent,
    Identity,
    MembershipChange,
    ProfileState,
    Scalar,
)
from pipeline.privacy.erasure import REASON as ERASURE_REASON
from pipeline.privacy.erasure import done_record, hashed
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import (
    ChangeSummary,
    absorb,
    add_identity,
    apply_event,
    apply_record,
    enforce_identity_limit,
    live_attributes,
)
from pipeline.segments import Decision, SegmentEngine, apply_decisions, exit_all
from pipeline.segments.membership import grouped_identities
from pipeline.stages.messages import (
    Absorb,
    Accepted,
    Apply,
    Claimed,
    Erase,
    EraseForward,
    Evaluate,
    Link,
    ProfileMessage,
    Receipt,
    Refused,
    Resume,
    Send,
    Taken,
    Tick,
    readdressed,
    record_from_wire,
)
from pipeline.state.codec import Forward, decode_profile, encode_profile, size_without_events
from pipeline.topics import MEMBERSHIP_STATE_TOPIC, PROFILE_CHANGES_TOPIC, PROFILE_TOPIC, STAGE_TOPICS

log = logging.getLogger(__name__)

Entry = ProfileState | Forward | None
MERGED_KEEP = 64  # tokens of absorbed merge attempts a profile remembers, to recognise a redelivered absorb
# handled even while merging: the answers end the wait; a receipt only notes a delivery (it is not passed on)
_NOT_HELD = Accepted | Refused | Resume | Receipt
# a finished attempt's answer, a deadline re-checked there, a receipt of the merged-away profile's own memberships
_DROPPED_AT_FORWARD = Accepted | Refused | Resume | Tick | Receipt


@dataclass
class OpResult:
    """What handling one profile message does: the new table entry (if it changed) and the sends."""

    write: ProfileState | Forward | None = None
    delete: bool = False  # remove the entry (an erasure): the write, if any, is ignored
    sends: list[Send] = field(default_factory=list)
    changes: list[MembershipChange] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def extend(self, other: OpResult) -> None:
        self.sends.extend(other.sends)
        self.changes.extend(other.changes)
        for name, n in other.counters.items():
            self.count(name, n)


UniqueIds = dict[str, list[str]]


def unique_ids(p: ProfileState, cfg: ProfileConfig) -> UniqueIds:
    """The profile's ids in unique namespaces, listed or pending (P4 counts both)."""
    uniq = cfg.identity.unique_namespaces
    out: dict[str, set[str]] = {}
    for ns, ids in p.identities.items():
        if ns in uniq and ids:
            out.setdefault(ns, set()).update(ids)
    for key in p.claims:
        ident = Identity.from_key(key)
        if ident.namespace in uniq:
            out.setdefault(ident.namespace, set()).add(ident.id)
    return {ns: sorted(ids) for ns, ids in out.items()}


def unique_conflict(a: UniqueIds, b: UniqueIds) -> list[str]:
    """Unique namespaces in which the two sides hold different ids (a merge would join two customers)."""
    return sorted(ns for ns, ids in a.items() if ns in b and set(ids) != set(b[ns]))


class ProfileProcessor:
    """Handles profile-stage messages; one per worker, shared by all its partitions (no per-key state)."""

    def __init__(self, config: ProfileConfig, engine: SegmentEngine, clock: Callable[[], float]) -> None:
        self.config = config
        self.engine = engine
        self.clock = clock
        # dispatch on the message's class: one dict lookup (a `match` of class patterns costs an isinstance per
        # case, ~0.2 µs each on msgspec Structs: ~2 µs to reach the last of these on the per-event path)
        self._handlers: dict[type[ProfileMessage], Callable[[str, ProfileState | None, Any], OpResult]] = {
            Apply: self._apply, Claimed: self._claimed, Taken: self._taken, Link: self._link, Absorb: self._absorb,
            Accepted: self._accepted, Refused: self._refused, Resume: self._resume, Erase: self._erase,
            EraseForward: self._erase_forward, Tick: self._tick, Evaluate: self._evaluate_op, Receipt: self._receipt,
        }
        self.erasure_salt = b""  # the key of the hashes in erasure status records (set by the app)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def handle(self, pid: str, entry: Entry, msg: ProfileMessage) -> OpResult:
        """1. a forward passes the message on (P2); 2. a merging profile holds it (P5); 3. dispatch on its type."""
        if isinstance(entry, Forward):
            return self._at_forward(pid, entry, msg)
        if entry is not None and entry.merging is not None and not isinstance(msg, _NOT_HELD):
            res = OpResult()
            if isinstance(msg, Link) and msg.sender == entry.merging[0]:  # redelivered: the absorb may have been lost
                res.sends.append(self._absorb_msg(pid, entry))
            elif msg in entry.held:
                # a copy (redelivered after a crash): handlers are idempotent, so one is enough, and each copy
                # kept would be passed on, and sent again with every redelivered `accepted`, after each crash
                res.count("held_duplicates")
            else:
                entry.held.append(msg)
                res.write = entry
                res.count("held")
            return res
        handler = self._handlers.get(type(msg))
        if handler is None:  # Batch, DefsCheck: the agent's (walks over a partition)
            raise ValueError(f"not a message the profile stage handles per profile: {type(msg).__name__}")
        return handler(pid, entry, msg)

    def _at_forward(self, pid: str, entry: Forward, msg: ProfileMessage) -> OpResult:
        """A merged-away profile: pass the message on to the survivor (P2), except what is only its own."""
        res = OpResult()
        if isinstance(msg, EraseForward):  # the survivor was erased: its forward keeps the identities it repointed
            res.delete = True
            res.count("forwards_erased")
        elif isinstance(msg, Accepted) and entry.token is not None and msg.token == entry.token:
            self._resend_accepted(pid, entry, res)  # redelivered: its sends may have been lost
        elif isinstance(msg, _DROPPED_AT_FORWARD):
            res.count("stale")
        else:
            if isinstance(msg, Link) and msg.via and msg.via not in entry.repointed:
                # the table gives `via` to this merged-away id, which did not list it when it merged (a crash
                # lost the write that would have): hand it to the survivor, which lists it once it is moved
                res.sends.append(repoint_msg(msg.via, pid, entry.into, adopt=True))
            res.sends.append(Send(PROFILE_TOPIC, entry.into, readdressed(msg, entry.into)))
            res.count("forwarded")
        return res

    # -- records ------------------------------------------------------------------------------------
    def _apply(self, pid: str, entry: ProfileState | None, msg: Apply) -> OpResult:
        """1. a new profile is born holding the home identity (I2); an existing one that does not hold it
        was reached by a stale read: resolve again; 2. claim the record's other identities, except one
        that would give the profile a second id of a unique namespace (P4; adopted on its own instead);
        3. apply the record with the identities held; 4. guardrail; 5. evaluate affected audiences."""
        res = OpResult()
        now = self.now_ms()
        home = Identity.from_key(msg.home)
        profile = entry if entry is not None else ProfileState(pid, created_ms=now)
        if entry is not None and not profile.holds(home):
            if not msg.hop:  # ingest's local read may be stale: resolve again
                res.sends.append(start_resolve(msg.rec, msg.home, now))
                res.count("rerouted")
                return res
            # the home hop has just read this profile as the owner, yet it does not hold the home: its write
            # of the home was lost in a crash (or the guardrail dropped it meanwhile). Claim it again rather
            # than resolving in a loop.
            self._claim(profile, home, msg.rec.timestamp_ms if msg.rec else now, res,
                        msg.rec.dataset if msg.rec else None)
            res.count("home_reclaimed")
        if msg.rec is None:  # an adopted lone identity
            if entry is None:
                add_identity(profile, home, now)
                self._evaluate(profile, ChangeSummary(changed=True, identities_added=(home,)), res, now=now,
                               event_time=now, cause=None, kind="streaming", created=True)
                res.write = profile
            return res
        rec = record_from_wire(msg.rec)
        unique_ns = self.config.identity.unique_namespaces
        listed: list[Identity] = []
        for ident in rec.identities:
            if ident == home and entry is None or ident.id in profile.identities.get(ident.namespace, ()):
                listed.append(ident)
            elif ident.key in profile.claims:
                # pending: ask again (claims are idempotent), in case the first claim was lost in a crash
                res.sends.append(claim_msg(ident.key, pid, rec.timestamp_ms))
            elif ident.namespace in unique_ns and any(
                    i != ident.id for i in (*unique_ids(profile, self.config).get(ident.namespace, ()),
                                            *(x.id for x in listed if x.namespace == ident.namespace))):
                log.warning("link refused: a record at profile %s carries a second %s; that id is not linked",
                            pid, ident.namespace)
                res.count("links_refused")
                res.sends.append(start_resolve(None, ident.key, now))
            else:
                self._claim(profile, ident, rec.timestamp_ms, res, rec.dataset)
        if len(listed) != len(rec.identities):  # (`listed` keeps the record's order: same length, same tuple)
            rec = replace(rec, identities=tuple(listed))
        consent_before = self._consent_values(profile)
        if isinstance(rec, ExperienceEvent):
            summary = apply_event(profile, rec, self.config)
        else:
            before = size_without_events(profile)
            summary = apply_record(profile, rec, self.config)
            budget = self.config.datasets.limits.max_profile_bytes
            # only a record that grows it past its budget is refused (one already over may still shrink);
            # raised before any output: the agent restores the profile and dead-letters the record
            if summary.changed and (size := size_without_events(profile)) > max(budget, before):
                raise ProfileOverBudget(pid, size, budget)
        if summary.duplicate or (not isinstance(rec, ExperienceEvent) and not summary.changed):
            # handled before (a replay after a crash, most likely): the identity table may have lost what the
            # first handling's answers gave this profile while its listing survived; ask again (idempotent)
            res.count("duplicates" if summary.duplicate else "unchanged")
            for ident in listed:
                if ident != home or not msg.hop:
                    res.sends.append(claim_msg(ident.key, pid, rec.timestamp_ms))
        self._release(profile, enforce_identity_limit(profile, self.config), res)
        cause = rec.event_id if isinstance(rec, ExperienceEvent) else rec.record_id
        self._evaluate(profile, summary, res, now=now, event_time=rec.timestamp_ms, cause=cause,
                       kind="streaming", created=entry is None, consent_before=consent_before)
        res.write = profile
        return res

    def _claim(self, profile: ProfileState, ident: Identity, ts: int, res: OpResult, dataset: str | None) -> None:
        pid = profile.profile_id
        key = ident.key
        pending = profile.claims.setdefault(key, {})
        pending[pid] = min(ts, pending.get(pid, ts))
        if dataset is not None:  # the dataset that asks first is the one that links it, once granted
            profile.identity_sources.setdefault(key, dataset)
        res.sends.append(claim_msg(key, pid, ts))

    # -- answers of the identity table --------------------------------------------------------------
    def _claimed(self, pid: str, entry: ProfileState | None, msg: Claimed | Taken) -> OpResult:
        """The identity table gave `key` to `claimant` (this profile, or one it absorbed):
        1. repoint it here if the claimant was absorbed; 2. list it (every claim of it is settled) or, if
        this profile no longer awaits it for that claimant (a duplicate answer: it may have been released since)
        and does not keep it, release it; 3. guardrail; 4. tell streaming destinations."""
        res = OpResult()
        now = self.now_ms()
        created = entry is None
        if entry is None:
            # a profile claims only once it exists: a crash lost its creation while its claim survived. It is born
            # holding the identity, as a link reaching it unborn makes it (a release would race its home hop, which
            # may be giving it this very identity); the record that created it, handled again, finds it here.
            entry = ProfileState(pid, created_ms=now)
        key, claimant = msg.key, msg.claimant
        ident = Identity.from_key(key)
        listed = ident.id in entry.identities.get(ident.namespace, ())
        # awaited: this claimant's claim is pending here (an answer to a claim settled already is a duplicate; the
        # identity may have been released since)
        awaited = claimant in entry.claims.get(key, ())
        if not listed and not awaited and not self._keeps_unawaited(entry, ident):
            if key in entry.claims:  # another claim of it is pending here: free it only from this claimant
                res.sends.append(release_msg(key, claimant))
            else:  # from this profile too: a repoint from the claimant may have moved it here already
                res.sends.append(release_msg(key, pid, sorted({claimant, *entry.absorbed_ids()} - {pid})))
            return res
        if claimant != pid:
            res.sends.append(repoint_msg(key, claimant, pid))
        if listed:
            return res
        pending = entry.claims.pop(key, None)
        summary = add_identity(entry, ident, min(pending.values()) if pending else now)
        self._release(entry, enforce_identity_limit(entry, self.config), res)
        self._evaluate(entry, summary, res, now=now, event_time=now, cause=None, kind="streaming", created=created)
        res.write = entry
        return res

    def _keeps_unawaited(self, profile: ProfileState, ident: Identity) -> bool:
        """Whether a profile keeps an identity the table gave it that it no longer waits for. The guardrail may
        have dropped it while its claim was in flight (the profile is then at its limit): released. But the
        claim was this profile's (or an absorbed one's), for one of its records, and a crash can lose the
        pending claim from its state while the claim itself is in the identity topic, or a claim asked again
        after a `taken` can find the identity freed meanwhile: the profiles that were refused it have already
        sent their links here, so a release would leave it with no owner. Kept, unless it would be a second id
        of a unique namespace (P4)."""
        if sum(len(ids) for ids in profile.identities.values()) >= self.config.identity.max_identities_per_graph:
            return False
        if ident.namespace not in self.config.identity.unique_namespaces:
            return True
        return all(i == ident.id for i in unique_ids(profile, self.config).get(ident.namespace, ()))

    def _taken(self, pid: str, entry: ProfileState | None, msg: Taken) -> OpResult:
        """Another profile owns `key`: settle this claimant's claim and ask the owner to link (P5 decides), or, if
        this profile absorbed the owner, move it here. Claims of the same identity by profiles absorbed meanwhile
        wait for their own answers. An answer naming this profile as the owner is a grant, unless the profile has
        released the identity since: then it asks again."""
        key, owner = msg.key, msg.owner
        ident = Identity.from_key(key)
        if owner == pid and entry is not None and key in entry.claims and ident.id not in entry.identities.get(
                ident.namespace, ()):
            # the table pointed here when it answered, but this profile has released the identity since (its
            # guardrail): the answer is stale, ask again as this profile (granted, or `taken` by its new owner)
            res = OpResult()
            waiting = entry.claims[key]
            ts = min(waiting.values(), default=self.now_ms())
            waiting.pop(msg.claimant, None)
            waiting[pid] = min(ts, waiting.get(pid, ts))
            entry.seq += 1
            res.write = entry
            res.sends.append(claim_msg(key, pid, ts))
            res.count("reclaimed")
            return res
        if owner == pid:  # the table points here already
            return self._claimed(pid, entry, msg)
        res = OpResult()
        if entry is None:
            res.count("stale")
            return res
        pending = entry.claims.get(key)
        adopt = owner in entry.absorbed_ids()
        if pending is not None and msg.claimant in pending:
            del pending[msg.claimant]
            if not pending:
                del entry.claims[key]
                if not adopt and ident.id not in entry.identities.get(ident.namespace, ()):
                    # another profile's: a merge brings it back with its own dataset
                    entry.identity_sources.pop(key, None)
            entry.seq += 1
            res.write = entry
        if adopt:
            # owned by a profile merged into this one: its repoint here has not reached the identity yet, or it
            # has and a replayed record's resolve gave the freed identity its old candidate id again. A link would
            # only come back here through its forward: move it here (`claimed` answers; listed or released then)
            res.sends.append(repoint_msg(key, owner, pid, adopt=True))
            res.count("adopted")
            return res
        res.sends.append(Send(PROFILE_TOPIC, owner, Link(pid=owner, sender=pid, uniq=unique_ids(entry, self.config),
                                                         via=key)))
        return res

    # -- merges -------------------------------------------------------------------------------------
    def _link(self, pid: str, entry: ProfileState | None, msg: Link) -> OpResult:
        """Profile `from` shares a record with this one: 1. refuse if their unique ids differ (P4);
        2. the larger id ships its state to the smaller and freezes (P5.1), or asks the larger to."""
        res = OpResult()
        other = msg.sender
        if other == pid:
            return res
        via = Identity.from_key(msg.via) if msg.via else None
        if entry is None:  # not born yet: `via` is the home identity its id was claimed with (I2)
            if via is None:
                res.count("stale")
                return res
            entry = ProfileState(pid, created_ms=self.now_ms())
            add_identity(entry, via, entry.created_ms)
            res.write = entry
        elif (via is not None and via.id not in entry.identities.get(via.namespace, ()) and via.key not in entry.claims
              and self._keeps_unawaited(entry, via)):
            # the table gives `via` to this profile, which neither lists nor awaits it: a crash lost the write that
            # listed it (its home hop's or its claim's). Listed now, so that a merge repoints it with the rest.
            add_identity(entry, via, self.now_ms())
            res.write = entry
        mine = unique_ids(entry, self.config)
        conflict = unique_conflict(mine, msg.uniq)
        if conflict:
            log.warning("link refused: profiles %s and %s hold different %s", pid, other, ", ".join(conflict))
            res.count("links_refused")
            return res
        if pid < other:
            res.sends.append(Send(PROFILE_TOPIC, other, Link(pid=other, sender=pid, uniq=mine)))
            return res
        entry.seq += 1
        entry.merging = (other, f"{pid}/{entry.seq}")
        res.sends.append(self._absorb_msg(pid, entry))
        res.write = entry
        return res

    @staticmethod
    def _absorb_msg(pid: str, entry: ProfileState) -> Send:
        """The state of a merging profile, to the profile it merges into (its held messages stay here)."""
        assert entry.merging is not None
        into, token = entry.merging
        shipped = replace(entry, held=[])
        return Send(PROFILE_TOPIC, into, Absorb(pid=into, sender=pid, token=token, state=encode_profile(shipped)))

    def _absorb(self, pid: str, entry: ProfileState | None, msg: Absorb) -> OpResult:
        """At the survivor (P5.2): 1. a redelivered absorb is answered again; 2. refuse on a unique
        conflict with the current state; 3. absorb identities, pending claims, attributes and events;
        4. answer; 5. guardrail; 6. re-evaluate every audience."""
        res = OpResult()
        other_id, now = msg.sender, self.now_ms()
        accepted = Send(PROFILE_TOPIC, other_id, Accepted(pid=other_id, token=msg.token, by=pid))
        profile = entry if entry is not None else ProfileState(pid, created_ms=now)
        # a redelivered absorb carries a token this profile has absorbed. The same id with a new token is a new
        # attempt: a crash can lose the sender's Forward (and so the `accepted`) after its absorb was taken here,
        # and the sender, live again, gathers more state before it merges again. (Values stored before tokens
        # were kept here list bare ids.)
        if msg.token in profile.merged or other_id in profile.merged:
            res.sends.append(accepted)
            return res
        other = decode_profile(msg.state)
        conflict = unique_conflict(unique_ids(profile, self.config), unique_ids(other, self.config))
        if conflict:
            log.warning("merge refused: profiles %s and %s hold different %s", pid, other_id, ", ".join(conflict))
            res.count("merges_refused")
            res.sends.append(Send(PROFILE_TOPIC, other_id, Refused(pid=other_id, token=msg.token, by=pid)))
            return res
        other.memberships.clear()
        consent_before = self._consent_values(profile)
        summary = absorb(profile, other, self.config)
        for key, claimants in other.claims.items():
            pending = profile.claims.setdefault(key, {})
            for claimant, ts in claimants.items():
                pending[claimant] = min(ts, pending.get(claimant, ts))
        for key in list(profile.claims):  # a claim of an identity now listed here is settled
            ident = Identity.from_key(key)
            if ident.id in profile.identities.get(ident.namespace, ()):
                del profile.claims[key]
        merged = [m for m in profile.merged if m not in other.merged] + other.merged + [msg.token]
        profile.merged = merged[-MERGED_KEEP:]
        profile.seq += 1
        res.sends.append(accepted)
        res.count("merges")
        self._release(profile, enforce_identity_limit(profile, self.config), res)
        self._evaluate(profile, summary, res, now=now, event_time=now, cause=None, kind="merge", all_=True,
                       created=entry is None, consent_before=consent_before)
        res.write = profile
        return res

    def _accepted(self, pid: str, entry: ProfileState | None, msg: Accepted) -> OpResult:
        """Absorbed (P5.3): 1. exit memberships; 2. repoint every identity, listed or pending (a pending
        claim's answer comes to the survivor through the forward); 3. pass held messages on; 4. forward."""
        res = OpResult()
        if entry is None or entry.merging is None or entry.merging[1] != msg.token:
            res.count("stale")
            return res
        into = msg.by
        res.changes.extend(exit_all(entry, self.engine, now_ms=self.now_ms(), kind="merge",
                                    reason=f"merged into {into}"))
        forward = Forward(into, msg.token, tuple(i.key for i in entry.identity_list() + entry.claim_list()),
                          tuple(entry.held))
        self._resend_accepted(pid, forward, res)
        res.write = forward
        return res

    @staticmethod
    def _resend_accepted(pid: str, forward: Forward, res: OpResult) -> None:
        """What `accepted` sends, kept in the Forward it leaves: repoint every identity, pass held messages on."""
        for key in forward.repointed:
            res.sends.append(repoint_msg(key, pid, forward.into))
        for held in forward.passed:
            res.sends.append(Send(PROFILE_TOPIC, forward.into, readdressed(held, forward.into)))

    def _refused(self, pid: str, entry: ProfileState | None, msg: Refused) -> OpResult:
        """Not absorbed (P5.3): thaw and handle the held messages in order (one may start a merge again,
        which holds the rest)."""
        res = OpResult()
        if entry is None or entry.merging is None or entry.merging[1] != msg.token:
            if entry is not None and entry.thawed is not None and entry.thawed[0] == msg.token:
                res.sends.extend(Send(t, k, v) for t, k, v in entry.thawed[1])  # redelivered: send again
            else:
                res.count("stale")
            return res
        held, entry.merging, entry.held = entry.held, None, []
        entry.seq += 1
        current: Entry = entry
        for m in held:
            sub = self.handle(pid, current, m)
            res.extend(sub)
            if sub.delete:  # a held erasure
                current = None
            elif sub.write is not None:
                current = sub.write
        if isinstance(current, ProfileState):
            current.thawed = (msg.token, [[s.topic, s.key, s.value] for s in res.sends if s.topic in STAGE_TOPICS])
        res.write, res.delete = current, current is None
        return res

    def _resume(self, pid: str, entry: ProfileState | None, _msg: Resume) -> OpResult:
        """A worker was assigned this profile's partition and found stitching in flight: a crash may have lost
        the messages it waits for (kept in-process by local delivery, or unacknowledged) while its state
        survived, and nothing else would send them again. 1. a merging profile sends its `absorb` again (the
        survivor answers again if it has absorbed it already); 2. every pending claim is asked again (claims
        are idempotent; the answer to an absorbed claimant comes through its forward)."""
        res = OpResult()
        if entry is None:
            return res
        if entry.merging is not None:
            res.sends.append(self._absorb_msg(pid, entry))
        for key, claimants in sorted(entry.claims.items()):
            for claimant, ts in sorted(claimants.items()):
                res.sends.append(claim_msg(key, claimant, ts))
        res.count("resumed")
        return res

    # -- erasure (pipeline.privacy) ------------------------------------------------------------------
    def _erase(self, pid: str, entry: ProfileState | None, msg: Erase) -> OpResult:
        """Erase the person (reached through the identity stage, like a record; held while merging, forwarded
        after a merge): 1. exit every active membership with reason `erasure` (destinations delete); 2. release
        every identity, listed or pending; 3. erase the forwards of the profiles it absorbed (they keep the
        identities they repointed); 4. tombstone its and their keys on activation.membership-state; 5. delete
        the entry; 6. report done, with the hashes of what was removed. A redelivered request finds no entry and
        does nothing (its first handling reported already)."""
        res = OpResult()
        if entry is None:
            res.count("stale")
            return res
        now = self.now_ms()
        exits = exit_all(entry, self.engine, now_ms=now, kind="erasure", reason=ERASURE_REASON)
        res.changes.extend(exits)
        keys = [i.key for i in entry.identity_list() + entry.claim_list()]
        absorbed = entry.absorbed_ids()
        # (an identity may still be an absorbed profile's, its repoint here in flight: free it from them too)
        res.sends.extend(release_msg(key, pid, absorbed) for key in keys)
        res.sends.extend(Send(PROFILE_TOPIC, m, EraseForward(pid=m)) for m in absorbed)
        audiences = sorted(set(self.engine.audiences) | set(entry.memberships))
        res.sends.extend(Send(MEMBERSHIP_STATE_TOPIC, f"{owner}|{aid}", None)
                         for owner in (pid, *absorbed) for aid in audiences)
        erased = {"profiles": 1 + len(absorbed), "identities": len(keys), "memberships": len(exits)}
        res.sends.append(done_record(msg, now, found=True, erased=erased, traces=(
            hashed(self.erasure_salt, v) for v in (*keys, pid, *absorbed))))
        res.delete = True
        res.count("erased")
        log.info("erasure %s: profile %s erased (%d identities released, %d memberships exited, %d absorbed "
                 "profiles)", msg.request, pid, len(keys), len(exits), len(absorbed))
        return res

    @staticmethod
    def _erase_forward(_pid: str, _entry: ProfileState | None, _msg: EraseForward) -> OpResult:
        """Only a forward is erased this way (`_at_forward`); a live profile or no entry: a stale message."""
        return OpResult(counters={"stale": 1})

    # -- time and batch -----------------------------------------------------------------------------
    def _tick(self, _pid: str, entry: ProfileState | None, _msg: Tick) -> OpResult:
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

    def _evaluate_op(self, _pid: str, entry: ProfileState | None, msg: Evaluate) -> OpResult:
        res = OpResult()
        if entry is None:
            return res
        now = self.now_ms()
        # no audience list (or an empty one) means every audience, not "those the (empty) change affects"
        audiences = msg.audiences or None
        self._evaluate(entry, ChangeSummary(), res, now=now, event_time=now, cause=None,
                       kind=msg.kind, audience_ids=audiences, all_=audiences is None)
        res.write = entry
        return res

    # -- activation receipts (pipeline.destinations.receipts) ----------------------------------------
    @staticmethod
    def _receipt(_pid: str, entry: ProfileState | None, msg: Receipt) -> OpResult:
        """A destination acknowledged a membership message: note, on the membership, what that destination last
        got and when (one entry per destination, the least recent dropped past MAX_DELIVERIES). Ignored (and
        counted): no such profile or membership, or a message older than the membership's current transition
        (its event time is before the membership's `since_ms`, which every membership message carries as its
        event time) or than what the destination's entry already says (a receipt redelivered late)."""
        res = OpResult()
        m = entry.memberships.get(msg.audience) if entry is not None else None
        if m is None:
            res.count("receipts_unknown")
            return res
        current = m.deliveries.get(msg.destination)
        if msg.event_ms < m.since_ms or current is not None and (
                (msg.event_ms, msg.delivered_ms) < (current.event_ms, current.delivered_ms)):
            res.count("receipts_stale")
            return res
        if current is None and len(m.deliveries) >= MAX_DELIVERIES:
            del m.deliveries[min(m.deliveries, key=lambda d: m.deliveries[d].delivered_ms)]
        m.deliveries[msg.destination] = Delivery(msg.status, msg.delivered_ms, msg.event_ms)
        res.write = entry
        res.count("receipts")
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
    def _consent_values(self, profile: ProfileState) -> dict[str, Scalar]:
        """The values of the consent attributes (pipeline.consent) before a change: a profile change says
        what they were, so a destination can tell a withdrawal or grant from a change between two values
        its rule reads alike."""
        out: dict[str, Scalar] = {}
        for path in self.engine.carried_attributes:
            av = profile.attributes.get(path)
            out[path] = av.value if av is not None else None
        return out

    def _release(self, profile: ProfileState, removed: list[Identity], res: OpResult) -> None:
        """Free the identities the guardrail dropped, compare-and-set on this profile or one it absorbed (an
        absorbed identity may still be the merged-away profile's: its repoint here comes later)."""
        pid = profile.profile_id
        absorbed = profile.absorbed_ids()
        if removed:
            by_ns: dict[str, int] = {}
            for ident in removed:
                by_ns[ident.namespace] = by_ns.get(ident.namespace, 0) + 1
            log.info("identity guardrail: profile %s dropped %d identities (%s)", pid, len(removed),
                     ", ".join(f"{ns}={n}" for ns, n in sorted(by_ns.items())))
            res.count("identities_dropped", len(removed))
        for ident in removed:
            res.sends.append(release_msg(ident.key, pid, absorbed))

    def _evaluate(self, profile: ProfileState, summary: ChangeSummary, res: OpResult, *, now: int,
                  event_time: int, cause: str | None, kind: str, all_: bool = False, created: bool = False,
                  audience_ids: list[str] | None = None, consent_before: dict[str, Scalar] | None = None,
                  ) -> None:
        """Evaluate the audiences the change can affect, record memberships and the next deadline,
        and emit membership changes and (for streaming destinations) the profile change. `consent_before`: the
        consent attributes' values before the change (`_consent_values`)."""
        decided: list[str] = []
        every = audience_ids is None and (all_ or created)
        if audience_ids is None:
            audience_ids = self.engine.affected(
                event_types=summary.event_types_added | summary.event_types_dropped,
                attributes=summary.attributes_changed, all_=every)
        deadline: int | None = None
        if audience_ids:
            decisions, deadline = self.engine.decide(profile, now, audience_ids)
            if cause is not None:
                decisions = [d if d.cause_event_id or not d.qualified else _with_cause(d, cause)
                             for d in decisions]
            if decisions:
                changes = apply_decisions(profile, decisions, self.engine, now_ms=now, event_time_ms=event_time,
                                          kind=kind)
                decided = sorted({c.audience_id for c in changes})
                res.changes.extend(changes)
        # a partial evaluation never moves the deadline later, even a passed one: its due tick re-checks all
        current = profile.next_deadline_ms
        if every or (deadline is not None and (current is None or deadline < current)):
            profile.next_deadline_ms = deadline
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
                "memberships_changed": decided,
                "previous_attributes": {a: v for a, v in (consent_before or {}).items()
                                        if a in summary.attributes_changed},
            }))


def _with_cause(d: Decision, cause: str) -> Decision:
    return d._replace(cause_event_id=cause)
