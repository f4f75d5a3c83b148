"""Throughput of the HTTP destination against the local receiver and of file exports (prints rates)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from http_receiver import Receiver
from test_dest_files import file_dest, member
from test_dest_http import DeadLetters, make, payloads


async def test_http_deliveries_per_second(receiver: Receiver) -> None:
    n = 20_000
    dest = make(receiver, "/bench", DeadLetters(), max_records=500, max_age_ms=50)
    batch = payloads(n)
    await dest.start()
    try:
        start = time.perf_counter()
        for i in range(0, n, 1000):
            await dest.deliver(batch[i:i + 1000])
        await dest.flush()
        elapsed = time.perf_counter() - start
    finally:
        await dest.close()
    assert len(set(receiver.keys("/bench"))) == n
    rate = n / elapsed
    print(f"\nhttp destination: {n} records in {elapsed:.2f}s = {rate:,.0f} records/s "
          f"({dest.requests} requests of <=500)")
    assert rate > 1_000  # a floor far below what a 2-core CI machine does; catches pathologies only


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
async def test_file_export_rows_per_second(tmp_path: Path, fmt: str) -> None:
    n = 20_000
    dest = file_dest(str(tmp_path / fmt), fmt, extra="    max_rows_per_file: 8000\n")
    await dest.start()
    rows = [member(i) for i in range(n)]
    start = time.perf_counter()
    await dest.deliver(rows)
    m = await dest.export_now()
    elapsed = time.perf_counter() - start
    assert m.total_rows == n and len(m.files) == 3
    print(f"\nfile export {fmt}: {n} rows in {elapsed:.2f}s = {n / elapsed:,.0f} rows/s, "
          f"{sum(f.bytes for f in m.files) / 1e6:.1f} MB")
    assert n / elapsed > 2_000
