"""Tests of the profile-table codec: exact round trips (hypothesis), forwards, versioning, errors."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SerdeError
from pipeline.model import AttributeValue, Delivery, Membership, Outbox, ProfileState, StoredEvent
from pipeline.stages.messages import Absorb, Apply, EventWire, Tick
from pipeline.state.codec import (
    FORMAT_VERSION,
    Forward,
    Peeked,
    decode_profile,
    decode_profile_entry,
    encode_forward,
    encode_profile,
    encode_profile_within,
    peek_entry,
)

text = st.text(max_size=12)
ints = st.integers(-(2**63), 2**63 - 1)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), text)
stored_events = st.builds(StoredEvent, text, text, st.integers(0, 2**62), text,
                          st.dictionaries(text, scalars, max_size=4))
# messages a merging profile holds (and a thaw sends again), of each shape: bytes, a nested record, none
stage_messages = st.one_of(
    st.builds(Absorb, pid=text, sender=text, token=text, state=st.binary(max_size=8)),
    st.builds(Apply, pid=text, home=text, hop=st.booleans(), rec=st.one_of(st.none(), st.builds(
        EventWire, timestamp_ms=ints, dataset=text, identities=st.lists(st.tuples(text, text), max_size=2).map(tuple),
        primary=st.none(), record_id=text, event_type=text, fields=st.dictionaries(text, scalars, max_size=2)))),
    st.builds(Tick, pid=text))
profiles = st.builds(
    ProfileState,
    profile_id=text,
    created_ms=ints,
    identities=st.dictionaries(text, st.dictionaries(text, ints, max_size=3), max_size=3),
    attributes=st.dictionaries(text, st.builds(AttributeValue, scalars, text, ints), max_size=5),
    events=st.lists(stored_events, max_size=6).map(lambda es: sorted(es, key=lambda e: (e.ts_ms, e.event_id))),
    memberships=st.dictionaries(text, st.builds(Membership, text, st.sampled_from(["realized", "existing", "exited"]),
                                                ints, ints, text, ints, st.dictionaries(text, st.builds(
                                                    Delivery, st.sampled_from(["entered", "exited"]), ints, ints),
                                                    max_size=2)), max_size=3),
    next_deadline_ms=st.one_of(st.none(), ints),
    seq=st.integers(0, 2**40),
    # stitching state in flight: pending claims, a merge attempt with held messages, absorbed ids
    claims=st.dictionaries(text, st.dictionaries(text, ints, min_size=1, max_size=2), max_size=2),
    merging=st.one_of(st.none(), st.tuples(text, text)),
    held=st.lists(stage_messages, max_size=2),
    merged=st.lists(text, max_size=3),
    thawed=st.one_of(st.none(), st.tuples(text, st.lists(st.tuples(text, text, stage_messages).map(list), max_size=2))),
    # output that may be undelivered: membership changes with their topic and key
    outbox=st.one_of(st.none(), st.builds(Outbox, text, st.integers(0, 2**40), st.lists(
        st.tuples(text, text, st.dictionaries(text, scalars, max_size=3)).map(list), max_size=3))),
    # the dataset that linked each identity (or pending claim)
    identity_sources=st.dictionaries(text, text, max_size=3),
)


def _typed(p: ProfileState) -> list[object]:
    # == treats 1, 1.0 and True alike; the codec must keep the exact type too
    vals: list[object] = [type(a.value) for a in p.attributes.values()]
    vals += [type(v) for e in p.events for v in e.fields.values()]
    return vals


@settings(max_examples=200, deadline=None)
@given(profiles)
def test_profile_round_trips_exactly(profile: ProfileState) -> None:
    decoded = decode_profile(encode_profile(profile))
    assert decoded == profile
    assert _typed(decoded) == _typed(profile)
    assert decode_profile_entry(encode_profile(profile)) == profile


@given(profiles)
def test_peek_reads_what_a_full_decode_reads(profile: ProfileState) -> None:
    # a worker re-reads every profile's deadline, outbox stamp and current audiences on assignment without
    # decoding the whole profile
    stamp = (profile.outbox.run, profile.outbox.epoch) if profile.outbox else None
    in_flight = bool(profile.claims) or profile.merging is not None
    active = tuple(a for a, m in profile.memberships.items() if m.status != "exited")
    assert peek_entry(encode_profile(profile)) == Peeked(profile.profile_id, profile.next_deadline_ms, stamp,
                                                         in_flight, active)


def test_peek_of_a_forward_gives_its_outbox_stamp_and_bad_bytes_raise() -> None:
    assert peek_entry(encode_forward(Forward("p0001"))) == Peeked(None, None, None)
    exits = Outbox("run1", 7, [["activation.memberships", "p0002|a1", {"status": "exited"}]])
    assert peek_entry(encode_forward(Forward("p0001", "t", ("ECID:c",), (), exits))) == Peeked(None, None, ("run1", 7))
    for data, reason in [(b"", "profile_decode"), (bytes((99, ord("P"))) + msgpack.packb([1]), "profile_version"),
                         (bytes((FORMAT_VERSION, ord("X"))) + msgpack.packb("a"), "profile_decode"),
                         (bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb([1, 2]), "profile_decode"),
                         (bytes((FORMAT_VERSION, ord("P"))) + b"\xc1\xc1\xc1", "profile_decode"),
                         (bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb([7, 0, None, 0, {}, [], [], [], []]),
                          "profile_decode")]:
        with pytest.raises(SerdeError) as info:
            peek_entry(data)
        assert info.value.reason == reason, data


def test_full_profile_round_trip_and_layout() -> None:
    # Given a profile with every part filled
    profile = ProfileState(
        "p1", 5, {"ECID": {"c1": 5}, "CRMID": {"42": 7}},
        {"person.name": AttributeValue("Ann", "crm", 7), "gone": AttributeValue(None, "crm", 8)},
        [StoredEvent("e1", "web.pageview", 1_700_000_000_000, "web-events", {"url": "/"}),
         StoredEvent("e2", "web.pageview", 1_700_000_000_500, "web-events", {"n": 1.5})],
        {"aud": Membership("aud", "existing", 3, 2, "rule", 4)}, 99, 12)
    data = encode_profile(profile)
    # Then the header carries version and kind, and the body interns repeated names once
    assert data[:2] == bytes((FORMAT_VERSION, ord("P")))
    body = msgpack.unpackb(data[2:])
    assert body[5] == ["crm", "web.pageview", "web-events"]
    assert body[7][2::5] == [1_700_000_000_000, 500]  # delta-coded timestamps
    assert decode_profile(data) == profile


def test_forward_round_trip() -> None:
    data = encode_forward(Forward("p0001"))
    assert decode_profile_entry(data) == Forward("p0001")
    with pytest.raises(SerdeError) as info:
        decode_profile(data)
    assert info.value.reason == "profile_forward"


def test_forward_keeps_what_its_merge_sent() -> None:
    # Given the forward an accepted merge leaves: its token, the identities it repointed, the messages it passed on
    forward = Forward("p0001", "p0009/3", ("CRMID:A", "ECID:c1"),
                      (Apply(pid="p0009", rec=None, home="ECID:c1", hop=True), Tick(pid="p0009")))
    # When encoded and decoded Then all of it comes back, and a plain forward stays the old, short encoding
    assert decode_profile_entry(encode_forward(forward)) == forward
    assert encode_forward(Forward("p0001"))[2:] == msgpack.packb("p0001")
    # And the membership exits it sent, while they may be undelivered
    with_exits = Forward(forward.into, forward.token, forward.repointed, forward.passed,
                         Outbox("run1", 3, [["activation.memberships", "p0009|a1", {"status": "exited"}]]))
    assert decode_profile_entry(encode_forward(with_exits)) == with_exits


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "profile_decode"),
    (bytes((99, ord("P"))) + msgpack.packb([1]), "profile_version"),
    (bytes((FORMAT_VERSION, ord("X"))) + msgpack.packb("a"), "profile_decode"),
    (bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb([1, 2]), "profile_decode"),
    (bytes((FORMAT_VERSION, ord("P"))) + b"\xc1\xc1\xc1", "profile_decode"),
    (bytes((FORMAT_VERSION, ord("F"))) + msgpack.packb(5), "profile_decode"),
    (bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb(["p", 0, None, 0, {}, [], [], ["e", 0, 1, 0], []]),
     "profile_decode"),
])
def test_bad_bytes_raise_serde_error(data: bytes, reason: str) -> None:
    with pytest.raises(SerdeError) as info:
        decode_profile_entry(data)
    assert info.value.reason == reason


def test_unencodable_value_raises_serde_error() -> None:
    profile = ProfileState("p", 0, attributes={"big": AttributeValue(2**70, "crm", 0)})
    with pytest.raises(SerdeError) as info:
        encode_profile(profile)
    assert info.value.reason == "profile_encode"


def test_a_profile_over_its_byte_budget_drops_its_oldest_events_first() -> None:
    # Given a profile with 2,000 events of about 200 bytes each
    events = [StoredEvent(f"e{i:05d}", "pageView", 1_000 + i, "web-events", {"url": "u" * 180})
              for i in range(2000)]
    profile = ProfileState("p1", created_ms=1, identities={"ECID": {"c1": 1}}, events=list(events))
    # When it is encoded within a 100 KB budget
    raw, dropped = encode_profile_within(profile, 100_000)
    # Then it fits, the oldest events went first, and what is stored is the profile that remains
    assert len(raw) <= 100_000
    assert dropped > 0 and profile.events == events[dropped:]
    assert len(encode_profile(ProfileState("p1", 1, {"ECID": {"c1": 1}}, events=events[dropped - 1:]))) > 100_000
    assert decode_profile(raw) == profile
    # And a profile within budget is untouched
    assert encode_profile_within(profile, 100_000) == (raw, 0)


def _old_body(with_outbox: bool) -> bytes:
    """A profile as the codec wrote it before identity sources and deliveries were kept (9 or 11 fields)."""
    body: list[object] = ["p1", 5, None, 3, {"ECID": {"c1": 5}, "Email": {"ann@example.com": 7}}, ["crm"],
                          ["tier", "gold", 0, 7], [], ["gold", None, 0, 7, 1, "tier", 8]]
    if with_outbox:
        body += [None, ["run1", 2, [["activation.memberships", "p1", {"status": "realized"}]]]]
    return bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb(body)


def test_a_profile_stored_before_provenance_decodes_with_none_known() -> None:
    # Given profiles encoded the old way, without and with an outbox
    for with_outbox in (False, True):
        # When they are decoded
        decoded = decode_profile(_old_body(with_outbox))
        # Then everything reads as before, with no identity's dataset and no delivery known
        assert decoded == ProfileState(
            "p1", 5, {"ECID": {"c1": 5}, "Email": {"ann@example.com": 7}}, {"tier": AttributeValue("gold", "crm", 7)},
            [], {"gold": Membership("gold", "realized", 7, 1, "tier", 8)}, None, 3,
            outbox=Outbox("run1", 2, [["activation.memberships", "p1", {"status": "realized"}]]) if with_outbox else None)
        assert decoded.identity_sources == {}
        assert decoded.memberships["gold"].deliveries == {}
        assert peek_entry(_old_body(with_outbox)) == Peeked("p1", None, ("run1", 2) if with_outbox else None, False,
                                                            ("gold",))


def test_identity_sources_and_deliveries_are_stored_after_the_old_fields() -> None:
    # Given a profile whose identities know their dataset and whose membership reached a destination, no outbox
    profile = ProfileState("p1", 5, {"ECID": {"c1": 5}}, {"tier": AttributeValue("gold", "crm", 7)}, [],
                           {"gold": Membership("gold", "realized", 7, 1, "tier", 8,
                                               {"crm-webhook": Delivery("entered", 9, 7)})},
                           identity_sources={"ECID:c1": "crm"})
    # When it is encoded
    data = encode_profile(profile)
    # Then the old nine fields are as before, no stitching state nor outbox, then the provenance (interned names)
    body = msgpack.unpackb(data[2:])
    assert body[:9] == ["p1", 5, None, 0, {"ECID": {"c1": 5}}, ["crm"], ["tier", "gold", 0, 7], [],
                        ["gold", None, 0, 7, 1, "tier", 8]]
    assert body[9:] == [None, None, [["ECID:c1", 0], ["gold", "crm-webhook", 0, 9, 7]]]
    assert decode_profile(data) == profile
    assert peek_entry(data) == Peeked("p1", None, None, False, ("gold",))
    # and with an outbox, peek reads its stamp past the provenance's place
    profile.outbox = Outbox("run1", 2, [])
    assert peek_entry(encode_profile(profile)) == Peeked("p1", None, ("run1", 2), False, ("gold",))
    assert decode_profile(encode_profile(profile)) == profile


def test_malformed_provenance_is_a_decode_error() -> None:
    base = ["p1", 5, None, 3, {}, ["crm"], [], [], ["gold", None, 0, 7, 1, "tier", 8], None, None]
    for provenance in ([["ECID:c1"], []], [[], ["nogold", "d", 0, 1, 1]], [[], ["gold", "d", 0, "x", 1]], 7):
        with pytest.raises(SerdeError) as info:
            decode_profile(bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb([*base, provenance]))
        assert info.value.reason == "profile_decode", provenance
