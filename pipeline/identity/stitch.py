"""The identity stage of stitching: pure handlers for messages keyed by identity (namespace:id).

Design (docs/architecture.md has the whole picture). Invariants this stage keeps:
  I1. The identity table maps each identity to at most one profile id; a write only ever happens while
      handling a message keyed by that identity (Faust's partition rule), so each identity is serialised.
  I2. A record with identities k1..kn (ordered by priority, deterministic) visits k1, k2, ... kn in turn
      ("resolve" hops). Each hop reads the owner of its identity, or claims the identity for the record's
      candidate profile id when it has none, and carries the owners seen so far to the next hop.
  I3. After the last hop the record is sent, with the full owner map, to the smallest owner id (the
      oldest profile: ids sort by creation time); the profile stage decides merges from there.
  I4. Repoints and releases are conditional (compare-and-set on the old owner), so a late or duplicate
      one never moves an identity that has been re-assigned since.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pipeline.ingest.wire import wire_identity_keys

IDENTITY_TOPIC = "internal.identity"
PROFILE_TOPIC = "internal.profile-ops"


@dataclass(frozen=True)
class Send:
    """A message to produce: logical topic, key, value (dict for msgpack topics)."""

    topic: str
    key: str
    value: Any


@dataclass
class IdentityResult:
    """What handling one identity message does: the table write (if any) and the messages to send."""

    write: str | None = None
    delete: bool = False
    sends: list[Send] = field(default_factory=list)


def new_profile_id(now_ms: int, seed: str) -> str:
    """Profile ids sort by creation time (13 hex digits of ms), then a hash of the creating record."""
    return f"{now_ms:012x}{hashlib.blake2b(seed.encode(), digest_size=5).hexdigest()}"


def start_resolve(rec_wire: dict[str, Any], now_ms: int) -> Send:
    """The first hop of a record: addressed to its first (highest-priority) identity."""
    keys = wire_identity_keys(rec_wire)
    msg = {"op": "resolve", "rec": rec_wire, "keys": keys, "i": 0, "owners": {},
           "cand": new_profile_id(now_ms, rec_wire["id"])}
    return Send(IDENTITY_TOPIC, keys[0], msg)


def fast_apply(rec_wire: dict[str, Any], owners: dict[str, str]) -> Send:
    """Every identity of the record already has an owner (read from a local table partition): skip the
    hops and go straight to the profile stage, as the last hop would. The profile stage re-routes the
    record through `start_resolve` if the owner does not hold all its identities (a stale read)."""
    target = min(owners.values())
    return Send(PROFILE_TOPIC, target, {"op": "apply", "pid": target, "to": target, "rec": rec_wire,
                                        "owners": owners, "nm": False, "fast": True})


def handle_identity(key: str, current: str | None, msg: dict[str, Any]) -> IdentityResult:
    """Handle one message for identity `key` whose table value is `current`."""
    op = msg["op"]
    if op == "resolve":
        return _resolve(key, current, msg)
    if op == "repoint":  # a merge moved this identity's profile: follow it if we still point at the old one
        if current == msg["from"]:
            return IdentityResult(write=msg["to"])
        return IdentityResult()
    if op == "release":  # the size guardrail dropped this identity from its profile
        if current == msg["pid"]:
            return IdentityResult(delete=True)
        return IdentityResult()
    raise ValueError(f"unknown identity op {op!r}")


def _resolve(key: str, current: str | None, msg: dict[str, Any]) -> IdentityResult:
    """1. read or claim the owner; 2. record it; 3. hop to the next identity, or 4. hand over to profiles."""
    result = IdentityResult()
    owner = current
    if owner is None:
        owner = msg["cand"]
        result.write = owner
    owners = dict(msg["owners"])
    owners[key] = owner
    i = msg["i"] + 1
    keys = msg["keys"]
    if i < len(keys):
        result.sends.append(Send(IDENTITY_TOPIC, keys[i], {**msg, "i": i, "owners": owners}))
        return result
    target = min(owners.values())
    result.sends.append(Send(PROFILE_TOPIC, target, {"op": "apply", "pid": target, "to": target,
                                                     "rec": msg["rec"], "owners": owners, "nm": False}))
    return result
