"""The profile agent's cache of decoded profiles, valid while the stored bytes are the ones decoded."""

from __future__ import annotations

from pipeline.model import ProfileState
from pipeline.state.codec import Forward, decode_profile_entry
from pipeline.state.lru import BoundedCache


class DecodedCache:
    """Decoded profiles by id, valid only while the stored bytes are exactly the ones we decoded or wrote:
    comparing the bytes is far cheaper than decoding a profile with its event history, and it stays
    correct across rebalances (another worker's write changes the bytes). Bounded by count and by an
    estimate of the memory the decoded profiles hold (`per_byte` times their encoded size), most
    recently used kept: profiles grow with their event history, a count alone would not bound memory."""

    def __init__(self, size: int, max_bytes: int, per_byte: int) -> None:
        self._d: BoundedCache[bytes, tuple[bytes, ProfileState]] = BoundedCache(size, max_bytes)
        self._per_byte = per_byte  # pipeline.runtime.DECODED_PER_BYTE, with the worker's memory budget

    @property
    def entries(self) -> BoundedCache[bytes, tuple[bytes, ProfileState]]:
        return self._d

    def load(self, key: bytes, raw: bytes | None) -> ProfileState | Forward | None:
        if raw is None:
            return None
        hit = self._d.get(key, None)
        if hit is not None and hit[0] == raw:
            self._d.touch(key)
            return hit[1]
        entry = decode_profile_entry(raw)
        if isinstance(entry, ProfileState):
            self.put(key, raw, entry)
        return entry

    def put(self, key: bytes, raw: bytes, profile: ProfileState) -> None:
        self._d.put(key, (raw, profile), len(raw) * self._per_byte)

    def drop(self, key: bytes) -> None:
        self._d.pop(key)
