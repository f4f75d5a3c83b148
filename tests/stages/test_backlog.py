"""The stage backlog ingest waits on: per partition, the latest figure each agent reported, stale ones left out."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.stages.backlog import StageBacklog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass(frozen=True)
class Message:
    tp: TP
    offset: int


@dataclass(frozen=True)
class Event:
    message: Message


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


def test_a_batch_of_events_reports_each_partition_after_its_last_event() -> None:
    # Given a batch with events of two partitions, and their high watermarks (one not fetched yet)
    backlog = StageBacklog(1, clock=Clock())
    a, b, c = TP("identity", 0), TP("identity", 1), TP("identity", 2)
    events = [Event(Message(a, 10)), Event(Message(b, 4)), Event(Message(a, 11)), Event(Message(c, 7))]
    high = {a: 50, b: 5, c: None}
    # When the batch is noted
    backlog.note_events(events, high.get)
    # Then partition 0 is 50 - 12 behind, partition 1 caught up, partition 2 unknown (not counted)
    assert backlog.behind() == 38
    assert dict((k, v) for k, (v, _) in backlog._behind.items()) == {("identity", 0): 38, ("identity", 1): 0}
