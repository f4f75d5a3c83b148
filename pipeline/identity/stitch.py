"""The identity stage of stitching: pure handlers for messages keyed by identity (namespace:id).

Design (docs/architecture.md has the whole picture). The identity table maps an identity to the profile
that owns it. Invariants this stage keeps:
  I1. Each identity has at most one owner; a write only happens while handling a message keyed by that
      identity (Faust's partition rule), so each identity is serialised.
  I2. Only three things ever point an identity at a profile P: the *home hop* of a record claiming its home
      identity for a new profile id P (P does not exist yet; the first message that reaches P names that
      identity, so P is born knowing it), a `claim` sent by P itself (P keeps it as pending until the
      answer), and a `repoint` to P sent by a profile that P has absorbed (P got its identities first), or by
      P itself from one it absorbed with `adopt` (P is told, `claimed`, and lists or releases it).
      So a profile always knows every identity the table gives it: decisions made at a profile (unique
      namespaces, merges) see all of its identities.
  I3. Every change is conditional (compare-and-set): a claim only takes a free identity, a repoint or a
      release only moves an identity still owned by the sender, so a late or duplicate message is harmless.
      A release may also name the profiles the sender absorbed: an identity a survivor drops may still be
      owned by one of them (its repoint in flight), and the repoint would then give the survivor an identity
      it does not list. A merged-away id owns nothing of its own, so freeing it there takes nothing from anyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field

from pipeline.stages.messages import (
    Absorb,
    Apply,
    Claim,
    Claimed,
    IdentityMessage,
    Link,
    RecordWire,
    Release,
    Repoint,
    Resolve,
    Send,
    Taken,
)
from pipeline.topics import IDENTITY_TOPIC, PROFILE_TOPIC


@dataclass
class IdentityResult:
    """What handling one identity message does: the table write (if any) and the messages to send."""

    write: str | None = None
    delete: bool = False
    sends: list[Send] = field(default_factory=list)


def new_profile_id(now_ms: int, seed: str) -> str:
    """Profile ids sort by creation time (13 hex digits of ms), then a hash of the creating record."""
    return f"{now_ms:012x}{hashlib.blake2b(seed.encode(), digest_size=5).hexdigest()}"


def home_key(keys: list[str], unique: Collection[str]) -> str:
    """The identity a record is routed by: its first identity in a unique namespace (the person it names
    beyond doubt), else its first (highest-priority) identity. Keys are ordered by priority."""
    for key in keys:
        if key.partition(":")[0] in unique:
            return key
    return keys[0]


def start_resolve(rec: RecordWire | None, home: str, now_ms: int) -> Send:
    """The home hop of a record: to its home identity, which names (or, if free, becomes) its profile.
    `rec` None adopts a lone identity: it gets a profile of its own if it has none."""
    # The candidate id comes from the record alone (its time and id), not from the clock: a record handled
    # again after a crash names the same candidate, so a profile its first handling created (its write kept,
    # the identity's lost) is the one the identity is given again.
    seed, born = (rec.record_id, rec.timestamp_ms) if rec is not None else (home, now_ms)
    return Send(IDENTITY_TOPIC, home, Resolve(rec=rec, candidate=new_profile_id(born, seed)))


def apply_msg(owner: str, rec: RecordWire | None, home: str, hop: bool = False) -> Send:
    """The record, to the profile that owns its home identity: from the resolve hop (`hop`: the owner was
    read in the identity table just now), or from ingest's local read (possibly stale)."""
    return Send(PROFILE_TOPIC, owner, Apply(pid=owner, rec=rec, home=home, hop=hop))


def claim_msg(key: str, pid: str, ts_ms: int) -> Send:
    """Profile `pid` asks for identity `key` (first seen at `ts_ms`); answered with claimed or taken."""
    return Send(IDENTITY_TOPIC, key, Claim(pid=pid, ts=ts_ms))


def repoint_msg(key: str, old: str, new: str, adopt: bool = False) -> Send:
    """Move `key` from profile `old` to `new` if `old` still owns it. `adopt`: `new` does not list it yet, and is
    told (`claimed`) once it is moved."""
    return Send(IDENTITY_TOPIC, key, Repoint(old=old, new=new, adopt=adopt))


def release_msg(key: str, pid: str, absorbed: Collection[str] = ()) -> Send:
    """Free `key` if `pid` still owns it, or one of the profiles `pid` absorbed (`absorbed`: their repoints to
    `pid` may not have reached `key` yet, and would then give `pid` an identity it has dropped)."""
    return Send(IDENTITY_TOPIC, key, Release(pid=pid, absorbed=tuple(absorbed)))


def _claimed(key: str, pid: str) -> Send:
    return Send(PROFILE_TOPIC, pid, Claimed(pid=pid, claimant=pid, key=key))


def handle_identity(key: str, current: str | None, msg: IdentityMessage) -> IdentityResult:
    """Handle one message for identity `key` whose table value is `current` (an erasure is
    pipeline.privacy.erasure.erase_at_identity's)."""
    match msg:
        case Resolve(rec=rec, candidate=cand):
            # 1. read the owner, or claim the identity for the record's new profile id; 2. send the record there
            if current is None:
                return IdentityResult(write=cand, sends=[apply_msg(cand, rec, key, hop=True)])
            if rec is None:
                if current == cand:  # redelivered: its apply may have been lost in a crash
                    return IdentityResult(sends=[apply_msg(current, None, key, hop=True)])
                return IdentityResult()  # adopting an identity that has found an owner meanwhile: nothing to do
            return IdentityResult(sends=[apply_msg(current, rec, key, hop=True)])
        case Claim(pid=pid):
            if current is None or current == pid:
                return IdentityResult(write=pid if current is None else None, sends=[_claimed(key, pid)])
            return IdentityResult(sends=[Send(PROFILE_TOPIC, pid, Taken(pid=pid, claimant=pid, key=key,
                                                                        owner=current))])
        case Repoint(old=old, new=new, adopt=adopt):
            # a merge moved this identity's profile: follow it if we still point at the old one
            if adopt and current in (old, new):  # (`new`: redelivered, its answer may be lost)
                return IdentityResult(write=new if current != new else None, sends=[_claimed(key, new)])
            return IdentityResult(write=new) if current == old else IdentityResult()
        case Release(pid=pid, absorbed=absorbed):  # the size guardrail dropped this identity from its profile
            # (or from one it absorbed: a merged-away id's pending repoint to `pid` then finds nothing to move)
            owned = current is not None and (current == pid or current in absorbed)
            return IdentityResult(delete=True) if owned else IdentityResult()
    raise ValueError(f"not an identity-stage message: {type(msg).__name__}")


def in_process_allowed(send: Send) -> bool:
    """Whether a worker may hand this stage message to a partition it holds in-process (`Runtime.local_delivery`)
    rather than produce it. A message delivered in-process is in no log: a crash loses it, while what its handling
    wrote may survive (each changelog partition keeps its own prefix), and only the root Kafka message of the
    cascade is handled again. Three kinds of message must be in their target's log, as they are without local
    delivery, because nothing could re-derive them after such a crash:
      - every identity-stage message (resolve, claim, repoint, release): the identity stage decides first come,
        first served (I3), and its decisions have effects elsewhere (a profile lists a claimed identity, is born
        with its home, holds events). Handled from its log, a decision lost in a crash is made again in the same
        order, so it comes out the same; a lost in-process claim or resolve would be sent again later, after a
        rival claim that now wins, with the first one's effects kept (an identity on two profiles);
      - `absorb`, the only copy of a merging profile's state in flight: its `accepted` turns the sender into a
        Forward, after which nothing can send the state again. In the survivor's log it is handled again until
        the survivor's absorption is acknowledged; in-process, a crash could keep the Forward and lose the
        absorption (the merged-away profile's identities and events gone);
      - `link`, which freezes its target (a merge) and makes it send its `absorb` through Kafka: a crash can keep
        that absorb and lose the frozen state. From its log, the target handles the link again at the same
        point and freezes again; in-process, the link is re-derived later, after messages the target then
        handles unfrozen (an absorb of another profile, say), so that two survivors absorb it.
    Everything else a stage sends in-process is re-derived by handling again what caused it (the redelivery rules
    in pipeline.profiles.ops), as through Kafka."""
    if send.topic == IDENTITY_TOPIC:
        return False
    return not isinstance(send.value, Absorb | Link)
