"""pipeline.observability.memory: the tracemalloc growth report and the memory summary."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import rocksdict

from pipeline.observability import memory
from pipeline.state.lru import BoundedCache


def test_tracing_is_off_unless_frames_are_asked_for() -> None:
    assert memory.start_tracing(0) is False
    assert not tracemalloc.is_tracing()


def test_a_report_names_the_line_that_grew(tmp_path: Path) -> None:
    tracemalloc.start(3)
    try:
        report = memory.TraceReport(dump_dir=tmp_path)
        report.take()
        kept = [bytes(1000) + bytes([i % 256]) * 10 for i in range(5000)]  # ~5 MB, this line
        grown = report.take()
    finally:
        tracemalloc.stop()
    top = grown["growth_by_lineno_since_first"]["top"][0]
    assert top["where"].endswith(f"test_memory.py:{_line_of('kept = [bytes(1000)')}")
    assert top["grew_kb"] > 4000 and len(kept) == 5000
    assert "test_memory.py" in grown["growth_by_traceback_since_previous"]["top"][0]["where"]
    assert len(list(tmp_path.glob("tracemalloc-*.pickle"))) == 2


def test_the_summary_counts_caches_and_rocksdb(tmp_path: Path) -> None:
    cache: BoundedCache[bytes, bytes] = BoundedCache(10, 1 << 20)
    cache.put(b"k", b"v" * 1000, 1000)
    db = rocksdict.Rdict(str(tmp_path / "db"))
    try:
        db[b"a"] = b"b" * 100_000
        rt = SimpleNamespace(caches={"c": cache}, tables={"t": SimpleNamespace(data=SimpleNamespace(_dbs={0: db}))})
        s = memory.summary(rt)
    finally:
        db.close()
    assert s["caches"]["c"]["entries"] == 1 and s["caches"]["c"]["max_entries"] == 10
    assert s["rocksdb"]["t"]["partitions"] == 1 and s["rocksdb"]["t"]["memtables"] > 0
    assert s["rss_mb"] > 0 and s["tracemalloc"] is False


def _line_of(text: str) -> int:
    return next(i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if text in line)
