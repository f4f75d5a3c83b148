"""The worker's part of erasure: follow `control.erasure` (statuses, the suppression list) and verify that this
worker's stores keep no trace of an erased person."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.privacy.erasure import Verification, scan
from pipeline.profiles.walk import META_PREFIX
from pipeline.runtime import Runtime
from pipeline.state.codec import Forward, decode_profile_entry
from pipeline.state.tables import PartitionedTable


def register(rt: Runtime) -> None:
    erasures = rt.erasure_log
    assert erasures is not None

    @rt.app.task
    async def follow_erasures() -> None:
        erasures.follow(rt.registry, rt.settings.kafka, error_cb=rt.kafka.error_cb if rt.kafka else None)

    rt.app.on_before_shutdown.connect(lambda *_a, **_k: erasures.stop())


def profile_tokens(raw: bytes) -> dict[str, Any]:
    """The ids a stored profile-table value names: its identities and absorbed ids, or a forward's target
    and the identities it repointed."""
    entry = decode_profile_entry(raw)
    if isinstance(entry, Forward):
        return {"into": entry.into, "ids": list(entry.repointed)}
    return {"profile_id": entry.profile_id,
            "identities": {ns: list(ids) for ns, ids in entry.identities.items()},
            # (the identity sources' keys are identities too: one left behind would be found)
            "ids": [*entry.absorbed_ids(), *entry.claims, *entry.identity_sources]}


def _rows(table: PartitionedTable, partition: int, profiles: bool) -> Iterator[tuple[bytes, Any, bytes | None]]:
    for key, raw in table.store(partition).items():
        if key.startswith(META_PREFIX):
            continue
        if raw is None:
            yield key, None, None
        elif profiles:
            yield key, profile_tokens(raw), raw
        else:
            yield key, raw.decode(errors="replace"), raw


def verify_stores(rt: Runtime, request: str, wanted: set[str]) -> Verification:
    """Scan every local partition of the identity and profile tables (RocksDB) for the request's hashes."""
    assert rt.erasure_log is not None
    v = Verification(request)
    for name in ("identity", "profiles"):
        table = rt.ptables[name]
        for partition in sorted(table.active()):
            scan(v, f"store {name}[{partition}]", _rows(table, partition, name == "profiles"), wanted,
                 rt.erasure_log.salt)
    return v
