"""Read the tables' state straight from their compacted changelog topics (every partition, any worker).

Used by tests and operators to check the identity graph as a whole: identity -> profile id, and
profile id -> live profile or forward, with forwards followed to the surviving profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.connection import Kafka
from pipeline.kafka_reads import read_to_end
from pipeline.model import ProfileState
from pipeline.state.codec import Forward, decode_profile_entry
from pipeline.topics import IDENTITY_CHANGELOG, PROFILES_CHANGELOG, TopicRegistry


def read_changelog(reg: TopicRegistry, kafka: Kafka, logical: str, timeout_s: float = 30) -> dict[bytes, bytes]:
    """The latest value per key of a changelog topic (tombstoned keys left out), read up to its end."""
    return {k: v for k, v in read_to_end(kafka, reg.name(logical), timeout_s=timeout_s).items() if v is not None}


@dataclass
class GraphSnapshot:
    identities: dict[str, str]  # identity key -> profile id (as stored; may be a forwarded id)
    profiles: dict[str, ProfileState]  # live profiles
    forwards: dict[str, str]  # merged-away id -> into

    def resolve(self, pid: str) -> str:
        seen = 0
        while pid in self.forwards and seen < 64:
            pid = self.forwards[pid]
            seen += 1
        return pid

    def owner(self, identity_key: str) -> str | None:
        pid = self.identities.get(identity_key)
        return self.resolve(pid) if pid else None


def snapshot(reg: TopicRegistry, kafka: Kafka) -> GraphSnapshot:
    ids = {k.decode(): v.decode() for k, v in read_changelog(reg, kafka, IDENTITY_CHANGELOG).items()}
    profiles: dict[str, ProfileState] = {}
    forwards: dict[str, str] = {}
    for k, v in read_changelog(reg, kafka, PROFILES_CHANGELOG).items():
        if k.startswith(b"__"):  # per-partition metadata, not a profile
            continue
        entry = decode_profile_entry(v)
        if isinstance(entry, Forward):
            forwards[k.decode()] = entry.into
        else:
            profiles[k.decode()] = entry
    return GraphSnapshot(ids, profiles, forwards)
