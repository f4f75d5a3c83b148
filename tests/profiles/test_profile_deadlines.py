"""Tests of the profile's next deadline (issue 14, item 5): an event that reaches a profile after its deadline
has passed but before the tick keeps that deadline, so the tick still re-evaluates every audience; only an
evaluation of every audience (a due tick, a merge, a batch run with no audience list) may move it later."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.model import ExperienceEvent, Identity, ProfileState, StoredEvent
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import OpResult, ProfileProcessor
from pipeline.segments import AudienceDef, SegmentEngine, parse_query
from pipeline.stages.messages import Absorb, Apply, Evaluate, ProfileMessage, Tick, record_to_wire
from pipeline.state.codec import encode_profile

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
T0 = 1_800_000_000_000
PID = "p1"
HOME = Identity("ECID", "c1")


def audience(aid: str, query: str) -> AudienceDef:
    return AudienceDef(aid, aid, "", query, 1, (), parse_query(query))


AUDIENCES = (
    # deadline: the cart add + 1h + 1 (+ 7d + 1 once in)
    audience("abandoners", "event cartAdd within 7d not followed by purchase within 1h"),
    audience("recent", "event pageView within 24h"),  # deadline: view + 24h + 1
    audience("active", "event login within 30d"),  # the unrelated event's audience: deadline login + 30d + 1
)


class Profile:
    """One profile driven through a ProfileProcessor with a settable clock, as the profile agent drives it."""

    def __init__(self, config: ProfileConfig, make_event: Callable[..., ExperienceEvent]) -> None:
        self.now = T0
        self.processor = ProfileProcessor(config, SegmentEngine(list(AUDIENCES)),
                                          clock=lambda: self.now / 1000)
        self.make_event = make_event
        self.entry: ProfileState | None = None
        self.n = 0

    def handle(self, at: int, msg: ProfileMessage) -> list[tuple[str, str]]:
        """Handle `msg` at wall time `at`; the membership changes it emits, as (audience, status)."""
        self.now = at
        res: OpResult = self.processor.handle(PID, self.entry, msg)
        if res.write is not None:
            assert isinstance(res.write, ProfileState)
            self.entry = res.write
        return [(c.audience_id, c.status) for c in res.changes]

    def event(self, event_type: str, at: int) -> list[tuple[str, str]]:
        """An event of `event_type` happening (and arriving) at `at`."""
        self.n += 1
        ev = self.make_event(f"e{self.n}", at, event_type, identities=(HOME,))
        return self.handle(at, Apply(pid=PID, rec=record_to_wire(ev), home=HOME.key, hop=True))

    def tick(self, at: int) -> list[tuple[str, str]]:
        return self.handle(at, Tick(pid=PID))

    @property
    def deadline(self) -> int | None:
        assert self.entry is not None
        return self.entry.next_deadline_ms

    def statuses(self) -> dict[str, str]:
        assert self.entry is not None
        return {a: m.status for a, m in sorted(self.entry.memberships.items())}

    def members(self) -> list[str]:
        """The audiences the profile is in ('realized' or 'existing')."""
        assert self.entry is not None
        return sorted(self.entry.active_segments())


@pytest.fixture
def new(make_config: Callable[..., ProfileConfig], make_event: Callable[..., ExperienceEvent]
        ) -> Callable[[], Profile]:
    """Factory: a profile not born yet, its processor's clock at T0."""
    return lambda: Profile(make_config(), make_event)


# how late after the deadline the unrelated event comes: within the timer's ~1 s window, or after downtime
LAGS = pytest.mark.parametrize("lag", [500, 2 * DAY], ids=["within-a-second", "after-two-days-of-backlog"])


@LAGS
def test_event_after_a_passed_deadline_keeps_it_and_the_tick_lets_the_cart_abandoner_in(
        new: Callable[[], Profile], lag: int) -> None:
    # Given a cart add at T0 with no purchase: not yet an abandoner, next check one ms after the hour
    p = new()
    assert p.event("cartAdd", T0) == []
    due = T0 + HOUR + 1
    assert p.deadline == due
    # When, after that deadline has passed but before its tick, an unrelated login arrives
    late = due + lag
    assert p.event("login", late) == [("active", "realized")]
    # Then the passed deadline is kept (its tick is due), not replaced by the login's 30 days
    assert p.deadline == due
    # When the tick arrives
    # Then the cart abandoner enters, and the deadline is the fresh one of every audience (the abandonment
    # leaving the 7-day window, before the login's 30 days)
    assert p.tick(late + 100) == [("abandoners", "realized")]
    assert p.deadline == T0 + 7 * DAY + 1
    assert p.statuses() == {"abandoners": "realized", "active": "existing"}
    # and it ends in the audiences and with the deadline an undisturbed run (the tick before the login) ends
    q = new()
    q.event("cartAdd", T0)
    assert q.tick(late) == [("abandoners", "realized")]
    assert q.event("login", late + 100) == [("active", "realized")]
    assert (q.members(), q.deadline) == (p.members(), p.deadline)
    assert p.members() == ["abandoners", "active"]


@LAGS
def test_event_after_a_passed_deadline_keeps_it_and_the_tick_lets_the_recent_visitor_leave(
        new: Callable[[], Profile], lag: int) -> None:
    # Given a page view at T0: a recent visitor until one ms after 24 hours
    p = new()
    assert p.event("pageView", T0) == [("recent", "realized")]
    due = T0 + DAY + 1
    assert p.deadline == due
    # When, after that deadline has passed but before its tick, an unrelated login arrives
    late = due + lag
    assert p.event("login", late) == [("active", "realized")]
    # Then the passed deadline is kept (not pushed out to the login's 30 days)
    assert p.deadline == due
    # When the tick arrives
    # Then the visitor leaves, and the deadline is the login's (the only one left)
    assert p.tick(late + 100) == [("recent", "exited")]
    assert p.deadline == late + 30 * DAY + 1
    assert p.statuses() == {"active": "existing", "recent": "exited"}
    # and it ends in the audiences and with the deadline an undisturbed run (the tick before the login) ends
    q = new()
    q.event("pageView", T0)
    assert q.tick(late) == [("recent", "exited")]
    assert q.event("login", late) == [("active", "realized")]
    assert (q.members(), q.deadline) == (p.members(), p.deadline) == (["active"], late + 30 * DAY + 1)


def test_a_due_tick_replaces_a_kept_deadline_with_the_fresh_one_and_a_stale_tick_changes_nothing(
        new: Callable[[], Profile]) -> None:
    # Given a cart add at T0 bought 10 minutes later (no abandonment: its deadline stays, an early bound, as
    # the purchase re-evaluated only the audiences it affects) and a page view at T0 + 30m
    p = new()
    assert p.event("cartAdd", T0) == []
    assert p.event("purchase", T0 + 10 * MINUTE) == []
    assert p.event("pageView", T0 + 30 * MINUTE) == [("recent", "realized")]
    due = T0 + HOUR + 1
    assert p.deadline == due
    # and a login arriving after that deadline, before its tick, which keeps it
    late = due + 500
    assert p.event("login", late) == [("active", "realized")]
    assert p.deadline == due
    # When the tick arrives
    # Then nothing enters or leaves, and the deadline is the fresh one of every audience: the page view
    # leaving its 24 hours (later than the passed one, earlier than the login's 30 days)
    assert p.tick(late + 100) == []
    view_due = T0 + 30 * MINUTE + DAY + 1
    assert p.deadline == view_due
    # When a stale tick arrives before the fresh deadline (the timer noted the kept deadline again on the
    # login's write, so its tick comes twice)
    assert p.entry is not None
    before = encode_profile(p.entry)
    p.now = late + 1_000
    res = p.processor.handle(PID, p.entry, Tick(pid=PID))
    # Then it is dropped: no write, no output, the profile unchanged
    assert (res.write, res.sends, res.changes, res.counters) == (None, [], [], {})
    assert encode_profile(p.entry) == before
    # When the later deadlines come due, Then each tick does what it is for, and the last leaves no deadline
    assert p.tick(view_due) == [("recent", "exited")]
    assert p.deadline == late + 30 * DAY + 1
    assert p.tick(late + 30 * DAY + 1) == [("active", "exited")]
    assert p.deadline is None
    assert p.statuses() == {"active": "exited", "recent": "exited"}


def _batch(p: Profile, at: int) -> list[tuple[str, str]]:
    return p.handle(at, Evaluate(kind="batch"))


def _merge(p: Profile, at: int) -> list[tuple[str, str]]:
    """Profile p2, whose history is a page view 5 minutes earlier, is absorbed into p."""
    other = ProfileState("p2", T0, {"ECID": {"c2": T0}},
                         events=[StoredEvent("v2", "pageView", at - 5 * MINUTE, "web-events", {})])
    return p.handle(at, Absorb(pid=PID, sender="p2", token="p2/1", state=encode_profile(other)))


@pytest.mark.parametrize(("evaluate_every", "changes", "fresh"), [
    (_batch, [], None),
    (_merge, [("recent", "realized")], T0 + 15 * MINUTE + DAY + 1),
], ids=["batch-with-no-audience-list", "merge"])
def test_evaluating_every_audience_replaces_the_deadline_with_the_fresh_one(
        new: Callable[[], Profile], evaluate_every: Callable[[Profile, int], list[tuple[str, str]]],
        changes: list[tuple[str, str]], fresh: int | None) -> None:
    # Given a cart add at T0 bought 10 minutes later: the abandonment deadline (T0 + 1h + 1, not yet due)
    # is kept by the purchase, which re-evaluates only the audiences it affects
    p = new()
    assert p.event("cartAdd", T0) == []
    assert p.event("purchase", T0 + 10 * MINUTE) == []
    assert p.deadline == T0 + HOUR + 1
    # and an evaluation of that one audience by name keeps it too
    assert p.handle(T0 + 15 * MINUTE, Evaluate(kind="batch", audiences=["abandoners"])) == []
    assert p.deadline == T0 + HOUR + 1
    # When every audience is evaluated at T0 + 20m
    # Then the deadline is the fresh one of every audience (none for the batch run; the absorbed page
    # view's 24 hours for the merge), later than the stored one
    assert evaluate_every(p, T0 + 20 * MINUTE) == changes
    assert p.deadline == fresh

