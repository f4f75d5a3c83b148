"""Partition-explicit table access: the partitioner agrees with Kafka's; changelog offsets are recorded
per partition once acknowledged; writes go to the right store and changelog partition."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference_murmur2
from hypothesis import given
from hypothesis import strategies as st

from pipeline.state.lru import ENTRY_OVERHEAD
from pipeline.state.tables import ChangelogRouter, PartitionedTable, murmur2, partition_for


@given(st.binary(max_size=80))
def test_murmur2_matches_the_reference_implementation(data: bytes) -> None:
    # every length modulo 4 (the tail bytes) and the empty key
    assert murmur2(data) == reference_murmur2(data)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_partition_for_matches_the_kafka_default_partitioner(key: bytes, n: int) -> None:
    # Faust (aiokafka) and librdkafka's murmur2_random place keyed messages with this function: a message
    # handled in-process must land on the partition the same message would have been produced to
    assert partition_for(key, n) == DefaultPartitioner()(key, list(range(n)), list(range(n)))


class FakeDB(dict[bytes, bytes]):
    write_options: Any = None

    def set_write_options(self, options: Any) -> None:
        self.write_options = options

    def put(self, key: bytes, value: bytes) -> None:
        self[key] = value

    def delete(self, key: bytes) -> None:
        self.pop(key, None)


class FakeStore:
    def __init__(self) -> None:
        self._dbs: dict[int, FakeDB] = {}
        self._key_index: dict[bytes, int] = {}
        self.persisted: dict[Any, int] = {}

    def _db_for_partition(self, partition: int) -> FakeDB:
        return self._dbs.setdefault(partition, FakeDB())

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.persisted[(tp.topic, tp.partition)] = offset


class FakeTopic:
    def get_topic_name(self) -> str:
        return "p-cdp.state.t-changelog"


class FakeTable:
    def __init__(self) -> None:
        self.data = FakeStore()
        self.changelog_topic = FakeTopic()
        self.app = None


class FakeMsg:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        return self._offset


def make_routed() -> tuple[FakeTable, PartitionedTable, ChangelogRouter, list[dict[str, Any]]]:
    produced: list[dict[str, Any]] = []

    def produce(topic: str, key: bytes, value: bytes | None, *, partition: int, on_delivery: Any) -> None:
        produced.append({"topic": topic, "key": key, "value": value, "partition": partition,
                         "on_delivery": on_delivery})

    table = FakeTable()
    router = ChangelogRouter(produce)
    router.route(table)
    return table, PartitionedTable(table, 4), router, produced


def test_writes_go_to_the_named_partition_and_its_changelog_partition() -> None:
    # Given a routed table
    table, view, _, produced = make_routed()
    # When a key is written to partition 2, then deleted
    view.put(2, b"k", b"v1")
    assert view.get(2, b"k") == b"v1" and view.get(1, b"k") is None
    view.delete(2, b"k")
    # Then the store and the changelog saw both, on partition 2, the delete as a tombstone; the store is
    # written without a write-ahead log (the changelog is the log)
    assert view.get(2, b"k") is None
    assert table.data._dbs[2].write_options.disable_wal is True
    assert [(m["topic"], m["key"], m["value"], m["partition"]) for m in produced] == [
        ("p-cdp.state.t-changelog", b"k", b"v1", 2), ("p-cdp.state.t-changelog", b"k", None, 2)]


def test_a_watch_collects_the_keys_written_to_its_partition_while_it_is_open() -> None:
    # Given a routed table with a value written before the watch
    _, view, _, _ = make_routed()
    view.put(1, b"before", b"0")
    # When keys are written and deleted on partitions 1 and 2 while partition 1 is watched (twice, nested)
    with view.watch(1) as outer:
        view.put(1, b"a", b"1")
        with view.watch(1) as inner:
            view.delete(1, b"before")
            view.put(2, b"other", b"2")
        view.put(1, b"a", b"3")
    view.put(1, b"after", b"4")
    # Then each watch holds exactly the partition-1 keys written while it was open
    assert outer == {b"a", b"before"}
    assert inner == {b"before"}


def test_acknowledged_changelog_offsets_are_persisted_per_open_partition_after_flush() -> None:
    # Given writes on partitions 0 and 3, and partition 3 revoked (its store closed) before the flush
    table, view, router, produced = make_routed()
    view.put(0, b"a", b"1")
    view.put(0, b"b", b"2")
    view.put(3, b"c", b"3")
    del table.data._dbs[3]
    # When the deliveries are acknowledged (out of order) and the producer flush completes
    produced[1]["on_delivery"](None, FakeMsg(11))
    produced[0]["on_delivery"](None, FakeMsg(10))
    produced[2]["on_delivery"](None, FakeMsg(7))
    assert table.data.persisted == {}  # nothing is recorded before the flush
    router.persist_offsets()
    # Then the highest acknowledged offset of each open partition is stored; a failed delivery records nothing
    assert table.data.persisted == {("p-cdp.state.t-changelog", 0): 11}
    view.put(0, b"d", b"4")
    produced[3]["on_delivery"]("broker down", FakeMsg(-1))
    router.persist_offsets()
    assert table.data.persisted == {("p-cdp.state.t-changelog", 0): 11}


class CountingDB(FakeDB):
    reads = 0

    def get(self, key: bytes, default: Any = None) -> Any:  # type: ignore[override]
        CountingDB.reads += 1
        return super().get(key, default)


class FakeRecovery:
    def __init__(self) -> None:
        self.completed = asyncio.Event()
        self.completed.set()


class FakeAssignor:
    def __init__(self) -> None:
        self._assignment = object()


class FakeApp:
    def __init__(self) -> None:
        self.rebalancing = False
        self.assignor = FakeAssignor()
        self.tables = type("Tables", (), {"recovery": FakeRecovery()})()


def make_cached(size: int = 3, nbytes: int = 1 << 20) -> tuple[FakeTable, PartitionedTable, FakeApp]:
    table = FakeTable()
    app = FakeApp()
    table.app = app  # type: ignore[assignment]
    table.data._dbs = {p: CountingDB() for p in range(4)}
    table.send_changelog = lambda *a, **k: None  # type: ignore[attr-defined]
    CountingDB.reads = 0
    return table, PartitionedTable(table, 4, cache_size=size, cache_bytes=nbytes), app


def test_reads_are_served_from_memory_after_a_read_or_a_write() -> None:
    # Given a cached table with one stored key
    table, view, _ = make_cached()
    table.data._dbs[1][b"a"] = b"1"
    # When the key is read twice, a missing key twice, and a written key once
    assert [view.get(1, b"a"), view.get(1, b"a"), view.get(1, b"x"), view.get(1, b"x")] == [b"1", b"1", None, None]
    view.put(2, b"b", b"2")
    assert view.get(2, b"b") == b"2"
    view.delete(2, b"b")
    assert view.get(2, b"b") is None
    # Then the store was read once per key never seen before, and no more
    assert CountingDB.reads == 2


def test_the_cache_keeps_at_most_its_size_dropping_the_oldest() -> None:
    table, view, _ = make_cached(size=3)
    for k in (b"a", b"b", b"c", b"d"):
        view.put(0, k, k)
    assert list(view._cache) == [(0, b"b"), (0, b"c"), (0, b"d")]
    assert view.get(0, b"a") == b"a" and CountingDB.reads == 1  # dropped from memory, read from the store


def test_the_cache_keeps_at_most_its_bytes_dropping_the_oldest() -> None:
    # Given a cache of 1,000 keys but 3,000 bytes (an entry costs its key, its value and ENTRY_OVERHEAD)
    table, view, _ = make_cached(size=1000, nbytes=3000)
    # When five values of 900 bytes are written, and a missing key is read
    for k in (b"a", b"b", b"c", b"d", b"e"):
        view.put(0, k, k * 900)
    assert view.get(0, b"none") is None
    # Then the newest values that fit are kept
    assert list(view._cache) == [(0, b"d"), (0, b"e"), (0, b"none")]
    assert view._cache.nbytes == 2 * (1 + 900 + ENTRY_OVERHEAD) + 4 + ENTRY_OVERHEAD


def test_a_scan_read_is_not_remembered() -> None:
    # Given a full cache of hot keys and a cold key in the store
    table, view, _ = make_cached(size=2)
    view.put(0, b"hot1", b"1")
    view.put(0, b"hot2", b"2")
    table.data._dbs[0][b"cold"] = b"c"
    # When a scan reads the cold key and a hot one without remembering
    assert view.get(0, b"cold", remember=False) == b"c"
    assert view.get(0, b"hot1", remember=False) == b"1"
    # Then the hot keys are still cached, and the cold one was read from the store each time
    assert list(view._cache) == [(0, b"hot1"), (0, b"hot2")]
    assert view.get(0, b"cold", remember=False) == b"c" and CountingDB.reads == 2


def test_the_cache_is_dropped_on_a_new_assignment_and_bypassed_while_rebalancing_or_recovering() -> None:
    # Given a cached value, then the store changed underneath (as changelog recovery writes it)
    table, view, app = make_cached()
    view.put(0, b"k", b"old")
    table.data._dbs[0][b"k"] = b"recovered"
    assert view.get(0, b"k") == b"old"  # same assignment: the cache is trusted
    # When the worker is rebalancing, then recovering: reads go to the store
    app.rebalancing = True
    assert view.get(0, b"k") == b"recovered"
    app.rebalancing = False
    app.tables.recovery.completed.clear()  # type: ignore[attr-defined]
    table.data._dbs[0][b"k"] = b"recovered-2"
    assert view.get(0, b"k") == b"recovered-2"
    app.tables.recovery.completed.set()  # type: ignore[attr-defined]
    # And a new assignment starts from an empty cache
    table.data._dbs[0][b"k"] = b"after"
    app.assignor._assignment = object()
    assert view.get(0, b"k") == b"after"
