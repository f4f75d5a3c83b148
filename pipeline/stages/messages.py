"""Every stage message as a typed msgspec Struct, their one wire encoding, and the `Send` type.

One Struct per operation, tagged by `op` (a union msgspec decodes straight into the right class); handlers
`match` on the class. The wire form is a msgpack map whose keys are the short keys the stages used when the
messages were plain dicts (`rename=`), so a message written before typed messages decodes as one of these, and
one written now decodes in a worker that still reads dicts: a rolling restart needs no transition period and no
drain of the internal topics (docs/architecture.md, "Stage messages"). Unknown keys are ignored and new fields
get defaults, so adding a field stays compatible both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import msgspec.structs

from pipeline.model import ExperienceEvent, Identity, IngestRecord, ProfileRecord

IdPair = tuple[str, str]  # (namespace, id)


class _Record(msgspec.Struct, tag_field="k", kw_only=True, frozen=True, gc=False):
    """A decoded ingest record as stages carry it (keys: ts, ds, ids, pri, id, then the kind's own)."""

    timestamp_ms: int = msgspec.field(name="ts")
    dataset: str = msgspec.field(name="ds")
    identities: tuple[IdPair, ...] = msgspec.field(name="ids")
    primary: IdPair | None = msgspec.field(default=None, name="pri")
    record_id: str = msgspec.field(name="id")


class EventWire(_Record, tag="e", kw_only=True, frozen=True, gc=False):
    """An experience event."""

    event_type: str = msgspec.field(name="t")
    fields: dict[str, Any] = msgspec.field(default_factory=dict, name="f")


class AttributesWire(_Record, tag="p", kw_only=True, frozen=True, gc=False):
    """A profile record (attribute upserts)."""

    attributes: dict[str, Any] = msgspec.field(default_factory=dict, name="f")


RecordWire = EventWire | AttributesWire


def record_to_wire(rec: IngestRecord) -> RecordWire:
    ids = tuple((i.namespace, i.id) for i in rec.identities)
    pri = (rec.primary.namespace, rec.primary.id) if rec.primary else None
    if isinstance(rec, ExperienceEvent):
        return EventWire(timestamp_ms=rec.timestamp_ms, dataset=rec.dataset, identities=ids, primary=pri,
                         record_id=rec.event_id, event_type=rec.event_type, fields=rec.fields)
    return AttributesWire(timestamp_ms=rec.timestamp_ms, dataset=rec.dataset, identities=ids, primary=pri,
                          record_id=rec.record_id, attributes=rec.attributes)


def record_from_wire(w: RecordWire) -> IngestRecord:
    ids = tuple(Identity(ns, i) for ns, i in w.identities)
    pri = Identity(*w.primary) if w.primary else None
    if isinstance(w, EventWire):
        return ExperienceEvent(w.record_id, w.timestamp_ms, w.event_type, w.dataset, ids, pri, dict(w.fields))
    return ProfileRecord(w.record_id, w.timestamp_ms, w.dataset, ids, pri, dict(w.attributes))


def wire_identity_keys(w: RecordWire) -> list[str]:
    return [f"{ns}:{i}" for ns, i in w.identities]


class Message(msgspec.Struct, tag_field="op", kw_only=True, frozen=True, gc=False):
    """A stage message; its class name says the operation, `op` on the wire."""


# -- identity stage (internal.identity, keyed by identity) -----------------------------------------------------
class Resolve(Message, tag="resolve", kw_only=True, frozen=True, gc=False):
    """The home hop of a record (None: adopt a lone identity): to the home's owner, or claim it for `candidate`."""

    rec: RecordWire | None
    candidate: str = msgspec.field(name="cand")


class Claim(Message, tag="claim", kw_only=True, frozen=True, gc=False):
    """Profile `pid` asks for the identity (first seen at `ts`): answered `Claimed` or `Taken`."""

    pid: str
    ts: int


class Repoint(Message, tag="repoint", kw_only=True, frozen=True, gc=False):
    """Move the identity from `old` to `new` if `old` still owns it; `adopt`: tell `new` (`Claimed`) once moved."""

    old: str = msgspec.field(name="from")
    new: str = msgspec.field(name="to")
    adopt: bool = False


class Release(Message, tag="release", kw_only=True, frozen=True, gc=False):
    """Free the identity if `pid`, or a profile `pid` absorbed (`absorbed`, transitively), still owns it."""

    pid: str
    # a survivor's guardrail can drop an identity before the absorbed profile's repoint has moved it here
    absorbed: tuple[str, ...] = ()


class Erase(Message, tag="erase", kw_only=True, frozen=True, gc=False):
    """An erasure request: at the identity stage (no `pid`), then at the profile that owns the identity."""

    request: str
    subject: str
    suppress: bool = False
    requested_ms: int | None = None
    pid: str | None = None


# -- profile stage (internal.profile-ops, keyed by profile id) -------------------------------------------------
class Apply(Message, tag="apply", kw_only=True, frozen=True, gc=False):
    """A record (None: an adopted lone identity) at the owner of its home identity; `hop`: read there just now."""

    pid: str
    rec: RecordWire | None
    home: str
    hop: bool = False


class Claimed(Message, tag="claimed", kw_only=True, frozen=True, gc=False):
    """The identity table gave `key` to `claimant` (`pid` or a profile `pid` absorbed)."""

    pid: str
    claimant: str
    key: str


class Taken(Message, tag="taken", kw_only=True, frozen=True, gc=False):
    """`claimant`'s claim of `key` found it owned by `owner`."""

    pid: str
    claimant: str
    key: str
    owner: str


class Link(Message, tag="link", kw_only=True, frozen=True, gc=False):
    """Profile `sender` shares a record with `pid`; `uniq`: its unique ids; `via`: the identity it was refused."""

    pid: str
    sender: str = msgspec.field(name="from")
    uniq: dict[str, list[str]] = msgspec.field(default_factory=dict)
    via: str | None = None


class Absorb(Message, tag="absorb", kw_only=True, frozen=True, gc=False):
    """A merging profile's state (`pipeline.state.codec`), to the profile `pid` it merges into."""

    pid: str
    sender: str = msgspec.field(name="from")
    token: str
    state: bytes


class Accepted(Message, tag="accepted", kw_only=True, frozen=True, gc=False):
    """`by` absorbed the merge attempt `token` of `pid`."""

    pid: str
    token: str
    by: str


class Refused(Message, tag="refused", kw_only=True, frozen=True, gc=False):
    """`by` refused the merge attempt `token` of `pid` (unique ids differ)."""

    pid: str
    token: str
    by: str


class Resume(Message, tag="resume", kw_only=True, frozen=True, gc=False):
    """Send again what `pid`'s stitching in flight waits on (a newly assigned partition)."""

    pid: str


class EraseForward(Message, tag="erase-forward", kw_only=True, frozen=True, gc=False):
    """The survivor was erased: delete the forward `pid` it absorbed."""

    pid: str


class Tick(Message, tag="tick", kw_only=True, frozen=True, gc=False):
    """A deadline of `pid` came due: re-evaluate without new data."""

    pid: str


class Evaluate(Message, tag="evaluate", kw_only=True, frozen=True, gc=False):
    """Evaluate the listed audiences (None or empty: every audience) of one profile (walks)."""

    audiences: list[str] | None = None
    kind: str = "batch"


class Receipt(Message, tag="receipt", kw_only=True, frozen=True, gc=False):
    """Destination `destination` acknowledged a membership message of profile `pid` (from the destination runner,
    on activation.receipts). No identity: a profile id, names and times only."""

    pid: str
    audience: str = msgspec.field(name="aud")
    destination: str = msgspec.field(name="dest")
    status: Literal["entered", "exited"]
    delivered_ms: int = msgspec.field(name="at")
    event_ms: int = msgspec.field(name="ev")  # the message's event time: its membership's since_ms
    key: str  # the message's idempotency key


class Batch(Message, tag="batch", kw_only=True, frozen=True, gc=False):
    """A batch run over one partition (explicit partition); empty `audiences`: every audience."""

    run: str
    audiences: list[str] = msgspec.field(default_factory=list)
    since_ms: int = 0
    kind: str = "batch"
    started_ms: int | None = None


class DefsCheck(Message, tag="defs-check", kw_only=True, frozen=True, gc=False):
    """Compare the partition's stored audience fingerprints with the loaded definitions."""


# -- control.segments ------------------------------------------------------------------------------------------
class Progress(Message, tag="progress", kw_only=True, frozen=True, gc=False):
    """A walk's progress on one partition; `final` the last report, with its totals."""

    run: str
    partition: int
    seen: int
    total: int
    final: bool = False
    evaluated: int = 0
    changes: int = 0
    aborted: bool = False
    seconds: float = 0.0
    started_ms: int = 0


IdentityMessage = Resolve | Claim | Repoint | Release | Erase
ProfileMessage = (Apply | Claimed | Taken | Link | Absorb | Accepted | Refused | Resume | Erase | EraseForward
                  | Tick | Evaluate | Receipt | Batch | DefsCheck)
StageMessage = IdentityMessage | ProfileMessage | Progress


def op_of(msg: Any) -> str:
    """The wire name of a message's operation (metrics, dead-letter headers)."""
    return str(msg.__struct_config__.tag) if isinstance(msg, Message) else "?"


def readdressed(msg: StageMessage, pid: str) -> StageMessage:
    """The message addressed to profile `pid` (a forward passes it on to its survivor)."""
    return msgspec.structs.replace(msg, pid=pid) if "pid" in msg.__struct_fields__ else msg


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StageMessage)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> StageMessage:
    """One stage message from its wire form (raises msgspec.DecodeError / ValidationError on a bad one)."""
    return _decoder.decode(data)


def to_stored(msg: StageMessage) -> dict[str, Any]:
    """The message as plain msgpack-able data (its wire map), for values stored inside a profile entry."""
    return msgspec.to_builtins(msg, builtin_types=(bytes,))  # type: ignore[no-any-return]


def from_stored(value: Any) -> StageMessage:
    """A message stored inside a profile entry (`to_stored`, or a dict written before typed messages)."""
    return msgspec.convert(value, StageMessage)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Send:
    """A message to produce: logical topic (pipeline.topics), key, value (a stage message, or what the topic's
    codec encodes: a dict for msgpack topics, Avro's for Avro ones, bytes for raw ones)."""

    topic: str
    key: str
    value: Any
