"""Pure ingest logic: Avro bytes -> ExperienceEvent / ProfileRecord, or a Rejected verdict with a reason.

Identities come from the record's identityMap and from fields whose schema declares `"identity":
{"namespace": ...}` (configuring identities is a schema edit). Payload records are flattened to dotted paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import SerdeError
from pipeline.identity.datasets import DatasetsConfig
from pipeline.identity.namespaces import (
    UNKNOWN_NAMESPACE_LABEL,
    Dropped,
    IdentityConfig,
    normalise_identities_detailed,
)
from pipeline.model import ExperienceEvent, Identity, IngestRecord, ProfileRecord, Scalar
from pipeline.serde.avro import AvroCodec

RecordKind = Literal["event", "profile"]

# A record further in the future than this is a clock or unit bug at the producer (seconds vs ms...):
# accepting it would evict the profile's real history (retention counts back from the newest event).
MAX_FUTURE_MS = 24 * 3600_000

# Top-level fields that are envelope, not payload.
_ENVELOPE = {"eventId", "recordId", "timestamp", "eventType", "dataset", "identityMap", "fields", "attributes"}


@dataclass(frozen=True)
class Rejected:
    """A record that goes to the dead-letter topic: `reason` is a short code, `detail` has no personal data."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Skipped:
    """A valid record kept out of profiles by configuration (dataset not enabled for profile)."""

    reason: str
    dataset: str


def identity_fields(schema: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Top-level fields annotated as identities: field name -> (namespace, primary)."""
    out: dict[str, tuple[str, bool]] = {}
    for f in schema.get("fields", []):
        ann = f.get("identity")
        if isinstance(ann, dict) and "namespace" in ann:
            out[f["name"]] = (str(ann["namespace"]), bool(ann.get("primary", False)))
    return out


def raw_identities(raw: Mapping[str, Any], annotated: Mapping[str, tuple[str, bool]]
                   ) -> tuple[list[tuple[str, str]], str | None]:
    """A record's raw (namespace, value) pairs, from its identityMap then its annotated fields (see
    `identity_fields`), and the namespace flagged primary, if any. Not normalised: `normalise_identities`
    does that. The ingest decoder and the producer's record keys (`ingest.keys`) both read identities here."""
    pairs: list[tuple[str, str]] = []
    primary_ns: str | None = None
    for ns, items in (raw.get("identityMap") or {}).items():
        for item in items or ():
            if item.get("id"):
                pairs.append((ns, str(item["id"])))
                if item.get("primary"):
                    primary_ns = ns
    for fname, (ns, is_primary) in annotated.items():
        v = raw.get(fname)
        if v:
            pairs.append((ns, str(v)))
            if is_primary and primary_ns is None:
                primary_ns = ns
    return pairs, primary_ns


def flatten(value: Any, prefix: str, out: dict[str, Scalar]) -> None:
    """Nested records -> dotted paths; nulls are 'not provided' and left out."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}.{k}" if prefix else k, out)
    elif value is not None and not isinstance(value, list):
        out[prefix] = value


@dataclass
class Decoder:
    """Decodes one ingest topic's records; built once per worker from the codec and the configuration.

    `on_drop` is told the identities left out of each record that goes on (or is dead-lettered for having
    no usable identity left): the worker counts and logs them (`ingest.agents`)."""

    kind: RecordKind
    codec: AvroCodec
    identity: IdentityConfig
    datasets: DatasetsConfig
    on_drop: Callable[[list[Dropped]], None] | None = None
    # identities erased with `suppress` (pipeline.privacy): dropped, never stored
    suppressed: Callable[[Identity], bool] | None = None

    def __post_init__(self) -> None:
        self._annotated = identity_fields(self.codec.catalog.raw_schema(self.codec.name))
        default = self.datasets.limits.max_identity_length
        self._max_length = {ns: self.identity.max_lengths.get(ns, default) for ns in self.identity.namespaces}

    def decode(self, data: bytes | None, now_ms: int | None = None) -> IngestRecord | Rejected | Skipped:
        """0. check the size; 1. Avro-decode; 2. check timestamp and dataset; 3. collect and normalise
        identities (each within the length limit, at most the per-record limit); 4. build."""
        limits = self.datasets.limits
        if data is None:
            return Rejected("null-value", "the record has no value (a tombstone?)")
        if len(data) > limits.max_record_bytes:
            return Rejected("record-too-large", f"{len(data)} bytes; limits.max_record_bytes is "
                            f"{limits.max_record_bytes}")
        try:
            raw = self.codec.decode(data)
        except SerdeError as exc:
            return Rejected(exc.reason, exc.detail)
        ts = int(raw["timestamp"])
        if now_ms is not None and not 0 < ts <= now_ms + MAX_FUTURE_MS:
            return Rejected("timestamp-out-of-range", f"timestamp {ts} is not between 1970 and now + 24h (ms expected)")
        dataset = str(raw.get("dataset") or "")
        if dataset not in self.datasets.datasets:
            return Rejected("unknown-dataset", f"dataset {dataset[:64]!r} is not configured; valid: "
                            + ", ".join(sorted(self.datasets.datasets)))
        if not self.datasets.profile_enabled(dataset):
            return Skipped("dataset-not-enabled-for-profile", dataset)
        pairs, primary_raw = raw_identities(raw, self._annotated)
        verdict = self._identities(pairs)
        if isinstance(verdict, Rejected):
            return verdict
        identities, dropped = verdict
        if dropped and self.on_drop is not None:
            self.on_drop(dropped)
        if not identities:
            if any(d.reason == "suppressed" for d in dropped):  # not dead-lettered: its bytes hold the identity
                return Skipped("suppressed-identity", dataset)
            why = "; ".join(d.detail for d in dropped) if dropped else "the record carries no identity"
            return Rejected("no-usable-identity", why)
        clash = _unique_clash(identities, self.identity)
        if clash:
            return Rejected("conflicting-unique-identities",
                            f"the record carries several {clash} ids; {clash} is unique: a record names one person")
        primary = _primary(identities, primary_raw, self.identity)
        payload: dict[str, Scalar] = {}
        for k, v in raw.items():
            if k not in _ENVELOPE and k not in self._annotated:
                flatten(v, k, payload)
        custom = raw.get("fields" if self.kind == "event" else "attributes") or {}
        payload.update({str(k): v for k, v in custom.items()})
        if self.kind == "event":
            return ExperienceEvent(str(raw["eventId"]), ts, str(raw["eventType"]), dataset, tuple(identities),
                                   primary, payload)
        return ProfileRecord(str(raw["recordId"]), ts, dataset, tuple(identities), primary, payload)


    def _identities(self, pairs: list[tuple[str, str]]) -> tuple[list[Identity], list[Dropped]] | Rejected:
        """The record's identities and those left out, or its rejection, under the identity rules (each
        dead-letters the record or drops the identity, as identity.yaml's hygiene.on_violation says):
        length (per namespace `max_length`, else limits.max_identity_length: checked on the raw value, before
        any parsing), blocked placeholder values, then the count (limits.max_identities_per_record)."""
        cfg, limits = self.identity, self.datasets.limits
        dropped: list[Dropped] = []
        max_length, default = self._max_length, limits.max_identity_length
        if any(len(value) > max_length.get(ns, default) for ns, value in pairs):
            kept: list[tuple[str, str]] = []
            for ns, value in pairs:
                limit = max_length.get(ns, default)
                if len(value) <= limit:
                    kept.append((ns, value))
                    continue
                label = ns if ns in cfg.namespaces else UNKNOWN_NAMESPACE_LABEL
                what = (f"{label} max_length ({limit})" if ns in cfg.max_lengths
                        else f"limits.max_identity_length ({limit})")
                if cfg.on_violation("too_long") == "dead-letter":
                    return Rejected("identity-too-long", f"a {label} value longer than {what}")
                dropped.append(Dropped(label, "too-long", f"a {label} value longer than {what}"))
            pairs = kept
        identities, left_out = normalise_identities_detailed(pairs, cfg)
        if left_out and cfg.on_violation("blocked_value") == "dead-letter":
            blocked = next((d for d in left_out if d.reason == "blocked-value"), None)
            if blocked is not None:
                return Rejected("blocked-identity-value", f"a {blocked.namespace} value is a placeholder on "
                                "the blocked_values list (hygiene.on_violation.blocked_value: dead-letter)")
        dropped += left_out
        if self.suppressed is not None:
            gone = [i for i in identities if self.suppressed(i)]
            if gone:  # with what they derive (the e-mail's hash): they stand for the same person
                gone += [d for g in gone for d in normalise_identities_detailed([(g.namespace, g.id)], cfg)[0]
                         if d in identities and d not in gone]
                identities = [i for i in identities if i not in gone]
                dropped += [Dropped(i.namespace, "suppressed", f"a {i.namespace} identity erased with suppress")
                            for i in gone]
        cap = limits.max_identities_per_record
        if len(identities) > cap:
            if cfg.on_violation("too_many") == "dead-letter":
                return Rejected("too-many-identities", f"{len(identities)} identities; "
                                f"limits.max_identities_per_record is {cap}")
            # the highest-priority ones stay (normalise_identities_detailed orders them)
            dropped += [Dropped(i.namespace, "too-many-identities",
                                f"a {i.namespace} identity over limits.max_identities_per_record ({cap})")
                        for i in identities[cap:]]
            identities = identities[:cap]
        return identities, dropped


def _unique_clash(identities: Iterable[Identity], cfg: IdentityConfig) -> str | None:
    """The first unique namespace (e.g. CRMID) in which the record carries two different ids, if any."""
    seen: dict[str, str] = {}
    for i in identities:
        if i.namespace in cfg.unique_namespaces and seen.setdefault(i.namespace, i.id) != i.id:
            return i.namespace
    return None


def _primary(identities: Iterable[Identity], primary_ns: str | None, cfg: IdentityConfig) -> Identity:
    ids = list(identities)
    if primary_ns is not None:
        for i in ids:
            if i.namespace == primary_ns:
                return i
    return ids[0]  # highest priority (normalise_identities orders them)
