"""Tests of the decoded-profile cache: bounded by what growing profiles hold, not only by how many."""

from __future__ import annotations

from pipeline.model import ProfileState, StoredEvent
from pipeline.profiles.cache import DecodedCache
from pipeline.runtime import DECODED_PER_BYTE
from pipeline.state.codec import encode_profile


def profile(pid: str, events: int) -> tuple[bytes, ProfileState]:
    p = ProfileState(pid, 0, identities={"ECID": {pid: 1}}, events=[
        StoredEvent(f"{pid}-e{i}", "pageView", 1_800_000_000_000 + i, "web-events", {"url": "x" * 50})
        for i in range(events)])
    return encode_profile(p), p


def test_profiles_that_grow_are_dropped_oldest_first_to_stay_under_the_byte_budget() -> None:
    # Given a cache of 1,000 profiles but room for about 20 profiles of 100 events
    raw, _ = profile("p0", 100)
    cache = DecodedCache(1000, 20 * len(raw) * DECODED_PER_BYTE, DECODED_PER_BYTE)
    # When 1,000 such profiles are loaded, and the first of them is used again before the last few
    for i in range(1000):
        key = f"p{i}".encode()
        raw, p = profile(f"p{i}", 100)
        cache.put(key, raw, p)
        if i < 990:
            cache.load(b"p0", cache_raw(cache, b"p0"))
    # Then it holds at most its budget, and the profile used most recently is kept
    assert cache._d.nbytes <= cache._d.max_bytes and 15 <= len(cache._d) <= 20
    assert b"p0" in cache._d and b"p1" not in cache._d


def cache_raw(cache: DecodedCache, key: bytes) -> bytes | None:
    hit = cache._d.get(key, None)
    return None if hit is None else hit[0]


def test_a_changed_value_is_decoded_again() -> None:
    raw, p = profile("p1", 3)
    cache = DecodedCache(10, 1 << 20, DECODED_PER_BYTE)
    cache.put(b"p1", raw, p)
    assert cache.load(b"p1", raw) is p
    newer, _ = profile("p1", 4)
    loaded = cache.load(b"p1", newer)
    assert isinstance(loaded, ProfileState) and len(loaded.events) == 4 and loaded is not p
