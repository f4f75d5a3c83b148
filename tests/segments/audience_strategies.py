"""Hypothesis strategies of audiences, profiles and evaluation times, shared by the reference-agreement and
column-wise pre-check property tests."""
from __future__ import annotations

import datetime as dt

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pipeline.model import ProfileState, Scalar
from pipeline.segments import AudienceDef, parse_query, to_text
from pipeline.segments.nodes import (
    Aggregate,
    And,
    BirthdayWithin,
    Compare,
    Const,
    Contains,
    DateValue,
    Duration,
    EventExists,
    EventSpec,
    Exists,
    InList,
    InSegment,
    Node,
    Not,
    Or,
    Since,
    StartsWith,
    Value,
    Within,
    walk,
)
from pipeline.segments.nodes import Sequence as SeqNode

from .helpers import DAY, make_profile

Scenario = tuple[list[AudienceDef], ProfileState, int]
BASE = DAY  # 1970-01-02T00:00Z: events cluster around it so `since` dates cut through them
DATES = ["1990-01-02", "1990-01-05", "1990-01-01", "2000-02-29", "1991-12-31", "1969-12-31"]
STRINGS = ["x", "xy", "y", "", 'q"\\']
ATTR_PATHS = ["a", "b.c", "d"]
FIELD_PATHS = ["f", "g"]
TYPES = ["A", "B"]
WINDOW_S = [1, 2, 3, 5, 8]
OPS = ["=", "!=", "<", "<=", ">", ">="]

scalars: st.SearchStrategy[Scalar] = st.one_of(
    st.none(), st.integers(-2, 5), st.sampled_from([0.5, 2.5, -1.5]), st.sampled_from(STRINGS),
    st.booleans(), st.sampled_from(DATES + ["bad", "2000-13-01"]))
dates = st.sampled_from(DATES).map(lambda s: DateValue(dt.date.fromisoformat(s).toordinal()))
literals: st.SearchStrategy[Value] = st.one_of(
    st.integers(-2, 5), st.sampled_from([0.5, 2.5]), st.sampled_from(STRINGS), dates)


def leaf(paths: list[str]) -> st.SearchStrategy[Node]:
    p = st.sampled_from(paths)
    return st.one_of(
        st.builds(Compare, p, st.sampled_from(OPS), literals),
        st.builds(Compare, p, st.sampled_from(["=", "!="]), st.booleans()),
        st.builds(InList, p, st.lists(st.one_of(literals, st.booleans()), max_size=3).map(tuple)),
        st.builds(Exists, p),
        st.builds(StartsWith, p, st.sampled_from(STRINGS)),
        st.builds(Contains, p, st.sampled_from(STRINGS)),
        st.builds(Const, st.booleans()),
    )


def boolean(base: st.SearchStrategy[Node], leaves: int) -> st.SearchStrategy[Node]:
    return st.recursive(base, lambda ch: st.one_of(
        st.builds(Not, ch),
        st.lists(ch, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
        st.lists(ch, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs)))), max_leaves=leaves)


field_conds = boolean(leaf(FIELD_PATHS), 2)
seconds = st.sampled_from(WINDOW_S).map(lambda k: Duration(k * 1000, f"{k}s"))
windows = st.one_of(st.builds(Within, seconds), st.builds(Within, seconds), st.none(),
                    st.sampled_from(["1970-01-02", "1970-01-01", "1970-01-03"]).map(
                        lambda s: Since(DateValue(dt.date.fromisoformat(s).toordinal()))))
specs = st.builds(EventSpec, st.sampled_from(TYPES), st.none() | field_conds, windows)
followers = st.builds(EventSpec, st.sampled_from(TYPES), st.none() | field_conds, st.none())
event_nodes: st.SearchStrategy[Node] = st.one_of(
    st.builds(EventExists, specs),
    st.builds(Aggregate, st.just("count"), st.none(), specs, st.sampled_from(OPS), st.integers(0, 4)),
    st.builds(Aggregate, st.sampled_from(["sum", "avg", "min", "max"]), st.sampled_from(FIELD_PATHS), specs,
              st.sampled_from(OPS), st.sampled_from([0, 1, 2, 3, 1.5, -1])),
    st.builds(SeqNode, specs, followers, seconds, st.booleans()),
)


def numbered_audience(i: int, ast: Node) -> AudienceDef:
    text = to_text(ast)
    parsed = parse_query(text)  # the parser is exercised on every generated audience
    assert parsed == ast, text
    return AudienceDef(f"s{i}", f"s{i}", "", text, 1, (), parsed)


def _top(refs: int) -> st.SearchStrategy[Node]:
    seg = [st.sampled_from([InSegment(f"s{j}") for j in range(refs)])] if refs else []
    base = st.one_of(leaf(ATTR_PATHS), event_nodes, event_nodes,
                     st.builds(BirthdayWithin, st.sampled_from(ATTR_PATHS), st.integers(1, 9)), *seg)
    return boolean(base, 3)


# Built once: constructing strategies inside a draw makes hypothesis re-validate them every example.
TOP = [_top(k) for k in range(3)]


@st.composite
def audiences(draw: st.DrawFn) -> list[AudienceDef]:
    """1-3 audiences mixing attribute, event and inSegment() (of earlier ones) under and/or/not."""
    return [numbered_audience(i, draw(TOP[i])) for i in range(draw(st.integers(1, 3)))]


@st.composite
def event_audiences(draw: st.DrawFn) -> list[AudienceDef]:
    """One audience that is a single event expression, so window edges decide the result."""
    return [numbered_audience(0, draw(event_nodes))]


def window_durations(auds: list[AudienceDef]) -> list[int]:
    out = {0}
    for a in auds:
        for n in walk(a.ast):
            if isinstance(n, EventExists | Aggregate):
                specs_ = [n.spec]
            elif isinstance(n, SeqNode):
                specs_ = [n.first]
                out.add(n.gap.ms)
            else:
                specs_ = []
            out.update(s.window.duration.ms for s in specs_ if isinstance(s.window, Within))
    return sorted(out)


@st.composite
def scenarios(draw: st.DrawFn, auds_strategy: st.SearchStrategy[list[AudienceDef]]) -> Scenario:
    """Audiences, a profile, and a `now` that often sits exactly on (or 1 ms around) a window edge."""
    auds = draw(auds_strategy)
    attrs = {p: v for p in ATTR_PATHS if (v := draw(scalars)) is not None}
    # Timestamps on whole seconds (plus a few off-by-one) so windows and gaps line up exactly.
    stamps = st.builds(lambda s, d: BASE + 1000 * s + d, st.integers(-3, 15), st.sampled_from([0, 0, 0, 1, 999]))
    events = [(draw(st.sampled_from(TYPES)), draw(stamps),
               {f: v for f in FIELD_PATHS if (v := draw(scalars)) is not None})
              for _ in range(draw(st.integers(0, 6)))]
    profile = make_profile(attrs, events)
    if events and draw(st.integers(0, 9)) < 7:
        _, ts, _ = draw(st.sampled_from(events))
        now = ts + draw(st.sampled_from(window_durations(auds))) + draw(st.sampled_from([-1, 0, 0, 1]))
    else:
        now = draw(st.one_of(st.integers(BASE - 6000, BASE + 30000), st.integers(BASE - 3 * DAY, BASE + 400 * DAY)))
    return auds, profile, now


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVENT_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
