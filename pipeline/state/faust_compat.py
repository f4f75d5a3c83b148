"""Patches to faust-streaming's private internals (table stores, the assignor, the web driver's runner), for
the one version they were written against.

Checked at start-up: with another version the worker stops with the reason instead of misbehaving during
a rebalance. Before changing FAUST_VERSION, re-read `faust/stores/rocksdb.py` (`Store.revoke_partitions`,
`Store._dbs`, `Store.on_rebalance`, `RocksDBOptions.as_options`), `faust/web/drivers/aiohttp.py`
(`Web.__init__`, `Web._runner`) and `faust/tables/manager.py` (`TableManager.on_start`), and adjust this
module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables import TableManager
from faust.types import TP, CollectionT

FAUST_VERSION = "0.15.3"

log = logging.getLogger(__name__)


def require_faust_version() -> None:
    """Raise unless the installed faust-streaming is the version this module was written for."""
    if faust.__version__ != FAUST_VERSION:
        raise RuntimeError(
            f"pipeline.state.faust_compat patches faust-streaming {FAUST_VERSION} internals, but "
            f"{faust.__version__} is installed: check faust/stores/rocksdb.py (Store.revoke_partitions, "
            f"Store._dbs) still matches, then update FAUST_VERSION")


def close_revoked_partitions(table: Any, release: Callable[[int], None]) -> None:
    """Make `table`'s RocksDB store close a partition's database as soon as Faust revokes the partition.

    faust-streaming 0.15.3 `Store.revoke_partitions` only drops the handle from `_dbs` (its `db.close()` is
    commented out) and leaves the rest to garbage collection. Any other reference keeps the database open,
    with its LOCK held in this process, so when the partition comes back the reopen fails ("DB for partition
    N is locked! Retry in 1s" for 30 s, then the worker exits). Instead, per revoked partition:
    1. take the handle out of `_dbs`; 2. `release(partition)`: the caller drops its own references to it;
    3. `db.close()`: flushes the memtable (our writes skip the WAL) and releases the lock now. A reference
    left behind anyway sees a closed handle (rocksdict raises `DbClosedError`), never a stale open one."""
    require_faust_version()
    store = table.data
    if not isinstance(store, RocksDBStore):
        raise TypeError(f"table {table.name}: expected a faust RocksDB store, got {type(store).__name__}")

    def revoke_partitions(table: CollectionT, tps: set[TP]) -> None:  # faust's signature (it passes `table`)
        topics = table.changelog_topic.topics
        for tp in tps:
            if tp.topic not in topics:
                continue
            db = store._dbs.pop(tp.partition, None)
            if db is None:
                continue
            try:
                release(tp.partition)
            finally:
                db.close()
            log.info("table %s: partition %d revoked, its store closed", table.name, tp.partition)
        # (faust's version ends with gc.collect() to free the handles; closing them makes that unnecessary)

    async def stop() -> None:
        """faust's `Store.stop` also only clears `_dbs`: close each database the same way, so work still
        running during shutdown (the ingest loop) that opens a partition again finds its lock free."""
        for partition in list(store._dbs):
            db = store._dbs.pop(partition)
            try:
                release(partition)
            finally:
                db.close()
        log.info("table %s: stores closed on stop", table.name)

    store.revoke_partitions = revoke_partitions  # type: ignore[method-assign]
    store.stop = stop  # type: ignore[method-assign]


class PromptTableManager(TableManager):
    """Faust's table manager without its start-up grace for late tables.

    faust-streaming 0.15.3 `TableManager.on_start` sleeps 1 s before it finalises the tables (later ones are
    refused), then starts recovery; the conductor subscribes only after that, so every worker start and
    restart was ready 1 s later (about a third of a test worker's start-up). `build_app` declares every table
    before the app starts: nothing comes during that second. The rest of `on_start` is Faust's, unchanged."""

    async def on_start(self) -> None:
        require_faust_version()
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def static_membership_supported() -> bool:
    """Whether Faust's consumer can join its group as a static member (KIP-345): faust-streaming passes its
    `consumer_group_instance_id` setting to aiokafka's `group_instance_id` (faust-streaming 0.15.3 does,
    in `AIOKafkaConsumerThread._create_worker_consumer`), and aiokafka sends it in its JoinGroup."""
    import inspect

    import aiokafka
    from faust.types.settings import Settings as FaustSettings

    if faust.__version__ != FAUST_VERSION:  # the setting may be accepted but no longer passed on: check first
        log.warning("static membership off for Faust's consumer: written for faust-streaming %s, found %s",
                    FAUST_VERSION, faust.__version__)
        return False
    return (hasattr(FaustSettings, "consumer_group_instance_id")
            and "group_instance_id" in inspect.signature(aiokafka.AIOKafkaConsumer).parameters)


def tolerate_stale_url_on_static_rejoin() -> None:
    """Let a static member that rejoins with a new web URL keep its assignment instead of crashing.

    A worker restarted under the same `group.instance.id` gets its old assignment back from the broker
    without a rebalance, and Faust's user data in it still names the URL the member had before (its web port
    or host may have changed). faust-streaming 0.15.3 `PartitionAssignor.on_assignment` ends with
    `assert metadata.url == str(self._url)`: the worker would die at every restart. The partitions are right
    (checked as Faust checks them); only the URL the other workers know for this one is stale until the next
    rebalance, so it is logged and accepted. Any other assertion is raised as before."""
    require_faust_version()
    from faust.assignor.client_assignment import ClientMetadata
    from faust.assignor.partition_assignor import PartitionAssignor

    original = PartitionAssignor.on_assignment
    if getattr(original, "_cdp_stale_url", False):
        return

    def on_assignment(self: Any, assignment: Any) -> None:
        try:
            original(self, assignment)
        except AssertionError:
            metadata = ClientMetadata.loads(self._decompress(assignment.user_data))
            expected = sorted(self._assignment.kafka_protocol_assignment(self._table_manager))
            if metadata.url == str(self._url) or sorted(assignment.assignment) != expected:
                raise
            log.warning("rejoined the group as a static member: its assignment names this worker's previous "
                        "URL %s (now %s) until the next rebalance", metadata.url, self._url)

    on_assignment._cdp_stale_url = True  # type: ignore[attr-defined]
    PartitionAssignor.on_assignment = on_assignment  # type: ignore[method-assign]


class SharedRocksDBMemory:
    """One block cache and one write buffer manager for every RocksDB a worker opens (each table partition is
    a database of its own): RocksDB's memory is then bounded by `cache_bytes` in all, the memtables charged to
    the cache, instead of growing with the number of partitions held."""

    def __init__(self, cache_bytes: int, memtable_bytes: int) -> None:
        import rocksdict

        self.cache = rocksdict.Cache(cache_bytes)
        self.write_buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            memtable_bytes, False, self.cache)

    def share(self, store: Any) -> None:
        """Open `store`'s partitions with the shared cache and write buffer manager: faust 0.15.3's
        `RocksDBOptions.as_options` gives each partition a `rocksdict.Cache(block_cache_size)` of its own;
        the block-based table options it builds are rebuilt here the same way, with the shared cache."""
        import rocksdict

        options = store.rocksdb_options
        if not options.use_rocksdict:
            raise RuntimeError("shared RocksDB memory needs faust's rocksdict driver")
        build = type(options).as_options

        def as_options() -> Any:
            db_options = build(options)
            table = rocksdict.BlockBasedOptions()
            table.set_bloom_filter(options.bloom_filter_size, True)
            table.set_block_cache(self.cache)
            table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
            db_options.set_block_based_table_factory(table)
            db_options.set_write_buffer_manager(self.write_buffers)
            return db_options

        options.as_options = as_options


def set_web_timeouts(app: faust.App, timeout_s: float) -> None:
    """Cut off slow web clients: a connection whose request line and headers have not arrived within
    `timeout_s` (and an idle keep-alive connection) is closed.

    faust-streaming 0.15.3 creates the aiohttp `AppRunner` itself, in `faust.web.drivers.aiohttp.Web.__init__`
    (`AppRunner(self.web_app, access_log=None)`), with aiohttp's default keep-alive timeout of 3630 s and no
    setting to change it; half-sent requests were held open for as long. aiohttp (3.14) starts that timer when
    the connection is made and closes a connection still waiting for a complete request when it fires, so
    the same runner, made again with `keepalive_timeout`, bounds the time to send a request's head. (The
    body's time is bounded where it is read: pipeline/api/routes.py.) Must run before the web server starts."""
    require_faust_version()
    from aiohttp.web import AppRunner
    from faust.web.drivers.aiohttp import Web as AiohttpWeb

    web = app.web
    if not isinstance(web, AiohttpWeb) or not isinstance(getattr(web, "_runner", None), AppRunner):
        raise TypeError(f"expected faust's aiohttp web driver with an AppRunner, got {type(web).__name__}")
    web._runner = AppRunner(web.web_app, access_log=None, keepalive_timeout=timeout_s)


# Table stores and the assignor, read by pipeline.state.tables (partition-explicit access) and the profile
# agent (walks, the restore peek). Faust 0.15.3 has no public way to reach one partition's store.

def partition_store(table: Any, partition: int) -> Any:
    """The RocksDB database (rocksdict.Rdict) of one partition of `table`, opened by Faust if it is not yet
    (`Store._db_for_partition`)."""
    return table.data._db_for_partition(partition)


def open_partitions(table: Any) -> frozenset[int]:
    """The partitions whose store is open now (`Store._dbs`): revoked ones are closed."""
    return frozenset(table.data._dbs)


def forget_key_partition(table: Any, key: bytes) -> None:
    """Drop `key` from Faust's key -> partition index (`Store._key_index`), a cache for reads made without an
    event: after a delete, a stale entry would send Faust's own `table[key]` to that partition."""
    table.data._key_index.pop(key, None)


def assignment_token(app: Any) -> object:
    """An object that is replaced at every new assignment of the app's consumer (`assignor._assignment`):
    compared by identity to notice a rebalance without recomputing anything."""
    return app.assignor._assignment
