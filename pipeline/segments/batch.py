"""Batch runs: the request fanned out to every profile-ops partition, and finding the last completed run.

A run is one `batch` message per partition (explicit partition), so each partition's owner evaluates its
own profiles in order with its other messages and reports progress on `control.segments`. An incremental
run only evaluates profiles changed since the start of the last run that completed on every partition.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from pipeline.stages.messages import Batch


def new_run_id(prefix: str = "run") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def batch_request(run: str, audiences: list[str], since_ms: int, kind: str = "batch",
                  started_ms: int | None = None) -> Batch:
    """The message each partition receives; an empty audience list means every audience."""
    return Batch(run=run, audiences=audiences, since_ms=since_ms, kind=kind,
                 started_ms=started_ms if started_ms is not None else int(time.time() * 1000))


def last_completed_start(progress: Iterable[dict[str, Any]], partitions: int) -> int:
    """Start time of the latest run whose final report arrived from every partition (0 if none); a partition
    that stopped early (revoked mid-walk) did not complete it."""
    finals: dict[str, set[int]] = {}
    starts: dict[str, int] = {}
    for m in progress:
        if m.get("op") == "progress" and m.get("final") and m.get("started_ms") and not m.get("aborted"):
            finals.setdefault(m["run"], set()).add(int(m["partition"]))
            starts[m["run"]] = int(m["started_ms"])
    complete = [starts[r] for r, parts in finals.items() if len(parts) >= partitions]
    return max(complete, default=0)
