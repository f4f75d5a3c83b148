"""The destination interface, the delivered payload and the registry of destination kinds."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pipeline.destinations.config import KindSettings, register_kind_settings
from pipeline.errors import UnknownNameError
from pipeline.model import Scalar

if TYPE_CHECKING:
    from pipeline.connection import Kafka
    from pipeline.destinations.config import DestinationConfig

PayloadKind = Literal["membership", "attributes"]
# realized/existing/exited come from membership changes; "updated" marks an attribute/identity update.
PayloadStatus = Literal["realized", "existing", "exited", "updated"]


@dataclass(frozen=True)
class Payload:
    """One record for one destination, already mapped: identities transformed, attributes projected."""

    destination: str
    profile_id: str
    audience_id: str | None
    kind: PayloadKind
    status: PayloadStatus
    identities: dict[str, list[str]]
    attributes: dict[str, Scalar]
    idempotency_key: str
    event_time_ms: int
    source_emit_ms: int
    # Why a membership payload exists when it is not the audience's own decision: consent_withdrawn,
    # consent_granted, or erasure (an exit that asks the receiver to delete the person); None otherwise, and
    # then left out of the delivered record.
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "destination": self.destination,
            "profile_id": self.profile_id,
            "audience_id": self.audience_id,
            "kind": self.kind,
            "status": self.status,
            "identities": self.identities,
            "attributes": self.attributes,
            "idempotency_key": self.idempotency_key,
            "event_time_ms": self.event_time_ms,
            "source_emit_ms": self.source_emit_ms,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Payload:
        return cls(
            destination=str(d["destination"]),
            profile_id=str(d["profile_id"]),
            audience_id=d.get("audience_id"),
            kind=d["kind"],
            status=d["status"],
            identities={k: list(vs) for k, vs in (d.get("identities") or {}).items()},
            attributes=dict(d.get("attributes") or {}),
            idempotency_key=str(d["idempotency_key"]),
            event_time_ms=int(d["event_time_ms"]),
            source_emit_ms=int(d["source_emit_ms"]),
            reason=d.get("reason"),
        )


# Called with payloads that will never be delivered (non-retryable error or retries exhausted) and a
# short machine-readable reason such as "http_400" or "retries_exhausted:http_503".
DeadLetterSink = Callable[[list[Payload], str], Awaitable[None]]


class TopicResolver(Protocol):
    """Maps a logical topic name (as written in config) to the physical Kafka topic name."""

    def name(self, logical: str) -> str: ...


async def _discard_dead_letters(payloads: list[Payload], reason: str) -> None:
    raise RuntimeError(f"no dead-letter sink configured; {len(payloads)} payload(s) lost ({reason})")


@dataclass(frozen=True)
class DestinationContext:
    """What a destination needs from its surroundings besides its own config."""

    dead_letter: DeadLetterSink = _discard_dead_letters
    kafka: Kafka | None = None  # the pipeline's cluster (pipeline.connection)
    topics: TopicResolver | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Destination(abc.ABC):
    """A place payloads are delivered to (a webhook, a Kafka topic, files in a bucket).

    Lifecycle: `start()` once, then any number of `deliver()`/`flush()` calls, then `close()` once.
    The runner commits consumer offsets only after `flush()` returned, so a destination must not
    report a payload as handled before it is delivered or handed to the dead-letter sink.
    """

    def __init__(self, config: DestinationConfig, context: DestinationContext) -> None:
        self.config = config
        self.context = context

    @property
    def name(self) -> str:
        return self.config.name

    @abc.abstractmethod
    async def start(self) -> None:
        """Called once before the first delivery: open connections, start background tasks.

        Raising means the destination cannot run at all (bad URL, unreachable bucket); the runner
        reports it and does not consume for this destination.
        """

    @abc.abstractmethod
    async def deliver(self, batch: list[Payload]) -> None:
        """Called with each mapped batch, in consumption order.

        May return before the payloads are sent (buffering destinations); it may block to apply
        backpressure. Raises `DeliveryError(retryable=True)` when the same batch can be retried
        later, `DeliveryError(retryable=False)` when it never can (the runner dead-letters it).
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Called before the runner commits offsets: returns once every payload handed to `deliver`
        so far is durably delivered or has been given to the dead-letter sink.

        Raising `DeliveryError` means some of them are neither; the runner does not commit and
        retries (retryable) or dead-letters the uncommitted batch (not retryable).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Called once at shutdown, after a final `flush()`: release connections and tasks.

        Errors here are logged only; nothing is lost because offsets were committed after flush.
        """

    def stats(self) -> dict[str, Any]:
        """Counters and states for `status()`; subclasses add their own (e.g. breaker state)."""
        return {}


DestinationFactory = Callable[["DestinationConfig", DestinationContext], Destination]

_KINDS: dict[str, DestinationFactory] = {}


def register_kind(kind: str, factory: DestinationFactory, settings: KindSettings | None = None) -> None:
    """Register a destination kind: its factory and how it reads its own keys of destinations.yaml (none
    when `settings` is None). One call in the kind's module is all a new kind needs; the built-in kinds
    (http.py, kafka_topic.py, files.py) register themselves on package import."""
    _KINDS[kind] = factory
    register_kind_settings(kind, settings or KindSettings())


def destination_kinds() -> list[str]:
    """The registered kind names, sorted."""
    return sorted(_KINDS)


def create_destination(config: DestinationConfig, context: DestinationContext) -> Destination:
    """Build the destination for `config.kind`; an unknown kind raises UnknownNameError."""
    factory = _KINDS.get(config.kind)
    if factory is None:
        raise UnknownNameError("destination kind", config.kind, list(_KINDS))
    return factory(config, context)
