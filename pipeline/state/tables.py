"""Partition-explicit access to the worker's Faust RocksDB tables, with changelogs on the one output producer.

Faust's table API routes a read or write by the *current event's* partition. The worker also handles
messages addressed to a local partition without a round trip through Kafka (`Runtime.local_delivery`), and
batches events of several partitions, so the stages address partitions explicitly through this view.

Every changelog write of a table, whichever API made it, goes through the worker's one librdkafka producer
(`route_changelog`): one producer per partition keeps the changelog in write order, which recovery relies on
(two producers could reorder two versions of one key).
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Callable, Iterator
from typing import Any

from faust.types import TP
from rocksdict import WriteOptions

from pipeline.state.faust_compat import (
    assignment_token,
    forget_key_partition,
    open_partitions,
    partition_store,
)
from pipeline.state.lru import BoundedCache

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=64)
def _words(n: int) -> Callable[[bytes], tuple[int, ...]]:
    return struct.Struct(f"<{n}I").unpack_from


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java `Utils.murmur2`, seed 0x9747b28c): the 4-byte words are unpacked in one call,
    about 3x faster than a byte-by-byte loop (new profile ids and identities miss the cache below)."""
    length = len(data)
    h = 0x9747B28C ^ length
    for k in _words(length >> 2)(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=262_144)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java murmur2; librdkafka `murmur2_random`) gives a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


_ABSENT = object()  # a cache miss (None is a cached "no such key")


class PartitionedTable:
    """One Faust table addressed by explicit partition. Reads and writes go straight to the partition's
    RocksDB store; writes also send the changelog record (the same record Faust would send).

    Reads are cached in memory (at most `cache_size` keys and `cache_bytes` bytes of values, oldest dropped
    first): a RocksDB point read costs ~7 us
    and an event reads 3-5 keys. The cache is write-through and holds only what this worker read or wrote
    while it held the partition, so it is dropped whenever that can stop being true: at each new assignment,
    and whenever the app is rebalancing or recovering tables (recovery writes the stores directly)."""

    def __init__(self, table: Any, partitions: int, cache_size: int = 0, cache_bytes: int = 64 << 20) -> None:
        self.table = table
        self.partitions = partitions
        self.changelog = table.changelog_topic.get_topic_name()
        self._assignment: Any = None
        self._active: frozenset[int] = frozenset()
        self._unlogged: dict[int, Any] = {}
        self.cache_size = cache_size
        self._cache: BoundedCache[tuple[int, bytes], bytes | None] = BoundedCache(cache_size, cache_bytes)
        self._cache_assignment: Any = None
        self._recovered: Any = None
        self._watches: dict[int, list[set[bytes]]] = {}

    @property
    def cache(self) -> BoundedCache[tuple[int, bytes], bytes | None]:
        return self._cache

    def partition(self, key: bytes) -> int:
        return partition_for(key, self.partitions)

    def active(self) -> frozenset[int]:
        """Partitions of this table actively assigned to this worker (recomputed after each rebalance)."""
        token = assignment_token(self.table.app)
        if token is not self._assignment:
            self._assignment = token
            self._active = frozenset(tp.partition for tp in self.table.app.assignor.assigned_actives()
                                     if tp.topic == self.changelog)
        return self._active

    def _cache_valid(self) -> bool:
        """Whether cached values can be trusted now; drops them when not, or when the assignment changed."""
        if not self.cache_size:
            return False
        app = self.table.app
        if self._recovered is None:  # the app's object, looked up once: this runs on every read
            self._recovered = app.tables.recovery.completed
        if app.rebalancing or not self._recovered.is_set():
            self._cache.clear()
            return False
        token = assignment_token(app)
        if token is not self._cache_assignment:
            self._cache.clear()
            self._cache_assignment = token
        return True

    def _remember(self, slot: tuple[int, bytes], value: bytes | None) -> None:
        self._cache.put(slot, value, len(slot[1]) + (len(value) if value is not None else 0))

    def store(self, partition: int) -> Any:
        """The partition's RocksDB, writing without a write-ahead log (as Kafka Streams does): the changelog
        is the log. A crash loses recent writes and the stored changelog offset together, so recovery
        replays the changelog from the older offset and the store stays consistent."""
        db = partition_store(self.table, partition)
        if self._unlogged.get(partition) is not db:
            options = WriteOptions()
            options.disable_wal = True  # type: ignore[method-assign, assignment]  # a bool property; the stub says method
            db.set_write_options(options)
            self._unlogged[partition] = db
        return db

    def release(self, partition: int) -> None:
        """Faust revoked the partition and is closing its store (`faust_compat.close_revoked_partitions`):
        forget the handle, which would otherwise keep the database open and its lock held, so the partition
        could not be reopened when it comes back. The next `store` call gets the reopened handle."""
        self._unlogged.pop(partition, None)

    def get(self, partition: int, key: bytes, remember: bool = True) -> bytes | None:
        """The stored value. `remember=False` for scans (batch runs): a value read from the store is not
        cached, so one walk over a partition does not push the hot keys out."""
        if not self._cache_valid():
            uncached: bytes | None = self.store(partition).get(key)
            return uncached
        slot = (partition, key)
        value = self._cache.get(slot, _ABSENT)
        if value is _ABSENT:
            value = self.store(partition).get(key)
            if remember:
                self._remember(slot, value)  # type: ignore[arg-type]
        return value  # type: ignore[return-value]

    def put(self, partition: int, key: bytes, value: bytes) -> None:
        """1. send the changelog record to the same partition (first: if the producer refuses it, too large,
        the store is left as it was); 2. write the store; 3. keep the cache in step."""
        # (Faust's key -> partition index is a cache for reads without an event; a miss scans the partitions)
        self.table.send_changelog(partition, key, value)
        self.store(partition).put(key, value)
        self._written(partition, key, value)

    def delete(self, partition: int, key: bytes) -> None:
        """1. delete from the store; 2. keep the cache in step; 3. send the tombstone to the same partition."""
        self.store(partition).delete(key)
        forget_key_partition(self.table, key)
        self._written(partition, key, None)
        self.table.send_changelog(partition, key, None)

    @contextlib.contextmanager
    def watch(self, partition: int) -> Iterator[set[bytes]]:
        """Within the block, the yielded set collects every key written to (or deleted from) the partition
        through this view: a walk that evaluates values read earlier knows which ones went stale."""
        keys: set[bytes] = set()
        self._watches.setdefault(partition, []).append(keys)
        try:
            yield keys
        finally:
            self._watches[partition].remove(keys)

    def _written(self, partition: int, key: bytes, value: bytes | None) -> None:
        for keys in self._watches.get(partition, ()):
            keys.add(key)
        if self._cache_valid():
            self._remember((partition, key), value)
        else:
            self._cache.pop((partition, key))


Produce = Callable[..., None]


class ChangelogRouter:
    """Sends every changelog record of the routed tables through `produce` (the output producer), and
    records, as Faust does, the last acknowledged changelog offset of each partition in that partition's
    store, so a restart on the same disk only replays the changelog from there."""

    def __init__(self, produce: Produce) -> None:
        self._produce = produce
        self._acked: dict[tuple[Any, int], int] = {}

    def route(self, table: Any) -> None:
        """Replace the table's `send_changelog`, which Faust's own `table[key] = v` / `del` also call."""
        topic = table.changelog_topic.get_topic_name()
        callbacks: dict[int, Callable[[Any, Any], None]] = {}

        def on_delivery_for(partition: int) -> Callable[[Any, Any], None]:
            """One callback per partition (the producer wraps each once per flush epoch)."""
            cb = callbacks.get(partition)
            if cb is None:
                slot = (table, partition)

                def cb(err: Any, msg: Any) -> None:
                    if err is None:
                        self._acked[slot] = max(msg.offset(), self._acked.get(slot, -1))
                callbacks[partition] = cb
            return cb

        def send_changelog(partition: int | None, key: bytes, value: bytes | None, *_: Any, **__: Any) -> None:
            if partition is None:
                raise ValueError(f"{topic}: changelog write without a partition")
            self._produce(topic, key, value, partition=partition, on_delivery=on_delivery_for(partition))

        table.send_changelog = send_changelog

    def persist_offsets(self) -> None:
        """Called after each flush of the producer (`OutputProducer.on_flushed`), by whichever commit asked
        for it: store the acknowledged offsets (open partitions only). With one worker the stage topics are
        nearly idle and Faust seldom commits, so the ingest loop's flushes are the ones that count."""
        acked, self._acked = self._acked, {}
        for (table, partition), offset in acked.items():
            if partition in open_partitions(table):
                table.data.set_persisted_offset(TP(table.changelog_topic.get_topic_name(), partition), offset)
