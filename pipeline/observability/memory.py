"""What a worker's memory is made of: GET /debug/memory, and an opt-in tracemalloc growth report.

GET /debug/memory (always; cheap): RSS, glibc malloc's heap (in use / free, which shows fragmentation), the
entries and bytes of the worker's in-memory caches (`Runtime.caches`), and RocksDB's own memory per table
(memtables, block caches, table readers: outside Python, tracemalloc does not see it).

PIPELINE_TRACEMALLOC=1 (or a number of frames to keep per allocation, e.g. 8; off by default: tracing costs
CPU and ~60 bytes per live allocation) starts tracemalloc when the worker starts; every
PIPELINE_TRACEMALLOC_INTERVAL_S (default 60 s) the worker logs, at WARNING, what grew the most by file:line,
since the first report and since the previous one, and GET /debug/memory adds the same. The snapshot itself
is not kept (only its per-line totals); PIPELINE_TRACEMALLOC_DUMP=<dir> also dumps each one
(`tracemalloc.Snapshot.load` reads them back) for comparisons grouped otherwise. A snapshot of a busy worker
takes a second or more, during which the event loop stops: a diagnostic, not for production.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

# The cyclic GC: a full collection walks every tracked object, and the decoded-profile cache holds about a
# million of them, so a full pass stops the worker for ~250 ms. With CPython's defaults (700, 10, 10) one runs
# each time a quarter of the cache has been replaced, every few seconds under load (measured: 4.4 % of the time
# in full collections at 1,500 events/s). Profiles are acyclic (an evicted one is freed by its reference
# count), so rarer collections cost little memory: young ones every 20,000 allocations, full ones after
# 100 middle ones, at most.
GC_THRESHOLDS = (20_000, 20, 100)


def tune_gc() -> None:
    """Called once the worker is built: 1. move everything allocated so far (modules, the app, config) out of
    the collector's sight (`gc.freeze`), it lives as long as the process; 2. raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


log = logging.getLogger(__name__)

TOP = 15
MB = 1 << 20
# RocksDB properties summed over a table's open partitions (each partition has its own block cache)
ROCKSDB_PROPERTIES = {"memtables": "rocksdb.size-all-mem-tables", "block_cache": "rocksdb.block-cache-usage",
                      "table_readers": "rocksdb.estimate-table-readers-mem"}
_IGNORED = frozenset((tracemalloc.__file__, __file__, "<frozen importlib._bootstrap>",
                      "<frozen importlib._bootstrap_external>", "<unknown>"))


def start_tracing(frames: int) -> bool:
    """Start tracemalloc keeping `frames` frames per allocation, if any (Settings.tracemalloc_frames, from
    PIPELINE_TRACEMALLOC; called first thing by `pipeline worker`)."""
    if frames <= 0:
        return False
    tracemalloc.start(frames)
    return True


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_stats() -> dict[str, float] | None:
    """glibc's `mallinfo2`, in MB: `heap` (obtained with brk/sbrk, all arenas), of it `in_use` and `free` (free
    chunks not given back: fragmentation), and `mmapped` (large blocks). None where there is no glibc >= 2.33."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {"heap": round(m.arena / MB, 1), "in_use": round(m.uordblks / MB, 1), "free": round(m.fordblks / MB, 1),
            "mmapped": round(m.hblkhd / MB, 1)}


def rocksdb_stats(tables: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per Faust table: RocksDB memory in MB summed over its open partitions, and how many are open. The block
    cache is shared by every partition (and table), memtables charged to it: its usage is counted once, the
    largest a partition reports."""
    out: dict[str, dict[str, float]] = {}
    for name, table in tables.items():
        dbs = dict(getattr(table.data, "_dbs", {}))
        sums = dict.fromkeys(ROCKSDB_PROPERTIES, 0)
        for db in dbs.values():
            for key, prop in ROCKSDB_PROPERTIES.items():
                try:
                    value = db.property_int_value(prop) or 0
                    sums[key] = max(sums[key], value) if key == "block_cache" else sums[key] + value
                except Exception:  # noqa: BLE001,S112 - a store closing meanwhile: skip it
                    continue
        out[name] = {"partitions": len(dbs), **{k: round(v / MB, 1) for k, v in sums.items()}}
    return out


def cache_stats(caches: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Entries and accounted bytes (MB) of each `BoundedCache`, against their bounds."""
    return {name: {"entries": len(c), "max_entries": c.max_entries, "mb": round(c.nbytes / MB, 1),
                   "max_mb": round(c.max_bytes / MB, 1)} for name, c in caches.items()}


Frames = tuple[tuple[str, int], ...]  # (file, line), the most recent call first
Stats = dict[Frames, list[int]]  # -> [bytes, blocks]


def _stats(snapshot: tracemalloc.Snapshot) -> tuple[Stats, Stats]:
    """Totals by allocating line and by whole traceback, in one pass over the raw traces (`Snapshot.statistics`
    and `filter_traces` build objects per trace in Python: minutes for a busy worker's millions of them, and
    every object made while tracing is traced too: sizes are gathered in lists, summed in C); allocations made
    in the ignored files are left out."""
    sizes: dict[Frames, list[int]] = {}
    for _domain, size, frames, _total in snapshot.traces._traces:  # type: ignore[attr-defined]
        found = sizes.get(frames)
        if found is None:
            sizes[frames] = [size]
        else:
            found.append(size)
    by_tb: Stats = {frames: [sum(s), len(s)] for frames, s in sizes.items() if frames and frames[0][0] not in _IGNORED}
    del sizes
    by_line: Stats = {}
    for frames, (size, count) in by_tb.items():
        t = by_line.setdefault(frames[:1], [0, 0])
        t[0] += size
        t[1] += count
    return by_line, by_tb


def _growth(now: Stats, then: Stats, top: int) -> list[dict[str, Any]]:
    diffs = [(size - then.get(tb, (0, 0))[0], count - then.get(tb, (0, 0))[1], size, tb)
             for tb, (size, count) in now.items()]
    diffs.sort(key=lambda d: d[0], reverse=True)
    return [{"where": " <- ".join(f"{f}:{n}" for f, n in tb), "grew_kb": round(d / 1024, 1), "blocks": dn,
             "now_kb": round(size / 1024, 1)}
            for d, dn, size, tb in diffs[:top] if d > 0]


class TraceReport:
    """Successive tracemalloc snapshots reduced to per-line (and, with more than one frame, per-traceback)
    totals; each report gives the top growth since the first and since the previous one."""

    def __init__(self, top: int = TOP, dump_dir: Path | None = None) -> None:
        self.top = top
        self.dump_dir = dump_dir
        self.first: dict[str, Stats] | None = None
        self.previous: dict[str, Stats] | None = None
        self.first_at = self.previous_at = 0.0
        self.taken = 0

    def take(self) -> dict[str, Any]:
        started = time.monotonic()
        snapshot = tracemalloc.take_snapshot()
        self.taken += 1
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            snapshot.dump(str(self.dump_dir / f"tracemalloc-{os.getpid()}-{self.taken:04d}.pickle"))
        by_line, by_tb = _stats(snapshot)
        del snapshot
        stats = {"lineno": by_line, **({"traceback": by_tb} if tracemalloc.get_traceback_limit() > 1 else {})}
        now = time.monotonic()
        if self.first is None:
            self.first, self.first_at = stats, now
        previous, previous_at = self.previous or stats, self.previous_at or now
        self.previous, self.previous_at = stats, now
        traced, peak = tracemalloc.get_traced_memory()
        report: dict[str, Any] = {"traced_mb": round(traced / MB, 1), "traced_peak_mb": round(peak / MB, 1),
                                  "snapshot_s": round(now - started, 2)}
        for key_type in stats:
            report[f"growth_by_{key_type}_since_first"] = {
                "seconds": round(now - self.first_at), "top": _growth(stats[key_type], self.first[key_type], self.top)}
            report[f"growth_by_{key_type}_since_previous"] = {
                "seconds": round(now - previous_at), "top": _growth(stats[key_type], previous[key_type], self.top)}
        return report


def summary(rt: Any) -> dict[str, Any]:
    rss = rss_bytes()
    return {"rss_mb": round(rss / MB, 1) if rss is not None else None, "malloc": malloc_stats(),
            "caches": cache_stats(rt.caches), "rocksdb": rocksdb_stats(rt.tables),
            "tracemalloc": tracemalloc.is_tracing()}


def _format(report: dict[str, Any]) -> str:
    lines = [f"memory: rss {report['rss_mb']} MB, malloc {report['malloc']}, traced {report.get('traced_mb')} MB "
             f"(snapshot {report.get('snapshot_s')} s)",
             f"  caches {report['caches']}", f"  rocksdb {report['rocksdb']}"]
    for key, growth in report.items():
        if key.startswith("growth_by_"):
            lines.append(f"  {key} ({growth['seconds']} s):")
            lines += [f"    {g['grew_kb']:>10.1f} KB {g['blocks']:>+8d} blocks (now {g['now_kb']:.1f} KB)  {g['where']}"
                      for g in growth["top"]]
    return "\n".join(lines)


def register(rt: Any) -> None:
    """GET /debug/memory; with tracemalloc on, the periodic growth report in the log."""
    settings = rt.settings
    trace = TraceReport(dump_dir=settings.tracemalloc_dump_dir) if tracemalloc.is_tracing() else None

    @rt.app.page("/debug/memory")
    async def debug_memory(web: Any, request: Any) -> Any:
        report = summary(rt)
        if trace is not None:
            report.update(trace.take())
        return web.json(report)

    if trace is None:
        return
    log.warning("tracemalloc is on (%d frames): a growth report every %s s", tracemalloc.get_traceback_limit(),
                settings.tracemalloc_interval_s)

    @rt.app.timer(settings.tracemalloc_interval_s)
    async def tracemalloc_report() -> None:
        log.warning("%s", _format({**summary(rt), **trace.take()}))
