"""Audience definitions shared by every worker through `control.audiences`: the record a console save publishes
and what a worker does with the latest one (pure, but for the atomic file write; the reader thread and the
publisher are pipeline/segments/follow.py)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.segments.config import AudienceDef, load_segments_text

SEGMENTS_FILE = "segments.yaml"  # the record's key: the file of config_dir it carries


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SharedDefinitions:
    """One record of `control.audiences`: a whole segments file, who saved it and when."""

    text: str
    sha256: str
    worker: str
    at_ms: int

    def to_record(self) -> dict[str, Any]:
        return {"file": SEGMENTS_FILE, "text": self.text, "sha256": self.sha256, "worker": self.worker,
                "at_ms": self.at_ms}


def shared(text: str, worker: str, now_ms: int) -> SharedDefinitions:
    """The record a worker publishes after saving `text` into its own segments file."""
    return SharedDefinitions(text, digest(text), worker, now_ms)


def read_record(value: Any) -> SharedDefinitions:
    """A decoded record back; ConfigError when it is not one (a foreign or damaged value: its hash must match)."""
    if not isinstance(value, dict) or value.get("file") != SEGMENTS_FILE:
        raise ConfigError(f"not a {SEGMENTS_FILE} record")
    text, sha, worker, at_ms = value.get("text"), value.get("sha256"), value.get("worker"), value.get("at_ms")
    if not (isinstance(text, str) and isinstance(sha, str) and isinstance(worker, str) and isinstance(at_ms, int)):
        raise ConfigError("a definitions record needs text, sha256, worker and at_ms")
    if digest(text) != sha:
        raise ConfigError("the definitions text does not match its sha256")
    return SharedDefinitions(text, sha, worker, at_ms)


@dataclass(frozen=True)
class SyncDecision:
    """What to do with the latest shared definitions: write them into this worker's file or not, and why."""

    write: bool
    changed: tuple[str, ...] = ()  # the audience ids added, removed or changed (sorted)
    problem: ConfigError | None = None  # why the record is ignored: its text does not load as segments


def decide(record: SharedDefinitions, current: str | None) -> SyncDecision:
    """Write the record's text when it differs from this worker's file (`current`, None: no file) and loads as
    valid segments; a file that does not load itself is replaced whole (every audience of the record changed)."""
    if current == record.text:
        return SyncDecision(False)
    try:
        new = load_segments_text(record.text, file=f"control.audiences:{SEGMENTS_FILE}") \
            if record.text.strip() else []
    except ConfigError as exc:
        return SyncDecision(False, problem=exc)
    try:
        old = load_segments_text(current, file=SEGMENTS_FILE) if current and current.strip() else []
    except ConfigError:
        old = []
    return SyncDecision(True, changed_audiences(old, new))


def changed_audiences(old: list[AudienceDef], new: list[AudienceDef]) -> tuple[str, ...]:
    """The ids whose definition differs between two loads (added, removed or with any field changed)."""
    before, after = {a.id: a for a in old}, {a.id: a for a in new}
    return tuple(sorted(i for i in before.keys() | after.keys() if before.get(i) != after.get(i)))


def write_atomically(path: Path, text: str, tag: str) -> None:
    """Whole or not at all (a temporary file in the same folder, then a rename): the hot reload never reads half
    a file. `tag` keeps two writers' temporary files apart."""
    tmp = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
