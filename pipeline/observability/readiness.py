"""Why the worker cannot do its work right now: GET /readyz and the cdp_ready / cdp_not_ready gauges read it."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.observability import metrics


class Readiness:
    """Reasons the worker is not ready (reason -> detail, e.g. "kafka" -> "brokers unreachable for 42 s").
    Set and cleared by whatever notices (the outage watch, the ingest loop); ready when there is none."""

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self._reasons: dict[str, str] = {}
        metrics.READY.set(1)
        for reason, detail in (initial or {}).items():
            self.set(reason, detail)

    @property
    def ready(self) -> bool:
        return not self._reasons

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    def set(self, reason: str, detail: str) -> None:
        self._reasons[reason] = detail
        metrics.NOT_READY.labels(reason).set(1)
        metrics.READY.set(0)

    def clear(self, reason: str) -> None:
        if self._reasons.pop(reason, None) is not None:
            metrics.NOT_READY.labels(reason).set(0)
        metrics.READY.set(0 if self._reasons else 1)
