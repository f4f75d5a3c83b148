"""Property tests: the compiled engine agrees with the reference interpreter, and next_check_ms is sound."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.segments import SegmentEngine
from pipeline.segments.nodes import (
    BirthdayWithin,
)
from pipeline.segments.reference import reference_evaluate

from .audience_strategies import (
    EVENT_SETTINGS,
    SETTINGS,
    Scenario,
    audiences,
    event_audiences,
    numbered_audience,
    scenarios,
)
from .helpers import DAY, make_profile


def check_agreement(sc: Scenario) -> None:
    auds, profile, now = sc
    engine = SegmentEngine(auds)
    expected = reference_evaluate(auds, profile, now)
    got = {d.audience_id: d.qualified for d in engine.evaluate(profile, now)}
    assert got == expected, [a.query for a in auds]


def check_next(sc: Scenario, offsets: list[int]) -> None:
    auds, profile, now = sc
    engine = SegmentEngine(auds)
    for d in engine.evaluate(profile, now):
        nxt = d.next_check_ms
        if nxt is None:
            probes = [now + 1, now + 13_000, now + 400 * DAY] + [now + o for o in offsets]
        else:
            assert nxt > now, d
            probes = [nxt - 1] + [now + o % (nxt - now) for o in offsets]
        for t in probes:
            ref = reference_evaluate(auds, profile, t)
            assert ref[d.audience_id] == d.qualified, (d, t, [a.query for a in auds])


@SETTINGS
@given(scenarios(audiences()))
def test_compiled_engine_agrees_with_reference(sc: Scenario) -> None:
    # Given random audiences and a random profile, When both evaluators run, Then they agree.
    check_agreement(sc)


@EVENT_SETTINGS
@given(scenarios(event_audiences()))
def test_event_expressions_agree_at_window_edges(sc: Scenario) -> None:
    # Given one event expression and `now` on its window edges, When both evaluators run, Then they agree.
    check_agreement(sc)


offsets = st.lists(st.integers(0, 20_000), max_size=4)


@SETTINGS
@given(scenarios(audiences()), offsets)
def test_next_check_is_sound(sc: Scenario, offs: list[int]) -> None:
    # Given a decision at `now`, When time passes without new data, Then the result is unchanged before
    # next_check_ms (and forever when it is None).
    check_next(sc, offs)


@EVENT_SETTINGS
@given(scenarios(event_audiences()), offsets)
def test_next_check_is_sound_for_event_expressions(sc: Scenario, offs: list[int]) -> None:
    check_next(sc, offs)


@settings(max_examples=300, deadline=None)
@given(st.dates(dt.date(1948, 1, 1), dt.date(2008, 12, 31)), st.integers(1, 400),
       st.integers(0, 5 * 366 * DAY), st.sampled_from([0, 1, DAY - 1]), offsets)
def test_birthday_within_agrees_and_next_check_is_sound(born: dt.date, days: int, now: int, nudge: int,
                                                          offs: list[int]) -> None:
    # Given any birth date (29 Feb included) and any day, When checked, Then both evaluators agree and the
    # result holds until next_check_ms.
    auds = [numbered_audience(0, BirthdayWithin("person.birthDate", days))]
    profile = make_profile({"person.birthDate": born.isoformat()})
    now = now // DAY * DAY + nudge  # around midnight edges too
    check_agreement((auds, profile, now))
    check_next((auds, profile, now), [o * 1000 for o in offs])
