"""Ingest agents: decode each ingest topic's records and start stitching, or dead-letter them."""

from __future__ import annotations

from typing import Any

from pipeline.identity.stitch import Send, fast_apply, start_resolve
from pipeline.ingest.decode import Decoder, Rejected, Skipped
from pipeline.ingest.wire import record_to_wire, wire_identity_keys
from pipeline.observability import metrics
from pipeline.runtime import Runtime
from pipeline.serde.avro import AvroCodec


def dlq_headers(reason: str, detail: str, topic: str, partition: int, offset: int) -> dict[str, bytes]:
    return {"reason": reason.encode(), "detail": detail[:1000].encode(), "source_topic": topic.encode(),
            "source_partition": str(partition).encode(), "source_offset": str(offset).encode()}


def register(rt: Runtime) -> None:
    for logical, kind in (("ingest.events", "event"), ("ingest.profiles", "profile")):
        spec = rt.registry[logical]
        assert isinstance(spec.codec, AvroCodec)
        decoder = Decoder(kind, spec.codec, rt.config.profile.identity, rt.config.profile.datasets)  # type: ignore[arg-type]
        _ingest_agent(rt, logical, decoder)


BATCH_MAX = 500
BATCH_WITHIN_S = 0.01


def _ingest_agent(rt: Runtime, logical: str, decoder: Decoder) -> None:
    identities = rt.ptables["identity"]

    def local_owners(wire: dict[str, Any]) -> dict[str, str] | None:
        """Owners of all the record's identities if this worker holds them all, else None."""
        owners: dict[str, str] = {}
        active = identities.active()
        for key in wire_identity_keys(wire):
            kb = key.encode()
            p = identities.partition(kb)
            value = identities.get(p, kb) if p in active else None
            if value is None:
                return None
            owners[key] = value.decode()
        return owners

    def handle(event: Any) -> None:
        msg = event.message
        verdict = decoder.decode(event.value, rt.now_ms())
        if isinstance(verdict, Rejected):  # the error path: original bytes, reason, source in headers
            metrics.RECORDS_DEAD_LETTERED.labels(logical, verdict.reason).inc()
            rt.send(Send("ingest.dlq", (event.key or b"").decode(errors="replace"), event.value),
                    headers=dlq_headers(verdict.reason, verdict.detail, msg.topic, msg.partition, msg.offset))
        elif isinstance(verdict, Skipped):
            metrics.RECORDS_SKIPPED.labels(verdict.dataset, verdict.reason).inc()
        else:
            rt.tally.add(metrics.RECORDS_INGESTED, logical)
            wire = record_to_wire(verdict)
            owners = local_owners(wire)
            rt.send(fast_apply(wire, owners) if owners else start_resolve(wire, rt.now_ms()))

    async def ingest(stream: Any) -> None:
        """Batches of records; what they send to stage partitions this worker holds is handled in-process."""
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            with rt.local_delivery():
                for event in events:
                    handle(event)

    ingest.__name__ = f"ingest_{logical.replace('.', '_')}"
    rt.app.agent(rt.topic(logical), name=f"ingest-{logical}")(ingest)
