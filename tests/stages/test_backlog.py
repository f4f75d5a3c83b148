"""The stage backlog ingest waits on: per partition, the latest figure each agent reported, stale ones left out."""

from __future__ import annotations

from pipeline.stages.backlog import StageBacklog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_backlog_is_the_latest_figure_per_partition_summed() -> None:
    # Given a backlog with a limit of 100
    clock = Clock()
    backlog = StageBacklog(100, stale_s=5.0, clock=clock)
    # When two partitions report, and the first again
    backlog.note("identity", 0, 80)
    backlog.note("profile-ops", 3, 30)
    backlog.note("identity", 0, 60)
    # Then the backlog is 60 + 30, over the limit
    assert (backlog.behind(), backlog.over()) == (90, False)
    backlog.note("profile-ops", 3, 41)
    assert (backlog.behind(), backlog.over()) == (101, True)


def test_a_figure_no_one_updates_stops_counting() -> None:
    # Given a partition far behind, reported 4 s ago, and one reported now
    clock = Clock()
    backlog = StageBacklog(10, stale_s=5.0, clock=clock)
    backlog.note("identity", 0, 500)
    clock.t += 4.0
    backlog.note("identity", 1, 3)
    assert backlog.over()
    # When 2 s more pass (its agent stopped reporting: revoked, rebalancing)
    clock.t += 2.0
    # Then only the fresh figure counts, and ingest is not held on the stale one
    assert (backlog.behind(), backlog.over()) == (3, False)


def test_no_limit_means_no_brake() -> None:
    backlog = StageBacklog(0, clock=Clock())
    backlog.note("identity", 0, 1_000_000)
    assert (backlog.behind(), backlog.over()) == (1_000_000, False)


def test_a_partition_no_longer_consumed_here_stops_counting_at_once() -> None:
    # Given two partitions behind
    backlog = StageBacklog(10, clock=Clock())
    backlog.note("identity", 0, 30)
    backlog.note("identity", 1, 5)
    # When partition 0 moves to another worker
    backlog.forget("identity", 0)
    # Then only partition 1 counts (without waiting for the figure to go stale)
    assert (backlog.behind(), backlog.over()) == (5, False)
