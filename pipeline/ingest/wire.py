"""Compact wire form of decoded ingest records for internal topics (msgpack-able dicts)."""

from __future__ import annotations

from typing import Any

from pipeline.model import ExperienceEvent, Identity, IngestRecord, ProfileRecord


def record_to_wire(rec: IngestRecord) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": rec.timestamp_ms,
        "ds": rec.dataset,
        "ids": [[i.namespace, i.id] for i in rec.identities],
        "pri": [rec.primary.namespace, rec.primary.id] if rec.primary else None,
    }
    if isinstance(rec, ExperienceEvent):
        base.update(k="e", id=rec.event_id, t=rec.event_type, f=rec.fields)
    else:
        base.update(k="p", id=rec.record_id, f=rec.attributes)
    return base


def record_from_wire(w: dict[str, Any]) -> IngestRecord:
    ids = tuple(Identity(ns, i) for ns, i in w["ids"])
    pri = Identity(*w["pri"]) if w.get("pri") else None
    if w["k"] == "e":
        return ExperienceEvent(w["id"], w["ts"], w["t"], w["ds"], ids, pri, dict(w["f"]))
    return ProfileRecord(w["id"], w["ts"], w["ds"], ids, pri, dict(w["f"]))


def wire_identity_keys(w: dict[str, Any]) -> list[str]:
    return [f"{ns}:{i}" for ns, i in w["ids"]]
