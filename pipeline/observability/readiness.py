"""Why the worker cannot do its work right now: GET /readyz and the cdp_ready / cdp_not_ready gauges read it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.observability import metrics


@dataclass(frozen=True)
class Assignment:
    """The group assignment whose tables this worker has recovered: Faust's generation and the stage partitions
    it got then (logical topic -> partitions). Workers settled on the latest rebalance all report the same
    generation, and their partitions cover every stage partition once: what tests and tools wait for, since
    "ready" alone is also true of a worker the latest rebalance has not reached yet."""

    generation: int
    partitions: dict[str, list[int]]

    def body(self) -> dict[str, Any]:
        return {"generation": self.generation, "partitions": self.partitions}


class Readiness:
    """Reasons the worker is not ready (reason -> detail, e.g. "kafka" -> "brokers unreachable for 42 s").
    Set and cleared by whatever notices (the outage watch, the ingest loop); ready when there is none."""

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self._reasons: dict[str, str] = {}
        self.assignment: Assignment | None = None  # None until the first assignment is recovered
        metrics.READY.set(1)
        for reason, detail in (initial or {}).items():
            self.set(reason, detail)

    @property
    def ready(self) -> bool:
        return not self._reasons

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    def body(self) -> dict[str, Any]:
        """GET /readyz's body: `ready`, the `reasons` when not, and the recovered assignment once there is one."""
        out: dict[str, Any] = {"ready": self.ready}
        if self._reasons:
            out["reasons"] = [f"{r}: {d}" for r, d in sorted(self._reasons.items())]
        if self.assignment is not None:
            out.update(self.assignment.body())
        return out

    def set(self, reason: str, detail: str) -> None:
        self._reasons[reason] = detail
        metrics.NOT_READY.labels(reason).set(1)
        metrics.READY.set(0)

    def clear(self, reason: str) -> None:
        if self._reasons.pop(reason, None) is not None:
            metrics.NOT_READY.labels(reason).set(0)
        metrics.READY.set(0 if self._reasons else 1)
