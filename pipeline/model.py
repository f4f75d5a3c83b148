"""Core data model shared by every area: identities, ingested records, profile state, memberships.

Messages are frozen dataclasses. `ProfileState` is the mutable value of the profile table; it is
serialised by `pipeline.state.codec` and only ever mutated by the profile stage, one batch at a time on the worker's event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# A scalar attribute or event-field value. Nested paths are flattened to dotted keys
# ("person.birthDate", "commerce.order.total") so evaluation and merging work on flat maps.
Scalar = None | bool | int | float | str

MembershipStatus = Literal["realized", "existing", "exited"]
DeliveredStatus = Literal["entered", "exited"]  # what a destination last acknowledged of a membership
EvaluationKind = Literal["streaming", "batch", "edge", "deadline", "merge", "definition", "erasure"]


@dataclass(frozen=True, order=True, slots=True)
class Identity:
    """One identity value in a namespace (already normalised when it leaves ingest)."""

    namespace: str
    id: str

    @property
    def key(self) -> str:
        """The identity table key: namespace and value, unambiguous because namespaces have no ':'."""
        return f"{self.namespace}:{self.id}"

    @classmethod
    def from_key(cls, key: str) -> Identity:
        ns, _, value = key.partition(":")
        return cls(ns, value)


@dataclass(frozen=True, slots=True)
class ExperienceEvent:
    """An online or offline behavioural event (page view, product view, order...), already decoded."""

    event_id: str
    timestamp_ms: int
    event_type: str
    dataset: str
    identities: tuple[Identity, ...]
    primary: Identity | None
    fields: dict[str, Scalar] = field(default_factory=dict)  # flattened payload


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """An attribute upsert from an offline source (CRM, loyalty, orders), already decoded."""

    record_id: str
    timestamp_ms: int
    dataset: str
    identities: tuple[Identity, ...]
    primary: Identity | None
    attributes: dict[str, Scalar] = field(default_factory=dict)  # flattened dotted paths


IngestRecord = ExperienceEvent | ProfileRecord


@dataclass(slots=True)
class AttributeValue:
    """A profile attribute with its provenance, which the merge policy uses."""

    value: Scalar
    dataset: str
    ts_ms: int


@dataclass(slots=True)
class StoredEvent:
    """An event as kept in the bounded per-profile history."""

    event_id: str
    event_type: str
    ts_ms: int
    dataset: str
    fields: dict[str, Scalar]


@dataclass(slots=True)
class Delivery:
    """What one destination last acknowledged of a membership (a receipt from the destination runner)."""

    status: DeliveredStatus
    delivered_ms: int
    event_ms: int  # the delivered message's event time: an older receipt never overwrites a newer one


MAX_DELIVERIES = 32  # destinations remembered per membership (one entry each; the least recent goes first)


@dataclass(slots=True)
class Membership:
    """A profile's membership in one audience."""

    audience_id: str
    status: MembershipStatus
    since_ms: int  # qualification time (or exit time for exited); the event time of its last message
    version: int  # audience definition version that decided it
    reason: str
    changed_ms: int
    # destination name -> what it last acknowledged; kept across the membership's transitions, so an exit not
    # yet delivered shows as the destination's last "entered"
    deliveries: dict[str, Delivery] = field(default_factory=dict)


@dataclass(slots=True)
class Outbox:
    """Messages a profile's handling sent to output topics that may not have reached Kafka yet, stamped with
    the producer epoch they were sent in (pipeline.profiles.outbox): written with the profile, so a crash
    that keeps the profile and loses the messages is followed by sending them again."""

    run: str  # the output producer's run (one per process)
    epoch: int  # its epoch: once that epoch is acknowledged, the messages are delivered
    messages: list[list[Any]]  # [logical topic, key, value], the latest per (topic, key)


@dataclass(slots=True)
class ProfileState:
    """The unified profile: identities, attributes, bounded event history and memberships."""

    profile_id: str
    created_ms: int
    # namespace -> id -> first-seen ms (first-seen drives the size guardrail's "oldest drop first")
    identities: dict[str, dict[str, int]] = field(default_factory=dict)
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    events: list[StoredEvent] = field(default_factory=list)  # sorted by ts_ms ascending
    memberships: dict[str, Membership] = field(default_factory=dict)
    next_deadline_ms: int | None = None
    seq: int = 0  # bumped on every change; part of idempotency keys
    # Stitching state (pipeline/profiles/ops.py), empty for almost every profile:
    # identities asked of the identity table with no answer yet: identity key -> {claimant id: first seen};
    # the claimant is this profile or one it absorbed while the claim was in flight
    claims: dict[str, dict[str, int]] = field(default_factory=dict)
    merging: tuple[str, str] | None = None  # (into, attempt token) while this profile waits to be absorbed
    held: list[Any] = field(default_factory=list)  # stage messages that arrived while merging, in order
    merged: list[str] = field(default_factory=list)  # tokens of the merge attempts absorbed here, newest last (bounded)
    # the last refused merge attempt's token and the stage messages its held messages sent when they were
    # handled: a redelivered `refused` sends them again (a crash may have kept the state and lost them)
    thawed: tuple[str, list[list[Any]]] | None = None
    outbox: Outbox | None = None  # output of recent handlings not known to be delivered
    # identity key -> the dataset of the record that first put it here (listed or pending claim), kept apart
    # from `identities` so the per-event path and the guardrail read what they did; missing: not known (an
    # identity stored before datasets were kept, or linked by the protocol itself)
    identity_sources: dict[str, str] = field(default_factory=dict)

    def absorbed_ids(self) -> list[str]:
        """The ids of the profiles merged into this one: `merged` keeps the tokens of their attempts
        (`<id>/<seq>`; values stored before tokens list bare ids)."""
        return list(dict.fromkeys(m.partition("/")[0] for m in self.merged))

    def identity_list(self) -> list[Identity]:
        return [Identity(ns, i) for ns, ids in sorted(self.identities.items()) for i in sorted(ids)]

    def claim_list(self) -> list[Identity]:
        return [Identity.from_key(k) for k in sorted(self.claims)]

    def holds(self, ident: Identity) -> bool:
        """Listed (the identity table points here) or claimed (asked for, no answer yet)."""
        return ident.id in self.identities.get(ident.namespace, ()) or ident.key in self.claims

    def attribute_values(self) -> dict[str, Scalar]:
        return {k: v.value for k, v in self.attributes.items()}

    def active_segments(self) -> set[str]:
        return {a for a, m in self.memberships.items() if m.status != "exited"}


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """A profile entered or left an audience: the message on activation.memberships."""

    profile_id: str
    audience_id: str
    audience_version: int
    status: MembershipStatus
    previous_status: MembershipStatus | None
    identities: dict[str, list[str]]
    attributes: dict[str, Scalar]
    reason: str
    cause_event_id: str | None
    evaluation: EvaluationKind
    event_time_ms: int
    emit_time_ms: int
    idempotency_key: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile_id": self.profile_id,
            "audience_id": self.audience_id,
            "audience_version": self.audience_version,
            "status": self.status,
            "previous_status": self.previous_status,
            "identities": self.identities,
            "attributes": self.attributes,
            "reason": self.reason,
            "cause_event_id": self.cause_event_id,
            "evaluation": self.evaluation,
            "event_time_ms": self.event_time_ms,
            "emit_time_ms": self.emit_time_ms,
            "idempotency_key": self.idempotency_key,
        }
