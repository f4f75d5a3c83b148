"""Verification over Kafka: the latest value of every key of every compacted topic (what a worker or a backfill
rebuilds state from) searched for an erasure's hashes and for plain-text values an operator gives."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.connection import Kafka
from pipeline.errors import PipelineError
from pipeline.kafka_reads import read_to_end
from pipeline.privacy.agents import profile_tokens
from pipeline.privacy.erasure import ERASURE_TOPIC, Verification, scan
from pipeline.profiles.walk import META_PREFIX
from pipeline.serde.codecs import RawCodec
from pipeline.topics import PROFILES_CHANGELOG, TopicRegistry


def find_request(reg: TopicRegistry, kafka: Kafka, request: str) -> dict[str, Any] | None:
    """A request's latest status record on control.erasure."""
    spec = reg[ERASURE_TOPIC]
    raw = read_to_end(kafka, spec.name).get(request.encode())
    return spec.codec.decode(raw) if raw is not None else None


def _decoded(reg: TopicRegistry, logical: str, rows: dict[bytes, bytes | None], tombstones: list[int]
             ) -> Iterator[tuple[bytes, Any, bytes | None]]:
    codec = reg[logical].codec
    for key, raw in rows.items():
        if raw is None:  # removed: the key itself goes when compaction drops the tombstone
            tombstones[0] += 1
            continue
        if logical == PROFILES_CHANGELOG and not key.startswith(META_PREFIX):  # meta keys hold no profile
            value: Any = profile_tokens(raw)
        elif isinstance(codec, RawCodec):
            value = raw.decode(errors="replace")
        else:
            value = codec.decode(raw)
        yield key, value, raw


def verify_topics(reg: TopicRegistry, kafka: Kafka, salt: bytes, request: str, plain: Iterable[str] = ()
                  ) -> Verification:
    """Scan every compacted topic of topics.yaml for the request's subject and traces (and `plain` values)."""
    record = find_request(reg, kafka, request)
    if record is None:
        raise PipelineError(f"no erasure request {request!r} on {reg.name(ERASURE_TOPIC)}")
    wanted = {record["subject"], *record.get("traces", ())}
    v = Verification(request)
    needles = [p.encode() for p in plain if p]
    for spec in reg:
        if "compact" not in spec.cleanup_policy:
            continue
        tombstones = [0]
        rows = read_to_end(kafka, spec.name)
        scan(v, f"topic {spec.logical}", _decoded(reg, spec.logical, rows, tombstones), wanted, salt, needles)
        if tombstones[0]:
            v.scanned[f"topic {spec.logical} tombstones"] = tombstones[0]
    return v
