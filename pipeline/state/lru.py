"""An in-memory cache bounded by its number of entries and by the bytes they hold, oldest dropped first."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")
ENTRY_OVERHEAD = 100  # bytes a cached entry costs beyond its value (dict slot, key, tuple)


class BoundedCache(Generic[K, V]):
    """Entries in insertion order (or use order, with `touch`); `put` drops the oldest while there are more
    than `max_entries` or their sizes add up to more than `max_bytes`. The caller gives each entry's size:
    what it keeps alive (a decoded profile is several times its encoded bytes)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._d: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[K]:
        """The keys, oldest first."""
        return iter(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def get(self, key: K, default: D) -> V | D:
        hit = self._d.get(key)
        return default if hit is None else hit[0]

    def touch(self, key: K) -> None:
        """Mark an entry as just used: it is dropped last."""
        self._d.move_to_end(key)

    def put(self, key: K, value: V, size: int) -> None:
        self.pop(key)
        self._d[key] = (value, size + ENTRY_OVERHEAD)
        self.nbytes += size + ENTRY_OVERHEAD
        while self._d and (len(self._d) > self.max_entries or self.nbytes > self.max_bytes):
            self.nbytes -= self._d.popitem(last=False)[1][1]

    def pop(self, key: K) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]

    def clear(self) -> None:
        self._d.clear()
        self.nbytes = 0
