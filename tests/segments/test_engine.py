"""Compiled engine: each construct's result, cause and next_check_ms; affected(); explain(); ordering."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ConfigError, UnknownNameError
from pipeline.model import Scalar, StoredEvent
from pipeline.segments import SegmentEngine
from pipeline.segments.engine import _OPS, _count_change

from .helpers import DAY, HOUR, MINUTE, audience, decide, engine, make_profile

T0 = 1_780_000_000_000  # 2026-05-28T...Z


def test_attribute_comparisons() -> None:
    p = make_profile({"loyalty.tier": "gold", "loyalty.points": 1200, "consents.email": "yes",
                      "person.birthDate": "1990-06-01", "consents.sms": False})
    assert decide('loyalty.tier = "gold"', p, T0) == (True, None, None)
    assert decide("loyalty.points >= 1000 and loyalty.points < 1200.5", p, T0)[0]
    assert not decide('loyalty.tier != "gold"', p, T0)[0]
    assert decide('loyalty.tier in ["silver", "gold"]', p, T0)[0]
    assert decide("person.birthDate < date(\"2000-01-01\") and person.birthDate >= \"1990-06-01\"", p, T0)[0]
    assert decide("consents.sms = false and person.birthDate exists and not person.city exists", p, T0)[0]
    assert decide('startsWith(loyalty.tier, "go") and contains(loyalty.tier, "ol")', p, T0)[0]
    # missing values and other types never match, not even with !=
    assert not decide('person.city != "London"', p, T0)[0]
    assert not decide('loyalty.points = "1200"', p, T0)[0]
    assert not decide("consents.sms = 0", p, T0)[0]


def test_birthday_within_and_its_next_check() -> None:
    # Given a birthday on 2026-06-03 and today 2026-05-28, When checked for 7 days, Then it qualifies and
    # next_check is the midnight after the birthday.
    p = make_profile({"person.birthDate": "1990-06-03"})
    today = 1_780_000_000_000 // DAY * DAY  # 2026-05-28T00:00Z
    q, nxt, _ = decide("birthdayWithin(person.birthDate, 7d)", p, today + HOUR)
    assert q and nxt == today + 7 * DAY
    # 3 days: not yet; it starts to qualify at the midnight two days before the birthday
    q, nxt, _ = decide("birthdayWithin(person.birthDate, 3d)", p, today + HOUR)
    assert not q and nxt == today + 4 * DAY
    # exactly N days away is outside "within N days" (today counts as day 0)
    assert not decide("birthdayWithin(person.birthDate, 6d)", p, today)[0]
    assert decide("birthdayWithin(person.birthDate, 7d)", p, today + DAY - 1)[0]
    # 29 Feb birthdays fall on 28 Feb in non-leap years
    leap = make_profile({"person.birthDate": "2000-02-29"})
    assert decide("birthdayWithin(person.birthDate, 1d)", leap, 1_803_772_800_000)[0]  # 2027-02-28


def test_event_in_window_and_edges() -> None:
    # Given a shoe view 30 minutes ago, When checking within 30m, Then it counts exactly at the edge and
    # next_check is the first ms it falls out.
    p = make_profile(events=[("productView", T0 - 30 * MINUTE, {"product.category": "shoes"}),
                             ("productView", T0 - 5 * MINUTE, {"product.category": "hats"})])
    q = 'event productView where product.category = "shoes" within 30m'
    assert decide(q, p, T0) == (True, T0 + 1, "e0")
    assert decide(q, p, T0 + 1) == (False, None, None)
    assert decide('event productView where product.category = "shoes" since "2026-01-01"', p, T0)[0]
    assert decide("event productView", p, T0) == (True, None, "e1")


def test_count_and_aggregates() -> None:
    views: list[tuple[str, int, dict[str, Scalar]]] = [("productView", T0 - k * HOUR, {"product.category": "shoes"}) for k in (1, 30, 100)]
    buys: list[tuple[str, int, dict[str, Scalar]]] = [("purchase", T0 - k * DAY, {"commerce.order.total": t}) for k, t in ((1, 300), (10, 250.5), (40, 999))]
    p = make_profile(events=views + buys)
    q, nxt, cause = decide('count(event productView where product.category = "shoes" within 7d) >= 3', p, T0)
    assert q and cause is not None and nxt == T0 - 100 * HOUR + 7 * DAY + 1
    q, nxt, _ = decide('count(event productView within 2d) >= 2', p, T0)
    assert q and nxt == T0 - 30 * HOUR + 2 * DAY + 1  # the older one leaving drops the count to 1
    q, nxt, _ = decide("sum(commerce.order.total of event purchase within 30d) > 500", p, T0)
    assert q and nxt == T0 - 10 * DAY + 30 * DAY + 1
    assert decide("avg(commerce.order.total of event purchase within 30d) = 275.25", p, T0)[0]
    assert decide("min(commerce.order.total of event purchase within 90d) = 250.5", p, T0)[0]
    assert decide("max(commerce.order.total of event purchase within 90d) = 999", p, T0)[0]
    assert not decide("max(commerce.order.total of event login within 90d) >= 0", p, T0)[0]  # undefined
    assert decide("sum(commerce.order.total of event login within 90d) = 0", p, T0)[0]


def test_abandonment_qualifies_only_after_the_gap() -> None:
    # Given a cart add with no purchase, When less than an hour has passed, Then not yet (next check at
    # the hour); Then it qualifies one ms after the hour, until it leaves the 7-day window.
    add = T0 - 30 * MINUTE
    p = make_profile(events=[("cartAdd", add, {"product.sku": "s1"})])
    q = "event cartAdd within 7d not followed by purchase within 1h"
    assert decide(q, p, T0) == (False, add + HOUR + 1, None)
    assert decide(q, p, add + HOUR) == (False, add + HOUR + 1, None)
    assert decide(q, p, add + HOUR + 1) == (True, add + 7 * DAY + 1, "e0")
    # a purchase exactly at the hour still counts as following
    bought = make_profile(events=[("cartAdd", add, {}), ("purchase", add + HOUR, {})])
    assert decide(q, bought, add + 2 * HOUR) == (False, None, None)
    late = make_profile(events=[("cartAdd", add, {}), ("purchase", add + HOUR + 1, {})])
    assert decide(q, late, add + 2 * HOUR)[0]


def test_sequence_followed_by() -> None:
    p = make_profile(events=[("productView", T0 - 20 * MINUTE, {}), ("cartAdd", T0 - 10 * MINUTE, {}),
                             ("productView", T0 - 5 * MINUTE, {})])
    assert decide("event productView followed by cartAdd within 10m", p, T0) == (True, None, "e1")
    assert not decide("event productView followed by cartAdd within 9m", p, T0)[0]
    # the follower must come after: a cart add before the view does not count
    assert not decide("event cartAdd followed by event cartAdd within 1h", p, T0)[0]
    q, nxt, _ = decide("event productView within 1h followed by cartAdd within 10m", p, T0)
    assert q and nxt == T0 - 20 * MINUTE + HOUR + 1


def test_in_segment_uses_this_call_then_memberships() -> None:
    # Given gold computed in the same call, When vip reads inSegment("gold"), Then it sees that result.
    eng = engine(gold='loyalty.tier = "gold"', churned="event login within 1d", vip='inSegment("gold")')
    p = make_profile({"loyalty.tier": "gold"}, memberships={"gold": "exited"})
    assert {d.audience_id: d.qualified for d in eng.evaluate(p, T0)}["vip"]
    # Given only vip evaluated, Then it reads the stored membership (exited -> false)
    [d] = eng.evaluate(p, T0, ["vip"])
    assert not d.qualified
    p.memberships["gold"].status = "existing"
    assert eng.evaluate(p, T0, ["vip"])[0].qualified
    # next_check of a segment computed in the call propagates
    p2 = make_profile(events=[("login", T0 - HOUR, {})])
    eng2 = engine(gold="a = 1", recent="event login within 1d", dep='inSegment("recent") and not inSegment("gold")')
    d = {x.audience_id: x for x in eng2.evaluate(p2, T0)}["dep"]
    assert d.qualified and d.next_check_ms == T0 - HOUR + DAY + 1


def test_decision_reason_names_the_rule_and_event() -> None:
    p = make_profile({"loyalty.tier": "silver"}, events=[("login", T0, {})])
    eng = engine(a='loyalty.tier = "gold" and event login within 1d', b='event login within 1d')
    da, db = eng.evaluate(p, T0)
    assert da.reason == 'not qualified: loyalty.tier = "gold"'
    assert db.reason == "qualified: event login within 1d (event e0)" and db.cause_event_id == "e0"
    assert eng.next_deadline([da, db]) == T0 + DAY + 1


def test_evaluation_order_and_unknown_ids() -> None:
    eng = engine(vip='inSegment("gold") and inSegment("big")', gold="a = 1", big="b = 1")
    assert eng.order == ["gold", "big", "vip"]
    assert [d.audience_id for d in eng.evaluate(make_profile(), T0, ["vip", "gold"])] == ["gold", "vip"]
    with pytest.raises(UnknownNameError):
        eng.evaluate(make_profile(), T0, ["nope"])
    with pytest.raises(ConfigError, match="cycle"):
        engine(a='inSegment("b")', b='inSegment("a")')
    with pytest.raises(ConfigError, match="unknown audience"):
        engine(a='inSegment("zzz")')


def test_affected_is_indexed_and_transitive() -> None:
    eng = engine(shoes="count(event productView within 7d) >= 3", gold='loyalty.tier = "gold"',
                 vip='inSegment("gold") and inSegment("shoes")', top='inSegment("vip")',
                 abandon="event cartAdd within 7d not followed by purchase within 1h", other="x = 1")
    assert eng.affected(event_types=["productView"]) == ["shoes", "vip", "top"]
    assert eng.affected(event_types=["purchase"]) == ["abandon"]
    assert eng.affected(attributes=["loyalty.tier"]) == ["gold", "vip", "top"]
    assert eng.affected(segments=["vip"]) == ["top"]
    assert eng.affected(event_types=["login"], attributes=["person.city"]) == []
    assert eng.affected(all_=True) == eng.order


def test_explain_eligible_and_not() -> None:
    eng = SegmentEngine([audience("gold", 'loyalty.tier = "gold"'),
                         audience("recent", "event pageView within 24h"),
                         audience("long", "count(event purchase within 120d) > 2"),
                         audience("since", 'event purchase since "2026-01-01"')],
                        history_retention_ms=30 * DAY)
    gold, recent, long, since = eng.explain()
    assert (gold.streaming, gold.batch, gold.edge) == (True, True, True)
    assert (recent.streaming, recent.batch, recent.edge) == (True, True, False)
    assert (long.streaming, long.batch, long.edge) == (False, True, False)
    assert "window 120d of event purchase exceeds event-history retention 30d" in long.reason
    assert not since.streaming and "fixed start" in since.reason
    assert eng.explain("recent") == [recent]
    with pytest.raises(UnknownNameError):
        eng.explain("nope")


@given(st.integers(0, 12), st.sampled_from(["=", "!=", "<", "<=", ">", ">="]),
       st.one_of(st.integers(-2, 14), st.sampled_from([0.5, 2.5, 3.0, -1.5, 11.99])), st.data())
def test_count_change_is_the_first_match_whose_leaving_flips_the_result(c: int, op: str, value: float,
                                                                        data: st.DataObject) -> None:
    # Given c in-window matches (some sharing a timestamp: they leave together) and `count op value`
    stamps = sorted(data.draw(st.lists(st.integers(0, 5), min_size=c, max_size=c)))
    matches = [StoredEvent(f"e{i}", "t", ts, "web", {}) for i, ts in enumerate(stamps)]
    cmp = _OPS[op]
    cur = cmp(c, value)
    # When the engine computes which match's leaving changes the result
    got = _count_change(matches, cur, op, value, cmp)  # type: ignore[arg-type]
    # Then it leaves when the first group of matches (by timestamp) whose leaving flips the result does
    want = next((k for k in range(c) if (k + 1 == c or stamps[k + 1] != stamps[k])
                 and cmp(c - k - 1, value) != cur), None)
    assert (got is None, stamps[got] if got is not None else None) == (want is None,
                                                                       stamps[want] if want is not None else None)
