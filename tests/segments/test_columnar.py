"""The column-wise batch pre-check: where it knows a result, the engine agrees; where it settles a profile, the
engine would change nothing; what it cannot decide goes to the full path."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from pipeline.model import Membership, ProfileState
from pipeline.segments import AudienceDef, SegmentEngine
from pipeline.segments.columnar import Columns, Precheck
from pipeline.segments.nodes import Aggregate, EventExists, EventSpec
from pipeline.segments.nodes import Sequence as SeqNode
from pipeline.state.codec import encode_profile, profile_body

from .audience_strategies import (
    BASE,
    EVENT_SETTINGS,
    FIELD_PATHS,
    OPS,
    SETTINGS,
    STRINGS,
    TYPES,
    audiences,
    field_conds,
    numbered_audience,
    scenarios,
    seconds,
    window_durations,
    windows,
)
from .helpers import DAY, audience, make_profile

NOW = 100 * DAY


def columns(check: Precheck, *profiles: ProfileState) -> Columns:
    bodies = [profile_body(encode_profile(p)) for p in profiles]
    assert all(b is not None for b in bodies)
    return check.columns(bodies)  # type: ignore[arg-type]


def settled(engine: SegmentEngine, p: ProfileState, now: int) -> ProfileState:
    """The profile with the memberships streaming would have given it: a member of exactly what it qualifies for."""
    for d in engine.evaluate(p, now):
        if d.qualified:
            p.memberships[d.audience_id] = Membership(d.audience_id, "existing", now, 1, "", now)
    return p


MEMBERSHIP = st.sampled_from(["as-evaluated", "as-evaluated", "none", "realized", "existing", "exited", "old-version"])


Batch = tuple[list[AudienceDef], list[ProfileState], int]


@st.composite
def batches(draw: st.DrawFn, auds_strategy: st.SearchStrategy[list[AudienceDef]]) -> Batch:
    """Random audiences, 1-4 random profiles with memberships that mostly match their evaluation, and a `now`
    often on a window edge of the first profile."""
    auds = draw(auds_strategy)
    engine = SegmentEngine(auds)
    profiles: list[ProfileState] = []
    now = 0
    for i in range(draw(st.integers(1, 4))):
        _, p, t = draw(scenarios(st.just(auds)))
        now = now or t
        truth = {d.audience_id: d.qualified for d in engine.evaluate(p, now)}
        for a in auds:
            kind = draw(MEMBERSHIP)
            status = ("existing" if truth[a.id] else "exited") if kind == "as-evaluated" else kind
            if status != "none":
                version = 2 if status == "old-version" else 1
                p.memberships[a.id] = Membership(a.id, "existing" if status == "old-version" else status,  # type: ignore[arg-type]
                                                 0, version, "", 0)
        p.profile_id = f"p{i}"
        profiles.append(p)
    return auds, profiles, now


def check_batch(batch: Batch, more_nows: Sequence[int] = ()) -> None:
    auds, profiles, first = batch
    engine = SegmentEngine(auds)
    check = Precheck(engine)
    cols = columns(check, *profiles)
    for now in (first, *more_nows):
        results = check.evaluate(cols, now)
        may_change = check.may_change(cols, now)
        for row, p in enumerate(profiles):
            truth = {d.audience_id: d.qualified for d in engine.evaluate(p, now)}
            for aid, tri in results.items():
                if tri.known[row]:
                    assert bool(tri.value[row]) == truth[aid], (aid, engine.audiences[aid].query, row, now)
            if not may_change[row]:
                assert engine.decide(p, now)[0] == [], ([a.query for a in auds], row, now)


def edges(batch: Batch) -> list[int]:
    """Every time 1 ms around a window or gap edge of an event of the batch."""
    auds, profiles, _ = batch
    return sorted({e.ts_ms + d + o for p in profiles for e in p.events for d in window_durations(auds) for o in (-1, 0, 1)})


@SETTINGS
@given(batches(audiences()))
def test_known_results_agree_with_the_engine_and_settled_profiles_would_not_change(batch: Batch) -> None:
    # Given random audiences and profiles with random memberships, When the pre-check evaluates them
    # column-wise, Then every result it knows is the engine's, and a profile it settles is one that
    # decide() changes nothing of
    check_batch(batch)


# Event expressions whose conditions often match (few where-conditions, mostly numeric fields), so that window
# edges, gaps and aggregates decide the results.
_specs = st.builds(EventSpec, st.sampled_from(TYPES), st.none() | st.none() | field_conds, windows)
_followers = st.builds(EventSpec, st.sampled_from(TYPES), st.none() | st.none() | field_conds, st.none())
_event_nodes = st.one_of(
    st.builds(EventExists, _specs),
    st.builds(Aggregate, st.just("count"), st.none(), _specs, st.sampled_from(OPS), st.integers(0, 3)),
    st.builds(Aggregate, st.sampled_from(["sum", "avg", "min", "max"]), st.sampled_from(FIELD_PATHS), _specs,
              st.sampled_from(OPS), st.sampled_from([0, 1, 2, 3, 1.5, -1])),
    st.builds(SeqNode, _specs, _followers, seconds, st.booleans()),
)
# 4e15 + 0.25 - 4e15 is 0 in float64 and 0.25 exactly (fsum): sums where float64 alone would be wrong
_field_values = st.one_of(st.integers(-2, 3), st.sampled_from([0.5, 1.5, -1.5, 4e15, -4e15, 0.25]),
                          st.sampled_from(STRINGS), st.booleans(), st.none())


@st.composite
def event_batches(draw: st.DrawFn) -> Batch:
    """One event expression, 1-4 profiles of 0-6 events on whole seconds (plus off-by-ones), memberships
    mostly as evaluated, and `now` exactly on (or 1 ms around) a window or gap edge of some event."""
    auds = [numbered_audience(0, draw(_event_nodes))]
    stamps = st.one_of(st.builds(lambda s, d: BASE + 1000 * s + d, st.integers(-3, 12), st.sampled_from([0, 0, 1, 999])),
                       st.sampled_from([BASE - 1, BASE, BASE + 1]))  # around the `since` dates' midnights
    profiles = []
    for i in range(draw(st.integers(1, 4))):
        events = [(draw(st.sampled_from(TYPES)), draw(stamps),
                   {f: v for f in FIELD_PATHS if (v := draw(_field_values)) is not None})
                  for _ in range(draw(st.integers(0, 6)))]
        profiles.append(make_profile({}, events, profile_id=f"p{i}"))
    stamps_seen = [e.ts_ms for p in profiles for e in p.events] or [BASE]
    now = draw(st.sampled_from(stamps_seen)) + draw(st.sampled_from(window_durations(auds))) + draw(
        st.sampled_from([-1, 0, 0, 1]))
    engine = SegmentEngine(auds)
    for p in profiles:
        truth = engine.evaluate(p, now)[0].qualified
        kind = draw(st.sampled_from(["as-evaluated", "as-evaluated", "none", "existing"]))
        if kind == "existing" or (kind == "as-evaluated" and truth):
            p.memberships["s0"] = Membership("s0", "existing", 0, 1, "", 0)
    return auds, profiles, now


@EVENT_SETTINGS
@given(event_batches())
def test_event_expressions_agree_at_window_edges(batch: Batch) -> None:
    # Given one event expression, several profiles and `now` on a window or gap edge, When the pre-check
    # evaluates, Then it agrees with the engine wherever it knows the result, and settles only what decide()
    # would not change (at every edge time: the memberships were drawn for the first)
    check_batch(batch, edges(batch))


def bench_like_engine() -> SegmentEngine:
    return SegmentEngine([
        audience("shoe-fans", 'count(event productView where product.category = "shoes" within 7d) >= 2'),
        audience("spenders", "sum(commerce.order.total of event purchase within 30d) > 100"),
        audience("gold", 'loyalty.tier = "gold"'),
        audience("abandoners", "event cartAdd within 7d not followed by purchase within 1h"),
        audience("gold-spenders", 'inSegment("gold") and inSegment("spenders")'),
    ])


def shopper(pid: str, tier: str, shoes: int, total: float) -> ProfileState:
    events = [("productView", NOW - DAY - i, {"product.category": "shoes"}) for i in range(shoes)]
    events.append(("purchase", NOW - 2 * DAY, {"commerce.order.total": total}))
    return make_profile({"loyalty.tier": tier}, events, profile_id=pid)


def test_profiles_that_streaming_kept_current_are_all_settled() -> None:
    # Given profiles whose memberships are exactly what they qualify for
    engine = bench_like_engine()
    profiles = [settled(engine, shopper(f"p{i}", tier, i % 4, 50.0 * i + 7), NOW)
                for i, tier in enumerate(["gold", "silver", "gold", "bronze", "gold", "silver"])]
    check = Precheck(engine)
    cols = columns(check, *profiles)
    # When the pre-check runs over them
    results = check.evaluate(cols, NOW)
    # Then it knows every result and none of the profiles may change
    assert {aid: tri.known.tolist() for aid, tri in results.items()} == {aid: [True] * 6 for aid in engine.order}
    assert results["gold-spenders"].value.tolist() == [False, False, True, False, True, False]
    assert check.may_change(cols, NOW).tolist() == [False] * 6


def test_a_stale_membership_a_realized_one_and_an_old_version_go_to_the_full_path() -> None:
    # Given settled profiles, then: p1 left 'gold' in its data but not in its memberships; p2's membership is
    # 'realized' (it becomes 'existing' on evaluation); p3's was decided by an older version of the audience
    engine = bench_like_engine()
    profiles = [settled(engine, shopper(f"p{i}", "gold", 1, 10.0), NOW) for i in range(5)]
    profiles[1].attributes["loyalty.tier"] = profiles[1].attributes["loyalty.tier"].__class__("silver", "crm", 0)
    profiles[2].memberships["gold"].status = "realized"
    profiles[3].memberships["gold"].version = 0
    check = Precheck(engine)
    # When the pre-check runs
    may_change = check.may_change(columns(check, *profiles), NOW)
    # Then exactly those three go to the full path
    assert may_change.tolist() == [False, True, True, True, False]


def test_a_sum_on_its_threshold_is_left_to_the_engine() -> None:
    # Given a spend exactly at the 100 threshold, which float64 addition cannot be trusted to place
    engine = bench_like_engine()
    on_edge = settled(engine, shopper("p0", "gold", 0, 100.0), NOW)
    above = settled(engine, shopper("p1", "gold", 0, 100.5), NOW)
    check = Precheck(engine)
    # When the pre-check evaluates the spenders audience
    spenders = check.evaluate(columns(check, on_edge, above), NOW, ["spenders"])["spenders"]
    # Then the edge is unknown (the full path decides it) and the other is known
    assert spenders.known.tolist() == [False, True]
    assert spenders.value.tolist()[1] is True


def test_a_history_out_of_time_order_is_left_to_the_engine() -> None:
    # Given a profile whose stored history is not sorted by time (the engine's windows assume it is)
    engine = bench_like_engine()
    p = settled(engine, shopper("p0", "gold", 2, 10.0), NOW)
    p.events.reverse()
    check = Precheck(engine)
    # When the pre-check runs
    results = check.evaluate(columns(check, p), NOW)
    # Then its event audiences are unknown and its attribute audience known
    assert {aid: bool(tri.known[0]) for aid, tri in results.items()} == {
        "shoe-fans": False, "spenders": False, "gold": True, "abandoners": False, "gold-spenders": False}


def test_booleans_and_numbers_in_one_column_are_told_apart() -> None:
    # Given `flag = 1` and profiles with flag True, 1, 1.0 and absent (True == 1 in Python, not to the engine)
    engine = SegmentEngine([audience("one", "flag = 1")])
    profiles = [make_profile({"flag": v}, profile_id=f"p{i}") for i, v in enumerate([True, 1, 1.0, None])]
    check = Precheck(engine)
    # When the pre-check evaluates it
    one = check.evaluate(columns(check, *profiles), NOW)["one"]
    # Then only the numbers match, as in the engine
    assert one.value.tolist() == [False, True, True, False]
    assert [d.qualified for p in profiles for d in engine.evaluate(p, NOW)] == [False, True, True, False]


def test_removed_audiences_send_their_members_to_the_full_path() -> None:
    # Given two settled profiles, one a member of 'gold', and definitions from which 'gold' was then removed
    before = bench_like_engine()
    member = settled(before, shopper("p0", "gold", 0, 0.0), NOW)
    other = settled(before, shopper("p1", "silver", 0, 0.0), NOW)
    after = SegmentEngine([a for a in before.audiences.values() if a.id not in ("gold", "gold-spenders")])
    check = Precheck(after)
    bodies = [profile_body(encode_profile(p)) for p in (member, other)]
    # When a definitions walk exits the members of 'gold' and evaluates nothing else
    may_change = check.may_change(check.columns(bodies, ["gold"]), NOW, [], removed=["gold"])  # type: ignore[arg-type]
    # Then only its member goes to the full path (to exit it)
    assert may_change.tolist() == [True, False]
    # And columns built without the removed audience, or a request for an unknown one, send everyone
    assert check.may_change(check.columns(bodies), NOW, [], removed=["gold"]).tolist() == [True, True]  # type: ignore[arg-type]
    assert check.may_change(check.columns(bodies), NOW, ["no-such-audience"]).tolist() == [True, True]  # type: ignore[arg-type]


def test_a_sum_float64_would_get_wrong_is_left_to_the_engine() -> None:
    # Given orders of 4e15, 0.25 and -4e15: exactly 0.25 (the engine's fsum), but 0 when added in float64
    engine = SegmentEngine([audience("any-spend", "sum(commerce.order.total of event purchase within 30d) > 0")])
    p = make_profile({}, [("purchase", NOW - 3 * DAY + i, {"commerce.order.total": v})
                          for i, v in enumerate([4e15, 0.25, -4e15])])
    check = Precheck(engine)
    # When the pre-check evaluates it
    tri = check.evaluate(columns(check, p), NOW)["any-spend"]
    # Then it does not claim to know the result, and the engine qualifies the profile
    assert tri.known.tolist() == [False]
    assert engine.evaluate(p, NOW)[0].qualified is True
    assert check.may_change(columns(check, p), NOW).tolist() == [True]


def test_booleans_in_a_numeric_field_are_not_numbers() -> None:
    # Given events whose field `n` holds only booleans and numbers (True would count as 1 in float64)
    engine = SegmentEngine([audience("sum-n", "sum(n of event A within 30d) >= 2"),
                            audience("big-n", "count(event A where n >= 1 within 30d) >= 2")])
    profiles = [make_profile({}, [("A", NOW - DAY - i, {"n": v}) for i, v in enumerate(values)], profile_id=f"p{k}")
                for k, values in enumerate([[True, True], [1, 1.5], [True, 2]])]
    check = Precheck(engine)
    # When the pre-check evaluates them
    results = check.evaluate(columns(check, *profiles), NOW)
    # Then the booleans are left out, as the engine leaves them out
    assert {aid: tri.value.tolist() for aid, tri in results.items()} == {
        "sum-n": [False, True, True], "big-n": [False, True, False]}
    assert [[d.qualified for d in engine.evaluate(p, NOW)] for p in profiles] == [
        [False, False], [True, True], [True, False]]
