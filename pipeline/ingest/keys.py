"""Producer-side record keys: the Kafka key a producer gives an ingest record (`pipeline produce --key`).

Kafka orders records only within a partition, and the key picks the partition. Keyed by the person's
home identity (the id of a unique namespace such as CRMID if the record has one, else its highest-priority
identity: what the pipeline routes a record by), one person's records stay in one partition, in order. Identities are read and
normalised exactly as the ingest decoder does (`decode.raw_identities`, `normalise_identities`), so the key
is the identity-table key (`Identity.key`, "<namespace>:<normalised id>") of the record's first identity.

A key holds an identity value (personal data): it goes on the wire, never into logs or output. `KeyChoice.
source` says how a key was chosen without its value, for summaries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.errors import ConfigError
from pipeline.identity.namespaces import IdentityConfig, normalise_identities
from pipeline.identity.stitch import home_key
from pipeline.ingest.decode import identity_fields, raw_identities
from pipeline.model import Identity
from pipeline.serde.avro import AvroCodec
from pipeline.serde.codecs import Codec

KEY_FORMS = ("identity", "identity:NAMESPACE", "field:NAME", "none")
KeyMode = Literal["identity", "field", "none"]

# The record's own id, in the order producers used to key by (the key when a record has no usable identity).
RECORD_ID_FIELDS = ("eventId", "recordId", "profile_id")
NO_IDENTITY = "record id (no usable identity)"


@dataclass(frozen=True)
class KeySpec:
    """How to key records: `identity` (optionally preferring namespace `name`), `field` `name`, or `none`."""

    mode: KeyMode
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """`identity`, `identity:NAMESPACE`, `field:NAME` or `none`; ValueError lists the valid forms."""
        kind, sep, name = text.partition(":")
        if not sep and kind in ("identity", "none"):
            return cls(kind)  # type: ignore[arg-type]
        if sep and kind in ("identity", "field") and name.strip() == name and name:
            return cls(kind, name)  # type: ignore[arg-type]
        raise ValueError(f"unknown key form {text[:64]!r}; valid: {', '.join(KEY_FORMS)}")

    def __str__(self) -> str:
        return self.mode if self.name is None else f"{self.mode}:{self.name}"


@dataclass(frozen=True)
class KeyChoice:
    """A record's key (None: no key) and how it was chosen, without the value (safe to count and print)."""

    key: str | None
    source: str


def record_id(value: Mapping[str, Any]) -> str | None:
    """The record's own id (eventId, recordId or profile_id), if it has one."""
    for name in RECORD_ID_FIELDS:
        v = value.get(name)
        if v is not None and v != "":
            return str(v)
    return None


def _field_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))


def choose_key(value: Any, spec: KeySpec, identity: IdentityConfig | None = None,
               annotated: Mapping[str, tuple[str, bool]] | None = None) -> KeyChoice:
    """The key of one record (a JSON object as it will be encoded) under `spec`.

    `identity` modes need the identity configuration and the topic schema's annotated identity fields
    (`decode.identity_fields`). A record without a usable identity is keyed by its own id.
    """
    if spec.mode == "none":
        return KeyChoice(None, "none")
    if not isinstance(value, Mapping):
        return KeyChoice(None, "no key (not a JSON object)")
    if spec.mode == "field":
        assert spec.name is not None
        v = value.get(spec.name)
        if v is None:
            return KeyChoice(None, f"no key (no field {spec.name})")
        return KeyChoice(_field_text(v), f"field {spec.name}")
    if identity is None:
        raise ValueError("keying by identity needs the identity configuration")
    pairs, _primary = raw_identities(value, annotated or {})
    identities, _problems = normalise_identities(pairs, identity)  # highest priority first, as ingest orders
    if not identities:
        return KeyChoice(record_id(value), NO_IDENTITY)
    if spec.name is not None:
        for i in identities:
            if i.namespace == spec.name:
                return KeyChoice(i.key, f"identity {i.namespace}")
    # the record's home identity, the one the pipeline routes it by (a unique namespace's id first)
    first = Identity.from_key(home_key([i.key for i in identities], identity.unique_namespaces))
    fallback = f" (no {spec.name})" if spec.name is not None else ""
    return KeyChoice(first.key, f"identity {first.namespace}{fallback}")


@dataclass(frozen=True)
class RecordKeyer:
    """`choose_key` bound to a spec, the identity configuration and one topic's annotated identity fields."""

    spec: KeySpec
    identity: IdentityConfig | None = None
    annotated: Mapping[str, tuple[str, bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spec.mode != "identity":
            return
        if self.identity is None:
            raise ConfigError(f"--key {self.spec} needs the identity configuration (identity.yaml)")
        name = self.spec.name
        if name is not None and name not in self.identity.namespaces:
            raise ConfigError(f"--key {self.spec}: unknown namespace {name[:64]!r}; valid: "
                              f"{', '.join(sorted(self.identity.namespaces))}", file=self.identity.source)

    @classmethod
    def for_codec(cls, spec: KeySpec, codec: Codec, identity: IdentityConfig | None) -> RecordKeyer:
        """A keyer for a topic with this codec: an Avro schema's annotated fields are identities too."""
        annotated = identity_fields(codec.catalog.raw_schema(codec.name)) if isinstance(codec, AvroCodec) else {}
        return cls(spec, identity, annotated)

    def __call__(self, value: Any) -> KeyChoice:
        return choose_key(value, self.spec, self.identity, self.annotated)
