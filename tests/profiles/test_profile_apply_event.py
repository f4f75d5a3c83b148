"""Tests of apply_event: identities, ordering, de-duplication, count cap and retention."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.model import ExperienceEvent, Identity, ProfileState, StoredEvent
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import ChangeSummary, apply_event

DAY = 86_400_000


def ids(profile: ProfileState) -> list[tuple[str, int]]:
    return [(e.event_id, e.ts_ms) for e in profile.events]


def test_first_event_adds_identities_and_history(make_config: Callable[..., ProfileConfig],
                                                 make_event: Callable[..., ExperienceEvent],
                                                 make_profile: Callable[..., ProfileState]) -> None:
    # Given an empty profile
    profile = make_profile()
    event = make_event("e1", 5_000, identities=(Identity("ECID", "c1"), Identity("Email", "a@x.com")),
                       fields={"web.url": "/home"})
    # When one event is applied
    summary = apply_event(profile, event, make_config())
    # Then the whole state and summary are as expected
    assert profile.identities == {"ECID": {"c1": 5_000}, "Email": {"a@x.com": 5_000}}
    assert profile.events == [StoredEvent("e1", "web.pageview", 5_000, "web-events", {"web.url": "/home"})]
    assert profile.seq == 1
    assert summary == ChangeSummary(
        changed=True, event_types_added=frozenset({"web.pageview"}),
        identities_added=(Identity("ECID", "c1"), Identity("Email", "a@x.com")), events_added=1)
    assert summary.needs_evaluation


def test_out_of_order_events_are_inserted_in_time_order(make_config: Callable[..., ProfileConfig],
                                                        make_event: Callable[..., ExperienceEvent],
                                                        make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config()
    for eid, ts in [("a", 30), ("b", 10), ("c", 20), ("e", 20), ("d", 20), ("f", 40)]:
        apply_event(profile, make_event(eid, ts), config)
    # equal timestamps are ordered by event id, so the order never depends on arrival
    assert ids(profile) == [("b", 10), ("c", 20), ("d", 20), ("e", 20), ("a", 30), ("f", 40)]
    # and an earlier sighting lowers the identity's first-seen
    assert profile.identities == {"ECID": {"c1": 10}}


def test_replayed_event_is_a_no_op(make_config: Callable[..., ProfileConfig],
                                   make_event: Callable[..., ExperienceEvent],
                                   make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config()
    for eid, ts in [("a", 10), ("b", 20), ("c", 30)]:
        apply_event(profile, make_event(eid, ts), config)
    before = (ids(profile), profile.seq)
    # When the middle and the last events are delivered again
    again_mid = apply_event(profile, make_event("b", 20), config)
    again_last = apply_event(profile, make_event("c", 30), config)
    # Then nothing changes and the summaries say it was a duplicate
    assert (ids(profile), profile.seq) == before
    assert again_mid == again_last == ChangeSummary(duplicate=True)
    assert not again_mid.needs_evaluation


def test_count_cap_drops_oldest_first(make_config: Callable[..., ProfileConfig],
                                      make_event: Callable[..., ExperienceEvent],
                                      make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config(max_events=3)
    for i in range(1, 4):
        apply_event(profile, make_event(f"e{i}", i * 10, event_type=f"t{i}"), config)
    # When a fourth, newer event arrives
    summary = apply_event(profile, make_event("e4", 40, event_type="t4"), config)
    # Then the oldest is evicted
    assert ids(profile) == [("e2", 20), ("e3", 30), ("e4", 40)]
    assert summary.event_types_added == frozenset({"t4"})
    assert summary.event_types_dropped == frozenset({"t1"})
    assert summary.events_dropped == 1
    # And an event older than everything kept is not stored at all
    late = apply_event(profile, make_event("e0", 5, event_type="t0"), config)
    assert ids(profile) == [("e2", 20), ("e3", 30), ("e4", 40)]
    assert late.events_added == 0 and late.event_types_added == frozenset()


def test_retention_is_relative_to_newest_event(make_config: Callable[..., ProfileConfig],
                                               make_event: Callable[..., ExperienceEvent],
                                               make_profile: Callable[..., ProfileState]) -> None:
    profile, config = make_profile(), make_config(retention="10d")
    for eid, ts in [("old", 0), ("mid", 5 * DAY), ("edge", 6 * DAY)]:
        apply_event(profile, make_event(eid, ts), config)
    # When an event 16 days after the start arrives (cutoff = day 6)
    summary = apply_event(profile, make_event("new", 16 * DAY), config)
    # Then events older than the cutoff are gone, the one exactly on it stays
    assert ids(profile) == [("edge", 6 * DAY), ("new", 16 * DAY)]
    assert summary.events_dropped == 2
    # And a late event older than the cutoff is not stored, but its identities still count
    late = apply_event(profile, make_event("late", DAY, identities=(Identity("GAID", "g"),)), config)
    assert ids(profile) == [("edge", 6 * DAY), ("new", 16 * DAY)]
    assert late.identities_added == (Identity("GAID", "g"),) and late.events_added == 0


event_specs = st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 40)), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event_specs, st.permutations(range(25)), st.integers(1, 6), st.integers(1, 30))
def test_history_is_independent_of_arrival_order_and_replays(
        make_config: Callable[..., ProfileConfig], make_event: Callable[..., ExperienceEvent],
        make_profile: Callable[..., ProfileState], specs: list[tuple[str, int]], perm: list[int],
        cap: int, retention_ms: int) -> None:
    # Given any events (replays included) in any order, with small bounds
    config = make_config(max_events=cap, retention=f"{retention_ms}ms")
    order = [specs[i] for i in perm if i < len(specs)]
    profile = make_profile()
    # When they are all applied
    for eid, ts in order + order[:3]:
        apply_event(profile, make_event(eid, ts), config)
    # Then the history is the newest `cap` distinct events within retention of the newest one
    distinct = sorted({(ts, eid) for eid, ts in specs})
    if distinct:
        newest = distinct[-1][0]
        distinct = [(ts, eid) for ts, eid in distinct if ts >= newest - retention_ms][-cap:]
    assert ids(profile) == [(eid, ts) for ts, eid in distinct]
