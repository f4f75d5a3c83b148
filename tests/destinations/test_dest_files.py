"""File exports: formats, full/incremental, manifests vs files, splitting, atomic publish, s3 via moto."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
from dest_helpers import dest_config
from fsspec.implementations.local import LocalFileSystem

from pipeline.destinations.base import DestinationContext, Payload
from pipeline.destinations.files import (
    MANIFEST_NAME,
    ExportManifest,
    FileDestination,
    FileSettings,
    read_manifest,
    recent_manifests,
)


def member(i: int, status: str = "realized", audience: str = "vip", t: int | None = None) -> Payload:
    return Payload(destination="d1", profile_id=f"p{i:05d}", audience_id=audience, kind="membership",
                   status=status,  # type: ignore[arg-type]
                   identities={"Email": [hashlib.sha256(f"u{i}@x.org".encode()).hexdigest()], "CRMID": [f"C-{i}"]},
                   attributes={"loyalty.tier": ["gold", "silver"][i % 2], "consents.email": "yes"},
                   idempotency_key=f"{i}:{audience}:{status}", event_time_ms=t if t is not None else i,
                   source_emit_ms=i)


def file_dest(path: str, fmt: str = "csv", mode: str = "incremental", *, extra: str = "",
              fs: fsspec.AbstractFileSystem | None = None, storage: str = "") -> FileDestination:
    cfg = dest_config("file", extra=f"    format: {fmt}\n    mode: {mode}\n" + extra + storage)
    cfg = replace(cfg, settings=replace(cfg.settings_as(FileSettings), path=path))
    return FileDestination(cfg, DestinationContext(), fs=fs)


def read_rows(fs: fsspec.AbstractFileSystem, folder: str, fmt: str, name: str) -> list[dict[str, Any]]:
    with fs.open(f"{folder}/{name}", "rb") as f:
        data = f.read()
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(data.decode())))
    if fmt == "jsonl":
        return [json.loads(line) for line in data.decode().splitlines()]
    return pq.read_table(io.BytesIO(data)).to_pylist()


def check_manifest(fs: fsspec.AbstractFileSystem, m: ExportManifest) -> list[dict[str, Any]]:
    """Recompute rows, sizes and checksums of every file and compare with the manifest; return rows."""
    folder = m.folder.split("://", 1)[-1]
    on_disk = read_manifest(fs, folder)
    assert on_disk == m.to_dict()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    assert names == sorted([f.name for f in m.files] + [MANIFEST_NAME])
    rows: list[dict[str, Any]] = []
    for f in m.files:
        with fs.open(f"{folder}/{f.name}", "rb") as fh:
            data = fh.read()
        assert len(data) == f.bytes and hashlib.sha256(data).hexdigest() == f.sha256
        part = read_rows(fs, folder, m.format, f.name)
        assert len(part) == f.rows
        rows.extend(part)
    assert len(rows) == m.total_rows
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
async def test_incremental_export_each_format(tmp_path: Path, fmt: str) -> None:
    # Given an incremental destination that received 50 changes, including attribute-only updates
    dest = file_dest(str(tmp_path / "out"), fmt)
    await dest.start()
    await dest.deliver([member(i) for i in range(50)])
    await dest.deliver([replace(member(99), kind="attributes", status="updated", audience_id=None)])
    # When exported
    m1 = await dest.export_now()
    # Then the manifest matches the files, and the rows are the memberships with identities/attributes
    rows = check_manifest(LocalFileSystem(), m1)
    assert m1.total_rows == 50 and m1.format == fmt and m1.mode == "incremental"
    assert sorted(r["profile_id"] for r in rows) == [f"p{i:05d}" for i in range(50)]
    if fmt == "jsonl":
        assert rows[0]["identities"]["CRMID"] == ["C-0"] and rows[0]["attributes"]["loyalty.tier"] == "gold"
    elif fmt == "csv":
        assert rows[0]["identities.CRMID"] == "C-0" and rows[0]["attributes.loyalty.tier"] == "gold"
    else:
        assert rows[0]["identities.CRMID"] == ["C-0"] and rows[0]["attributes.loyalty.tier"] == "gold"
    # And a second export carries only the changes since the first
    await dest.deliver([member(7, status="exited", t=100)])
    m2 = await dest.export_now()
    rows2 = check_manifest(LocalFileSystem(), m2)
    assert [(r["profile_id"], r["status"]) for r in rows2] == [("p00007", "exited")]
    await dest.close()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
async def test_full_export_tracks_current_members(tmp_path: Path, fmt: str) -> None:
    dest = file_dest(str(tmp_path / "full"), fmt, "full")
    await dest.start()
    await dest.deliver([member(i) for i in range(10)])
    m1 = await dest.export_now()
    assert m1.total_rows == 10
    # When two members exit and one joins, Then the next full export is the current member set
    await dest.deliver([member(1, "exited", t=50), member(2, "exited", t=50), member(10, t=50)])
    m2 = await dest.export_now()
    rows = check_manifest(LocalFileSystem(), m2)
    assert sorted(r["profile_id"] for r in rows) == [f"p{i:05d}" for i in [0, *range(3, 11)]]
    # And the snapshot survives a restart (a new destination object on the same folder)
    again = file_dest(str(tmp_path / "full"), fmt, "full")
    await again.start()
    m3 = await again.export_now()
    assert m3.total_rows == 9
    # And members passed in explicitly are exported as given
    m4 = await again.export_now(members=[member(i, audience="churn") for i in range(3)])
    assert [r["audience_id"] for r in check_manifest(LocalFileSystem(), m4)] == ["churn"] * 3


async def test_spooled_changes_survive_a_restart_after_flush(tmp_path: Path) -> None:
    # Given changes flushed (that is when the runner commits offsets) and the process restarting
    dest = file_dest(str(tmp_path / "spool"), "jsonl")
    await dest.start()
    await dest.deliver([member(i) for i in range(5)])
    await dest.flush()
    restarted = file_dest(str(tmp_path / "spool"), "jsonl")
    await restarted.start()
    # Then the next export still contains them
    assert (await restarted.export_now()).total_rows == 5


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
async def test_split_by_rows(tmp_path: Path, fmt: str) -> None:
    dest = file_dest(str(tmp_path / "rows"), fmt, extra="    max_rows_per_file: 40\n")
    await dest.start()
    await dest.deliver([member(i) for i in range(100)])
    m = await dest.export_now()
    assert [f.rows for f in m.files] == [40, 40, 20]
    assert len(check_manifest(LocalFileSystem(), m)) == 100


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
async def test_split_by_size(tmp_path: Path, fmt: str) -> None:
    cap = 12_000 if fmt == "parquet" else 4_000
    dest = file_dest(str(tmp_path / "bytes"), fmt, extra=f"    max_bytes_per_file: {cap}\n")
    await dest.start()
    await dest.deliver([member(i) for i in range(300)])
    m = await dest.export_now()
    assert len(m.files) > 1 and all(f.bytes <= cap for f in m.files)
    rows = check_manifest(LocalFileSystem(), m)
    assert sorted(r["profile_id"] for r in rows) == [f"p{i:05d}" for i in range(300)]


class FailingWrites(LocalFileSystem):
    """A local filesystem whose Nth data write dies half-way, as a full disk or a killed process would."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.writes = 0
        self.fail_on = fail_on

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:  # type: ignore[override]
        f = super()._open(path, mode, **kw)
        if "w" in mode:
            self.writes += 1
            if self.writes == self.fail_on:
                original = f.write

                def torn(data: bytes) -> int:
                    original(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")
                f.write = torn
        return f


async def test_atomic_publish_leaves_no_partial_file_under_final_name(tmp_path: Path) -> None:
    root = tmp_path / "atomic"
    # Given a filesystem that fails while writing the second part
    fs = FailingWrites(fail_on=2)
    dest = file_dest(str(root), "csv", extra="    max_rows_per_file: 10\n", fs=fs)
    await dest.start()
    await dest.deliver([member(i) for i in range(30)])
    await dest.flush()
    fs.writes = 0  # count from here: write 1 is part 0, write 2 (part 1) is torn
    with pytest.raises(OSError):
        await dest.export_now()
    # Then only the complete first part is visible, there is no manifest, and no temp file is left
    exports = [p for p in root.iterdir() if p.name != "_cdp"]
    assert len(exports) == 1
    assert sorted(p.name for p in exports[0].iterdir()) == ["part-00000.csv"]
    assert len(list(csv.DictReader(io.StringIO((exports[0] / "part-00000.csv").read_text())))) == 10
    assert list((root / "_cdp" / "tmp").iterdir()) == []
    # And the changes are still spooled: the next export publishes them all
    dest.fs = LocalFileSystem()
    m = await dest.export_now()
    assert m.total_rows == 30 and len(check_manifest(LocalFileSystem(), m)) == 30


async def test_readers_never_see_a_growing_file(tmp_path: Path) -> None:
    # Given a watcher polling the export folder while a large export is written
    root = tmp_path / "watch"
    dest = file_dest(str(root), "jsonl", extra="    max_rows_per_file: 500\n")
    await dest.start()
    await dest.deliver([member(i) for i in range(5_000)])
    seen: dict[str, set[int]] = {}
    done = False

    def watch() -> None:
        while not done:
            for dirpath, _, files in os.walk(root):
                if "_cdp" in dirpath:
                    continue
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        seen.setdefault(os.path.join(dirpath, name), set()).add(len(f.read()))

    watcher = asyncio.get_running_loop().run_in_executor(None, watch)
    try:
        m = await dest.export_now()
    finally:
        done = True
        await watcher
    # Then every file seen under a final name only ever had its final size
    sizes = {f.name: f.bytes for f in m.files}
    for path, lengths in seen.items():
        name = os.path.basename(path)
        if name in sizes:
            assert lengths == {sizes[name]}


async def test_schedule_by_interval_and_cron(tmp_path: Path) -> None:
    dest = file_dest(str(tmp_path / "sched"), "jsonl", extra="    schedule: 1s\n")
    assert dest.next_run(100.0) == 101.0
    cron = file_dest(str(tmp_path / "cron"), "jsonl", extra="    schedule: '*/15 * * * *'\n")
    assert cron.next_run(0.0) == 900.0
    await dest.start()
    await dest.deliver([member(1)])
    # When the interval passes, Then an export happens without export_now()
    deadline = time.monotonic() + 5
    while not dest.exports:
        assert time.monotonic() < deadline, "scheduled export did not run"
        await asyncio.sleep(0.02)
    assert dest.exports[0].total_rows == 1
    await dest.close()


# -- s3:// through a real moto server -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[fsspec.AbstractFileSystem]:
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(var, value)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": moto_endpoint}, skip_instance_cache=True)
    if not fs.exists("exports"):
        fs.mkdir("exports")
    yield fs


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
async def test_s3_export_against_moto(s3: fsspec.AbstractFileSystem, moto_endpoint: str, fmt: str) -> None:
    # Given a destination configured with an s3:// URL (storage options point s3fs at moto)
    cfg = dest_config("file", extra=(
        f"    format: {fmt}\n    mode: incremental\n    max_rows_per_file: 30\n"
        f"    storage_options: {{client_kwargs: {{endpoint_url: '{moto_endpoint}'}}, skip_instance_cache: true}}\n"))
    cfg = replace(cfg, settings=replace(cfg.settings_as(FileSettings), path=f"s3://exports/{fmt}"))
    dest = FileDestination(cfg, DestinationContext())
    await dest.start()
    await dest.deliver([member(i) for i in range(70)])
    # When exported
    m = await dest.export_now()
    # Then the objects in the bucket match the manifest
    assert m.folder.startswith(f"s3://exports/{fmt}/")
    s3.invalidate_cache()
    rows = check_manifest(s3, m)
    assert [f.rows for f in m.files] == [30, 30, 10] and len(rows) == 70
    assert not s3.glob(f"exports/{fmt}/_cdp/tmp/*")


async def test_the_last_exports_are_read_from_their_manifests_newest_first(tmp_path: Path) -> None:
    # Given three exports of a destination, and an export in progress (its files, no manifest yet)
    dest = file_dest(str(tmp_path / "out"))
    await dest.start()
    manifests = []
    for i in range(3):
        await dest.deliver([member(i)])
        manifests.append((await dest.export_now()).to_dict())
        time.sleep(0.002)  # (distinct creation times)
    (tmp_path / "out" / "in-progress").mkdir()
    (tmp_path / "out" / "in-progress" / "part-00000.csv").write_text("x\n")
    # When the last two are asked for, Then the two newest complete ones, newest first
    assert recent_manifests(dest.settings, 2) == manifests[::-1][:2]
    await dest.close()
