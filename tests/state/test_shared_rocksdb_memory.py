"""Every table partition's RocksDB shares one block cache and write buffer manager (pipeline.runtime's bound)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from faust.stores.rocksdb import RocksDBOptions

from pipeline.state.faust_compat import SharedRocksDBMemory


def test_partitions_share_one_block_cache_that_their_memtables_are_charged_to(tmp_path: Path) -> None:
    # Given faust's options, which give each partition a 32 MB block cache of its own, shared through 8 MB
    shared = SharedRocksDBMemory(8 << 20, 4 << 20)
    stores = [SimpleNamespace(rocksdb_options=RocksDBOptions(block_cache_size=32 << 20, write_buffer_size=16 << 20))
              for _ in range(2)]
    for store in stores:
        shared.share(store)
    dbs = [s.rocksdb_options.open(tmp_path / f"p{i}.db") for i, s in enumerate(stores)]
    try:
        # When one partition is written
        value = os.urandom(1000)
        for n in range(3000):
            dbs[0][b"k%d" % n] = value
        # Then both report the one cache, its capacity the shared bound, the memtables counted in it
        capacity = [db.property_int_value("rocksdb.block-cache-capacity") for db in dbs]
        usage = [db.property_int_value("rocksdb.block-cache-usage") for db in dbs]
        assert capacity == [8 << 20, 8 << 20]
        assert usage[0] == usage[1] > 2 << 20
        assert dbs[0][b"k1"] == value
    finally:
        for db in dbs:
            db.close()
