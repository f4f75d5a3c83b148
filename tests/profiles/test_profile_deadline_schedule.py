"""Tests of the in-memory deadline schedule: one live entry per profile, however often its deadline is noted."""

from __future__ import annotations

from pipeline.profiles.deadlines import Deadlines


def test_a_deadline_noted_on_every_write_is_scheduled_once_and_fires_once() -> None:
    # Given a profile written 10,000 times with the same deadline, and another whose deadline moved twice
    d = Deadlines()
    for _ in range(10_000):
        d.note("p1", 100)
    d.note("p2", 50)
    d.note("p2", 300)
    d.note("p2", 80)
    d.note("p3", None)
    # Then the schedule holds one entry per profile, not one per write
    assert len(d) == 2 and len(d.heap) == 4
    # And each fires once, at its latest due time only
    assert d.due(49) == []
    assert d.due(99) == ["p2"]
    assert d.due(10_000) == ["p1"]
    assert d.due(10_000) == [] and len(d) == 0


def test_a_deadline_noted_again_after_firing_fires_again() -> None:
    d = Deadlines()
    d.note("p1", 10)
    assert d.due(10) == ["p1"]
    d.note("p1", 10)  # the tick's evaluation left the same deadline
    assert d.due(10) == ["p1"]


def test_entries_left_behind_by_moving_deadlines_are_dropped() -> None:
    # Given 100 profiles whose deadlines move 100 times each (10,000 pushes)
    d = Deadlines()
    for step in range(100):
        for p in range(100):
            d.note(f"p{p}", 1000 + step)
    # Then the heap stays bounded by the live entries, and only the latest due times fire
    assert len(d) == 100 and len(d.heap) <= 2 * 100 + 1024
    assert d.due(1098) == []
    assert d.due(1099) == sorted(f"p{p}" for p in range(100))
