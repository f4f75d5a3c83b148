"""Evidence for a membership (`pipeline.segments.explain`): the profile's events, attributes and memberships a query
reads, as the lines a customer lookup shows."""

from __future__ import annotations

import datetime as dt

from pipeline.model import AttributeValue, Membership, ProfileState
from pipeline.segments.explain import dates_text, evidence, membership_evidence

from .helpers import audience, make_profile


def at(month: int, day: int, hour: int = 12, year: int = 2026) -> int:
    return int(dt.datetime(year, month, day, hour, tzinfo=dt.UTC).timestamp() * 1000)


NOW = at(11, 16, 9)
SHOES = 'count(event commerce.productViewed where product.category = "shoes" within 7d) >= 3'


def shoe_viewer() -> ProfileState:
    # three shoe views in the window (12, 14, 15 Nov), a hat view, and a shoe view older than 7 days
    return make_profile(events=[
        ("commerce.productViewed", at(11, 12), {"product.category": "shoes"}),
        ("commerce.productViewed", at(11, 14), {"product.category": "shoes"}),
        ("commerce.productViewed", at(11, 14, 13), {"product.category": "hats"}),
        ("commerce.productViewed", at(11, 15), {"product.category": "shoes"}),
        ("commerce.productViewed", at(11, 1), {"product.category": "shoes"}),
    ], memberships={"shoe-lovers": "realized"})


def test_a_count_audience_lists_the_matching_events_dates() -> None:
    # Given a profile with three shoe views in the last 7 days and a member of a within-7d count audience
    p = shoe_viewer()
    # When its membership is explained
    lines = membership_evidence(audience("shoe-lovers", SHOES), p, NOW)
    # Then one line: the count, the filter, the window, the threshold and the days
    assert lines == ['3 commerce.productViewed (product.category = "shoes") in the last 7 days (needs count >= 3): '
                     "12, 14 and 15 Nov 2026"]


def test_an_attribute_audience_shows_value_dataset_and_time_and_hides_identity_values() -> None:
    # Given a gold customer whose tier came from the CRM, and whose custom attribute repeats the e-mail identity
    p = make_profile(memberships={"gold": "existing"})
    p.attributes["loyalty.tier"] = AttributeValue("gold", "crm", at(11, 10, 9))
    p.attributes["loyalty.points"] = AttributeValue(1200.0, "pos", at(11, 11, 17))
    p.attributes["custom.contact"] = AttributeValue("A@Example.com", "web", at(11, 12, 8))
    query = 'loyalty.tier = "gold" and (loyalty.points > 1000 or custom.contact exists) and not person.city exists'
    # When explained
    lines = membership_evidence(audience("gold", query), p, NOW)
    # Then each attribute read, once, with its source dataset and UTC time; the identity value is not repeated
    assert lines == ['loyalty.tier is "gold" (dataset crm, 10 Nov 2026 09:00 UTC)',
                     "loyalty.points is 1200 (dataset pos, 11 Nov 2026 17:00 UTC)",
                     "custom.contact is (an identity value, not shown) (dataset web, 12 Nov 2026 08:00 UTC)",
                     "person.city: not set"]
    assert not any("example.com" in line.lower() or "42" in line for line in lines)


def test_an_in_segment_audience_shows_the_other_audiences_status() -> None:
    # Given a profile that is a member of shoe-lovers since 12 Nov, exited vip on 13 Nov and never was in gold
    p = shoe_viewer()
    p.memberships["shoe-lovers"] = Membership("shoe-lovers", "existing", at(11, 12), 1, "seed", 0)
    p.memberships["vip"] = Membership("vip", "exited", at(11, 13), 1, "seed", 0)
    p.memberships["combo"] = Membership("combo", "realized", at(11, 15), 1, "seed", 0)
    query = 'inSegment("shoe-lovers") and not (inSegment("vip") or inSegment("gold"))'
    # When the combined audience is explained
    lines = membership_evidence(audience("combo", query), p, NOW)
    # Then each other audience's status, with the day it took it
    assert lines == ["audience shoe-lovers: member (existing) since 12 Nov 2026",
                     "audience vip: exited on 13 Nov 2026",
                     "audience gold: not a member"]


def test_an_exited_or_absent_membership_has_no_evidence() -> None:
    # Given a profile that left shoe-lovers (and was never in another audience)
    p = shoe_viewer()
    p.memberships["shoe-lovers"] = Membership("shoe-lovers", "exited", at(11, 15), 1, "not qualified", 0)
    # When explained, Then nothing: the query no longer holds
    assert membership_evidence(audience("shoe-lovers", SHOES), p, NOW) == []
    assert membership_evidence(audience("other", SHOES), p, NOW) == []


def test_sums_sequences_and_since_windows() -> None:
    # Given purchases, a cart followed by a purchase within the hour and one not followed
    p = make_profile(events=[
        ("purchase", at(11, 3), {"total": 80}), ("purchase", at(11, 15), {"total": 40.5}),
        ("addToCart", at(11, 14, 10), {}), ("purchase", at(11, 14, 10) + 60_000, {"total": 0}),
        ("addToCart", at(11, 15, 20), {})])
    # When each kind of event condition is explained
    sums = evidence(audience("q", "sum(total of event purchase within 30d) > 100").ast, p, NOW)
    seq = evidence(audience("q", "event addToCart within 7d followed by purchase within 1h").ast, p, NOW)
    absent = evidence(audience("q", "event addToCart within 7d not followed by purchase within 1h").ast, p, NOW)
    since = evidence(audience("q", 'event purchase since "2026-11-10"').ast, p, NOW)
    # Then each says what it counted, and when
    assert sums == ["sum of total over 3 purchase in the last 30 days is 120.5 (needs sum > 100): 3, 14 and 15 Nov 2026"]
    assert seq == ["2 addToCart in the last 7 days: 14 and 15 Nov 2026",
                   "1 of them followed by purchase within 1 hour: 14 Nov 2026"]
    assert absent == ["2 addToCart in the last 7 days: 14 and 15 Nov 2026",
                      "1 of them not followed by purchase within 1 hour: 15 Nov 2026"]
    assert since == ["2 purchase since 10 Nov 2026: 14 and 15 Nov 2026"]


def test_dates_are_grouped_by_month_and_year_and_at_most_ten_days_listed() -> None:
    # Given events on 13 days across a year end, two of them on one day
    stamps = [at(12, d, year=2025) for d in (20, 24, 28, 30)] + [at(1, d) for d in range(1, 10)] + [at(1, 9, 18)]
    # When listed, Then the 10 most recent days, oldest first, and the 3 older events counted
    assert dates_text(stamps) == "30 Dec 2025, 1, 2, 3, 4, 5, 6, 7, 8 and 9 Jan 2026 (×2), and 3 more"
    assert dates_text([at(10, 30), at(11, 2)]) == "30 Oct and 2 Nov 2026"
    assert dates_text([at(11, 2)]) == "2 Nov 2026"
    assert dates_text([at(11, 12), at(11, 14), at(11, 14, 18), at(11, 15)]) == "12, 14 Nov (×2) and 15 Nov 2026"
