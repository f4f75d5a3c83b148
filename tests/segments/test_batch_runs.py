"""Batch-run bookkeeping: the start of the last run that completed on every partition."""

from pipeline.segments.batch import batch_request, last_completed_start
from pipeline.stages.messages import Batch


def final(run: str, part: int, started: int) -> dict:
    return {"op": "progress", "run": run, "partition": part, "final": True, "started_ms": started}


def test_only_runs_reported_by_every_partition_count():
    # Given run a (complete, started at 100), run b (complete, 300), run c (partition 1 missing, 500) and
    # run d (partition 1 stopped early: revoked mid-walk, 700)
    progress = [final("a", 0, 100), final("a", 1, 100), final("b", 1, 300), final("b", 0, 300),
                {"op": "progress", "run": "c", "partition": 0, "final": False, "started_ms": 500},
                final("c", 0, 500), final("d", 0, 700), {**final("d", 1, 700), "aborted": True}]
    # Then the last completed run is b
    assert last_completed_start(progress, partitions=2) == 300
    assert last_completed_start([], partitions=2) == 0


def test_batch_request_defaults_to_every_audience():
    req = batch_request("r1", [], 0, started_ms=42)
    assert req == Batch(run="r1", audiences=[], since_ms=0, kind="batch", started_ms=42)
