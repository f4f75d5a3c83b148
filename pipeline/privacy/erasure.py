"""Erasure requests, pure: the salted hash that stands for an identity, the messages a request starts with,
its status records on `control.erasure`, and the search for traces left in stores and compacted topics.

A request is keyed by its id and never carries the identity's value: `subject` is a keyed hash of the
identity key (`namespace:value`), `traces` the hashes of every identity key and profile id the erasure
removed, so a verification can recognise them without the values being kept anywhere.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.identity.stitch import IdentityResult
from pipeline.stages.messages import Erase, Send, readdressed
from pipeline.topics import ERASURE_TOPIC, IDENTITY_TOPIC, PROFILE_TOPIC

REASON = "erasure"  # the reason of the exits an erasure emits (destinations deliver them as deletions)


def salt_of(salt: str, app_id: str) -> bytes:
    """The hashing key: PIPELINE_ERASURE_SALT, else the app id (every worker and CLI of a deployment agree)."""
    return (salt or app_id).encode()[:64]  # blake2b takes a key of at most 64 bytes


def hashed(salt: bytes, value: str) -> str:
    """A keyed hash (BLAKE2b MAC) of an identity key or a profile id: equal values, equal hashes; without the
    salt nobody can test a guessed e-mail against it."""
    return hashlib.blake2b(value.encode(), key=salt, digest_size=16).hexdigest()


def new_request_id() -> str:
    return f"er-{uuid.uuid4().hex}"


def request_record(request: str, subject: str, suppress: bool, requested_ms: int) -> dict[str, Any]:
    """The status record of a request just made (the profile stage replaces it when it is done)."""
    return {"request": request, "subject": subject, "status": "requested", "suppress": suppress,
            "requested_ms": requested_ms}


def start_erasure(identity_key: str, salt: bytes, *, suppress: bool, now_ms: int,
                  request: str | None = None) -> tuple[str, list[Send]]:
    """The request id and what to send: the status record, then the `erase` op to the identity's partition
    of the identity stage (which finds the profile, as stitching does)."""
    request = request or new_request_id()
    record = request_record(request, hashed(salt, identity_key), suppress, now_ms)
    op = Erase(request=request, subject=record["subject"], suppress=suppress, requested_ms=now_ms)
    return request, [Send(ERASURE_TOPIC, request, record), Send(IDENTITY_TOPIC, identity_key, op)]


def done_record(msg: Erase, now_ms: int, *, found: bool, traces: Iterable[str] = (),
                erased: dict[str, int] | None = None) -> Send:
    """The final status of a request: what was erased (counts) and the hashes of what it removed."""
    return Send(ERASURE_TOPIC, msg.request, {
        "request": msg.request, "subject": msg.subject, "status": "done", "found": found,
        "suppress": msg.suppress, "requested_ms": msg.requested_ms, "done_ms": now_ms,
        "erased": erased or {"profiles": 0, "identities": 0, "memberships": 0}, "traces": sorted(set(traces))})


@dataclass
class Trace:
    """Something a verification found: where (store or topic, partition), what kind of place, the hash."""

    where: str
    place: str  # key | value
    hash: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "place": self.place, "hash": self.hash}


@dataclass
class Verification:
    """The outcome of scanning stores or topics for one request's traces."""

    request: str
    scanned: dict[str, int] = field(default_factory=dict)  # store / topic -> records scanned
    traces: list[Trace] = field(default_factory=list)
    plain_hits: list[str] = field(default_factory=list)  # where a value given in plain text was found

    @property
    def clean(self) -> bool:
        return not self.traces and not self.plain_hits

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request, "clean": self.clean, "scanned": dict(sorted(self.scanned.items())),
                "traces": [t.to_dict() for t in self.traces], "plain_text_found_in": sorted(set(self.plain_hits))}

    def lines(self) -> list[str]:
        """The report, as `pipeline privacy verify` prints it."""
        out = [f"erasure {self.request}: scanned " + ", ".join(f"{w} ({n} records)" for w, n in
                                                              sorted(self.scanned.items()))]
        out += [f"  TRACE {t.where}: a {t.place} with hash {t.hash}" for t in self.traces]
        out += [f"  TRACE {w}: a given plain-text value" for w in sorted(set(self.plain_hits))]
        out.append(f"erasure {self.request}: " + ("no trace left" if self.clean else
                                                 f"{len(self.traces) + len(set(self.plain_hits))} trace(s) left"))
        return out


def tokens_of(where: str, key: bytes, value: Any) -> Iterable[tuple[str, str]]:
    """(place, token) pairs of one record that could be an identity key or a profile id: the key (and the
    profile id before `|` in a membership-state key), and the ids a decoded value names."""
    k = key.decode(errors="replace")
    yield "key", k
    if "|" in k:
        yield "key", k.split("|", 1)[0]
    if isinstance(value, str):
        yield "value", value
    elif isinstance(value, dict):
        for name in ("profile_id", "into"):
            if isinstance(value.get(name), str):
                yield "value", value[name]
        for ns, ids in (value.get("identities") or {}).items():
            for i in ids:
                yield "value", f"{ns}:{i}"
        for other in value.get("ids") or ():
            yield "value", other


def scan(verification: Verification, where: str, records: Iterable[tuple[bytes, Any, bytes | None]],
         wanted: set[str], salt: bytes, plain: Iterable[bytes] = ()) -> None:
    """Look for `wanted` hashes among the tokens of each (key, decoded value, raw value) record, and for the
    plain-text values (an e-mail, a phone number, a profile id, when the operator gives them) in its bytes."""
    plain = [p for p in plain if p]
    n = 0
    for key, value, raw in records:
        n += 1
        for place, token in tokens_of(where, key, value):
            h = hashed(salt, token)
            if h in wanted:
                verification.traces.append(Trace(where, place, h))
        if plain and any(p in key or (raw is not None and p in raw) for p in plain):
            verification.plain_hits.append(where)
    verification.scanned[where] = verification.scanned.get(where, 0) + n


def erase_at_identity(key: str, current: str | None, msg: Erase, now_ms: int) -> IdentityResult:
    """The identity stage of an erasure (keyed by the identity named in the request): the profile that owns
    it erases itself (and releases this identity with the others), or, with no owner, the request is done
    with nothing found. The identity itself is never written here: only its owner's release deletes it."""
    if current is None:
        return IdentityResult(sends=[done_record(msg, now_ms, found=False)])
    return IdentityResult(sends=[Send(PROFILE_TOPIC, current, readdressed(msg, current))])
