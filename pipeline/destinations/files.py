"""File-export destination: scheduled CSV / JSON-lines / Parquet exports to a folder or s3:// via fsspec."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from croniter import croniter
from yaml.constructor import SafeConstructor

from pipeline.destinations.base import Destination, DestinationContext, Payload, register_kind
from pipeline.destinations.config import DestinationConfig, Env, Fields, KindSettings
from pipeline.errors import DeliveryError
from pipeline.yamlconf import Doc

log = logging.getLogger(__name__)

_EXT = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}
_BASE_COLUMNS = ("profile_id", "audience_id", "status", "event_time_ms", "idempotency_key")
MANIFEST_NAME = "_manifest.json"


FileFormat = Literal["csv", "jsonl", "parquet"]
ExportMode = Literal["full", "incremental"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
MODES: tuple[str, ...] = ("full", "incremental")
_INTERVAL = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_INTERVAL_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class FileSettings:
    """Settings of a `file` destination (scheduled exports to a folder or an s3:// URL)."""

    path: str
    format: FileFormat = "csv"
    mode: ExportMode = "incremental"
    schedule: str | None = None  # "15m"-style interval or a cron expression; None = on demand only
    max_rows_per_file: int | None = None
    max_bytes_per_file: int | None = None
    # fsspec options (e.g. {client_kwargs: {endpoint_url: ...}} for s3fs); may hold secrets.
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    @property
    def interval_s(self) -> int | None:
        """The schedule as seconds if it is an interval, None if it is a cron expression or absent."""
        if self.schedule is None:
            return None
        m = _INTERVAL.match(self.schedule)
        return int(m.group(1)) * _INTERVAL_S[m.group(2)] if m else None


@dataclass(frozen=True)
class ExportFile:
    """One published data file of an export."""

    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ExportManifest:
    """What one export published; written last, so its presence means the export is complete."""

    destination: str
    export_id: str
    mode: str
    format: str
    created_ms: int
    folder: str
    total_rows: int
    files: tuple[ExportFile, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "export_id": self.export_id,
            "mode": self.mode,
            "format": self.format,
            "created_ms": self.created_ms,
            "folder": self.folder,
            "total_rows": self.total_rows,
            "files": [{"name": f.name, "rows": f.rows, "bytes": f.bytes, "sha256": f.sha256}
                      for f in self.files],
        }


class FileDestination(Destination):
    """Accumulates membership payloads and publishes them as files on a schedule or on demand.

    Layout under `path`: `<export_id>/part-00000.<ext>` files plus `<export_id>/_manifest.json`;
    bookkeeping lives in `_cdp/` (spooled changes, the member snapshot for full exports, temp files).
    `flush()` spools pending changes durably, so committing offsets after it loses nothing.
    """

    def __init__(self, config: DestinationConfig, context: DestinationContext,
                 fs: fsspec.AbstractFileSystem | None = None) -> None:
        super().__init__(config, context)
        if not isinstance(config.settings, FileSettings):
            raise DeliveryError(f"destination {config.name} has no file settings", retryable=False)
        self.settings: FileSettings = config.settings
        if fs is None:
            fs, root = fsspec.core.url_to_fs(self.settings.path, **dict(self.settings.storage_options))
        else:
            root = self.settings.path.split("://", 1)[-1]
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/")
        self._protocol = self.settings.path.split("://", 1)[0] + "://" if "://" in self.settings.path else ""
        self._pending: list[Payload] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.exports: list[ExportManifest] = []
        self.exported_rows = 0
        self.skipped_attribute_updates = 0
        self.last_export_ms: int | None = None
        self.last_error: str | None = None

    # -- Destination -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._makedirs, f"{self.root}/_cdp/spool")
        await asyncio.to_thread(self._makedirs, f"{self.root}/_cdp/tmp")
        if self.settings.schedule:
            self._task = asyncio.create_task(self._schedule_loop(), name=f"file-dest-{self.name}")

    async def deliver(self, batch: list[Payload]) -> None:
        for p in batch:
            # Exports carry memberships with identities and attributes, not attribute-only updates.
            if p.kind == "membership":
                self._pending.append(p)
            else:
                self.skipped_attribute_updates += 1

    async def flush(self) -> None:
        """Make every delivered payload durable.

        1. Take the pending list (atomically: we are on the event loop).
        2. Write it as one spool file: temp name first, then move, so a crash leaves no torn spool.
        3. On failure put the payloads back and raise a retryable DeliveryError.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            await asyncio.to_thread(self._write_spool, pending)
        except Exception as exc:
            self._pending = pending + self._pending
            self.last_error = type(exc).__name__
            raise DeliveryError(f"cannot spool {len(pending)} change(s): {exc}", retryable=True) from exc

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stats(self) -> dict[str, Any]:
        return {
            "exports": len(self.exports),
            "exported_rows": self.exported_rows,
            "pending": len(self._pending),
            "skipped_attribute_updates": self.skipped_attribute_updates,
            "last_export_ms": self.last_export_ms,
            "last_delivery_ms": self.last_export_ms,
            "last_error": self.last_error,
        }

    # -- exports ---------------------------------------------------------------------------------

    async def export_now(self, members: Iterable[Payload] | None = None) -> ExportManifest:
        """Export immediately (also what the schedule calls).

        Full mode exports `members` if given (all current members passed in by the caller), else the
        snapshot kept from delivered changes; incremental mode exports the changes since the last
        export. One export runs at a time.
        """
        async with self._lock:
            await self.flush()
            manifest = await asyncio.to_thread(self._export, None if members is None else list(members))
        self.exports.append(manifest)
        self.exported_rows += manifest.total_rows
        self.last_export_ms = manifest.created_ms
        return manifest

    def next_run(self, after: float) -> float | None:
        """The next scheduled export time (epoch seconds) after `after`, or None if unscheduled."""
        if not self.settings.schedule:
            return None
        interval = self.settings.interval_s
        if interval is not None:
            return after + interval
        return float(croniter(self.settings.schedule, datetime.fromtimestamp(after, UTC)).get_next(float))

    async def _schedule_loop(self) -> None:
        next_at = self.next_run(time.time())
        while next_at is not None:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            try:
                await self.export_now()
            except Exception as exc:  # keep the schedule alive; the next run retries the same spool
                self.last_error = type(exc).__name__
                log.exception("destination %s: scheduled export failed", self.name)
            next_at = self.next_run(max(time.time(), next_at))

    def _export(self, members: list[Payload] | None) -> ExportManifest:
        """Publish one export (runs in a worker thread).

        1. Read the spooled changes (the list is fixed now; later spools wait for the next export).
        2. Choose rows: the changes (incremental) or the member snapshot / given members (full).
        3. Write each part to `_cdp/tmp`, then move it to its final name: readers never see a
           partial file under a final name.
        4. Write the manifest the same way, last: an export without a manifest is incomplete.
        5. Full mode: replace the member snapshot. Then delete the consumed spool files (a crash
           before this re-exports them next time: at-least-once, rows carry idempotency keys).
        """
        spool_files = sorted(self.fs.glob(f"{self.root}/_cdp/spool/*.jsonl"))
        changes = [p for f in spool_files for p in self._read_jsonl(f)]
        snapshot: dict[tuple[str, str], Payload] | None = None
        if self.settings.mode == "incremental":
            rows = sorted(changes, key=lambda p: (p.event_time_ms, p.profile_id, p.audience_id or ""))
        else:
            snapshot = {(p.profile_id, p.audience_id or ""): p for p in self._read_snapshot()}
            for p in sorted(changes, key=lambda p: p.event_time_ms):
                if p.status == "exited":
                    snapshot.pop((p.profile_id, p.audience_id or ""), None)
                else:
                    snapshot[(p.profile_id, p.audience_id or "")] = p
            chosen = list(snapshot.values()) if members is None else members
            rows = sorted((p for p in chosen if p.status != "exited"),
                          key=lambda p: (p.audience_id or "", p.profile_id))

        created_ms = int(time.time() * 1000)
        stamp = datetime.fromtimestamp(created_ms / 1000, UTC).strftime("%Y%m%dT%H%M%S")
        export_id = f"{stamp}{created_ms % 1000:03d}Z-{self.settings.mode}-{uuid.uuid4().hex[:8]}"
        folder = f"{self.root}/{export_id}"
        self._makedirs(folder)
        ext = _EXT[self.settings.format]
        files: list[ExportFile] = []
        for i, (data, count) in enumerate(self._encode_parts(rows)):
            name = f"part-{i:05d}.{ext}"
            self._publish(f"{folder}/{name}", data)
            files.append(ExportFile(name, count, len(data), hashlib.sha256(data).hexdigest()))
        manifest = ExportManifest(
            destination=self.name, export_id=export_id, mode=self.settings.mode,
            format=self.settings.format, created_ms=created_ms, folder=self._protocol + folder,
            total_rows=sum(f.rows for f in files), files=tuple(files))
        self._publish(f"{folder}/{MANIFEST_NAME}",
                      json.dumps(manifest.to_dict(), indent=2).encode("utf-8"))
        if snapshot is not None:
            body = "".join(json.dumps(p.to_dict(), separators=(",", ":")) + "\n" for p in snapshot.values())
            self._publish(f"{self.root}/_cdp/members.jsonl", body.encode("utf-8"))
        for f in spool_files:
            self.fs.rm(f)
        log.info("destination %s: export %s published, %d row(s) in %d file(s)", self.name,
                 export_id, manifest.total_rows, len(files))
        return manifest

    # -- encoding --------------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        return (list(_BASE_COLUMNS) + [f"identities.{m.namespace}" for m in self.config.identities]
                + [f"attributes.{a}" for a in self.config.attributes])

    def _flat_row(self, p: Payload, *, join_lists: bool) -> dict[str, Any]:
        row: dict[str, Any] = {"profile_id": p.profile_id, "audience_id": p.audience_id,
                               "status": p.status, "event_time_ms": p.event_time_ms,
                               "idempotency_key": p.idempotency_key}
        for m in self.config.identities:
            ids = p.identities.get(m.namespace, [])
            row[f"identities.{m.namespace}"] = "|".join(ids) if join_lists else list(ids)
        for a in self.config.attributes:
            row[f"attributes.{a}"] = p.attributes.get(a)
        return row

    def _encode_parts(self, rows: list[Payload]) -> Iterator[tuple[bytes, int]]:
        """Yield (file bytes, row count) per part, honouring max_rows_per_file and max_bytes_per_file.

        Text formats are split row by row (a part exceeds the byte cap only when a single row does);
        Parquet parts are halved until they fit, since its size is only known once encoded.
        """
        max_rows = self.settings.max_rows_per_file
        max_bytes = self.settings.max_bytes_per_file
        if not rows:
            return
        if self.settings.format == "parquet":
            step = max_rows or len(rows)
            for start in range(0, len(rows), step):
                yield from self._fit_parquet(rows[start:start + step], max_bytes)
            return
        header = self._csv_header() if self.settings.format == "csv" else b""
        part: list[bytes] = []
        size = len(header)
        for p in rows:
            line = self._csv_line(p) if self.settings.format == "csv" else self._json_line(p)
            full = max_rows is not None and len(part) >= max_rows
            too_big = max_bytes is not None and part and size + len(line) > max_bytes
            if full or too_big:
                yield header + b"".join(part), len(part)
                part, size = [], len(header)
            part.append(line)
            size += len(line)
        if part:
            yield header + b"".join(part), len(part)

    def _fit_parquet(self, rows: list[Payload], max_bytes: int | None) -> Iterator[tuple[bytes, int]]:
        data = self._parquet(rows)
        if max_bytes is None or len(data) <= max_bytes or len(rows) == 1:
            yield data, len(rows)
            return
        mid = len(rows) // 2
        yield from self._fit_parquet(rows[:mid], max_bytes)
        yield from self._fit_parquet(rows[mid:], max_bytes)

    def _csv_header(self) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(self._columns())
        return buf.getvalue().encode("utf-8")

    def _csv_line(self, p: Payload) -> bytes:
        buf = io.StringIO()
        row = self._flat_row(p, join_lists=True)
        csv.writer(buf, lineterminator="\n").writerow(["" if row[c] is None else row[c] for c in self._columns()])
        return buf.getvalue().encode("utf-8")

    @staticmethod
    def _json_line(p: Payload) -> bytes:
        d = p.to_dict()
        del d["destination"]
        return (json.dumps(d, separators=(",", ":"), sort_keys=True) + "\n").encode("utf-8")

    def _parquet(self, rows: list[Payload]) -> bytes:
        records = [self._flat_row(p, join_lists=False) for p in rows]
        columns = self._columns()
        try:
            table = pa.Table.from_pylist(records, schema=None)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed attribute types across profiles: fall back to strings for attribute columns.
            for r in records:
                for c in columns:
                    if c.startswith("attributes.") and r[c] is not None:
                        r[c] = str(r[c])
            table = pa.Table.from_pylist(records)
        table = table.select(columns)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    # -- storage ---------------------------------------------------------------------------------

    def _makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def _publish(self, final: str, data: bytes) -> None:
        """Write to a temp name in `_cdp/tmp`, then move to `final` (rename locally, copy+delete on s3,
        where the object appears whole at once)."""
        tmp = f"{self.root}/_cdp/tmp/{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError, OSError):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)

    def _write_spool(self, pending: list[Payload]) -> None:
        body = "".join(json.dumps(p.to_dict(), separators=(",", ":")) + "\n" for p in pending)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        self._publish(f"{self.root}/_cdp/spool/{name}", body.encode("utf-8"))

    def _read_jsonl(self, path: str) -> list[Payload]:
        with self.fs.open(path, "rb") as f:
            return [Payload.from_dict(json.loads(line)) for line in f.read().decode("utf-8").splitlines()
                    if line.strip()]

    def _read_snapshot(self) -> list[Payload]:
        path = f"{self.root}/_cdp/members.jsonl"
        return self._read_jsonl(path) if self.fs.exists(path) else []


def recent_manifests(settings: FileSettings, n: int = 5) -> list[dict[str, Any]]:
    """The manifests of the last `n` complete exports under the destination's path, newest first."""
    fs, root = fsspec.core.url_to_fs(settings.path, **dict(settings.storage_options))
    manifests = []
    for path in fs.glob(f"{root.rstrip('/')}/*/{MANIFEST_NAME}"):
        with fs.open(path, "rb") as f:
            manifests.append(json.load(f))
    return sorted(manifests, key=lambda m: (m.get("created_ms", 0), m.get("export_id", "")), reverse=True)[:n]


def read_manifest(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, Any]:
    """Load an export's manifest (helper for consumers and tests)."""
    with fs.open(f"{folder.rstrip('/')}/{MANIFEST_NAME}", "rb") as f:
        result: dict[str, Any] = json.load(f)
        return result


def parse_file_settings(doc: Doc, f: Fields, env: Env) -> FileSettings:
    """A file destination's own keys (path, format, mode, schedule, file limits, storage options)."""
    path = doc.string(f["path"][1], "path").rstrip("/")
    fmt = "csv"
    if "format" in f:
        fmt = doc.string(f["format"][1], "format")
        if fmt not in FORMATS:
            raise doc.error(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}", f["format"][1])
    mode = "incremental"
    if "mode" in f:
        mode = doc.string(f["mode"][1], "mode")
        if mode not in MODES:
            raise doc.error(f"unknown mode {mode!r}; valid: {', '.join(MODES)}", f["mode"][1])
    schedule = None
    if "schedule" in f:
        schedule = doc.string(f["schedule"][1], "schedule")
        if not _INTERVAL.match(schedule) and not croniter.is_valid(schedule):
            raise doc.error("schedule must be an interval like 15m, 1h, 30s, 1d or a cron expression",
                            f["schedule"][1])
        m = _INTERVAL.match(schedule)
        if m and int(m.group(1)) <= 0:
            raise doc.error("schedule interval must be positive", f["schedule"][1])
    storage: list[tuple[str, Any]] = []
    if "storage_options" in f:
        for key, (_, vnode) in doc.mapping(f["storage_options"][1], "storage_options").items():
            storage.append((key, SafeConstructor().construct_object(vnode, deep=True)))
    return FileSettings(
        path=path, format=cast(FileFormat, fmt), mode=cast(ExportMode, mode), schedule=schedule,
        max_rows_per_file=doc.integer(f["max_rows_per_file"][1], "max_rows_per_file", minimum=1)
        if "max_rows_per_file" in f else None,
        max_bytes_per_file=doc.integer(f["max_bytes_per_file"][1], "max_bytes_per_file", minimum=1)
        if "max_bytes_per_file" in f else None,
        storage_options=tuple(storage),
    )


register_kind("file", FileDestination, KindSettings(
    required=frozenset({"path"}),
    optional=frozenset({"format", "mode", "schedule", "max_rows_per_file", "max_bytes_per_file", "storage_options"}),
    parse=parse_file_settings))
