"""Membership transitions: realized, silent existing, exited, re-entry, idempotency keys, exit_all."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from pipeline.model import Membership
from pipeline.segments import Decision, SegmentEngine, apply_decisions, exit_all, idempotency_key

from .helpers import HOUR, audience, make_profile

ENGINE = SegmentEngine([audience("gold", 'loyalty.tier = "gold"', version=3,
                                 attributes=("person.firstName", "loyalty.tier", "person.city"))])


def run(profile, now: int, kind: str = "streaming"):  # type: ignore[no-untyped-def]
    decisions = ENGINE.evaluate(profile, now)
    return apply_decisions(profile, decisions, ENGINE, now_ms=now + 5, event_time_ms=now, kind=kind)


def test_realized_then_existing_silently_then_exited_then_reentry() -> None:
    p = make_profile({"loyalty.tier": "gold", "person.firstName": "Ada"})
    # Given a new qualifier, When applied, Then one 'realized' message with carried attributes.
    [c] = run(p, 1000)
    assert (c.status, c.previous_status, c.audience_version, c.evaluation) == ("realized", None, 3, "streaming")
    assert c.attributes == {"person.firstName": "Ada", "loyalty.tier": "gold", "person.city": None}
    assert c.identities == {"crm": ["42"], "email": ["a@example.com"]}
    assert (c.event_time_ms, c.emit_time_ms) == (1000, 1005)
    assert p.memberships["gold"].status == "realized" and p.memberships["gold"].since_ms == 1000
    # When it still qualifies, Then it silently becomes 'existing' (no message).
    assert run(p, 2000) == []
    assert p.memberships["gold"].status == "existing" and p.memberships["gold"].since_ms == 1000
    assert run(p, 3000) == []
    # When it stops qualifying, Then 'exited'.
    p.attributes["loyalty.tier"].value = "silver"
    [c] = run(p, 4000)
    assert (c.status, c.previous_status, c.cause_event_id) == ("exited", "existing", None)
    assert run(p, 5000) == []  # no message for a non-change
    # When it qualifies again, Then 'realized' with previous_status 'exited'.
    p.attributes["loyalty.tier"].value = "gold"
    [c] = run(p, 6000, kind="deadline")
    assert (c.status, c.previous_status, c.evaluation) == ("realized", "exited", "deadline")


def test_idempotency_key_is_stable_and_specified() -> None:
    a = make_profile({"loyalty.tier": "gold"})
    b = make_profile({"loyalty.tier": "gold"})
    [ca] = run(a, 1000)
    [cb] = apply_decisions(b, ENGINE.evaluate(b, 1000), ENGINE, now_ms=99_999, event_time_ms=1000,
                           kind="streaming")
    # the same change decided twice (even emitted at another time) has the same key
    assert ca.idempotency_key == cb.idempotency_key
    raw = b"p1|gold|3|realized|1000"
    assert ca.idempotency_key == hashlib.sha256(raw).hexdigest()[:32] == idempotency_key("p1", "gold", 3,
                                                                                         "realized", 1000)
    assert len(ca.idempotency_key) == 32


def test_explicit_identities_and_decision_passthrough() -> None:
    p = make_profile({"loyalty.tier": "gold"})
    d = Decision("gold", True, "manual", "ev-9", None)
    [c] = apply_decisions(p, [d], ENGINE, now_ms=1, event_time_ms=1, kind="batch", identities={"x": ["1"]})
    assert (c.identities, c.reason, c.cause_event_id, c.evaluation) == ({"x": ["1"]}, "qualified: manual (event ev-9)",
                                                                        "ev-9", "batch")
    assert c.to_dict()["status"] == "realized"


def test_exit_all_exits_every_active_membership() -> None:
    p = make_profile({"loyalty.tier": "gold"}, memberships={"removed": "existing", "old": "exited"})
    run(p, 1000)
    changes = exit_all(p, ENGINE, now_ms=7000, kind="merge", reason="merged into p2")
    assert [(c.audience_id, c.status, c.previous_status) for c in changes] == [
        ("gold", "exited", "realized"), ("removed", "exited", "existing")]
    assert all(m.status == "exited" for m in p.memberships.values())
    assert changes[1].attributes == {} and changes[1].audience_version == 1  # removed audience
    assert exit_all(p, ENGINE, now_ms=8000, kind="merge", reason="again") == []


DECIDE_ENGINE = SegmentEngine([audience("gold", 'loyalty.tier = "gold"', version=2),
                               audience("recent", "event pageView within 1h"),
                               audience("both", 'inSegment("gold") and inSegment("recent")')])


@given(st.sampled_from(["gold", "silver", None]), st.lists(st.integers(0, 3), max_size=3),
       st.fixed_dictionaries({}, optional={a: st.tuples(st.sampled_from(["realized", "existing", "exited"]),
                                                        st.integers(1, 2))
                                           for a in ("gold", "recent", "both")}))
def test_decide_keeps_exactly_the_decisions_that_change_memberships(tier: str | None, hours_ago: list[int],
                                                                     members: dict[str, tuple[str, int]]) -> None:
    # Given a profile with any memberships (status, version) and data
    def build():  # type: ignore[no-untyped-def]
        p = make_profile({"loyalty.tier": tier} if tier else {},
                         events=[("pageView", 10 * HOUR - h * HOUR, {}) for h in hours_ago])
        for aid, (status, version) in members.items():
            p.memberships[aid] = Membership(aid, status, 0, version, "seed", 0)  # type: ignore[arg-type]
        return p
    full, lean = build(), build()
    # When one is evaluated in full and the other with decide()
    decisions = DECIDE_ENGINE.evaluate(full, 10 * HOUR)
    kept, first = DECIDE_ENGINE.decide(lean, 10 * HOUR)
    a = apply_decisions(full, decisions, DECIDE_ENGINE, now_ms=10 * HOUR, event_time_ms=10 * HOUR, kind="batch")
    b = apply_decisions(lean, kept, DECIDE_ENGINE, now_ms=10 * HOUR, event_time_ms=10 * HOUR, kind="batch")
    # Then both emit the same changes, leave the same memberships and the same next deadline
    assert a == b and full.memberships == lean.memberships
    assert first == DECIDE_ENGINE.next_deadline(decisions)
    # And every kept decision changed something
    assert all(d.qualified != (members.get(d.audience_id, ("exited",))[0] != "exited")
               or members[d.audience_id] != ("existing", DECIDE_ENGINE.audiences[d.audience_id].version)
               for d in kept)
