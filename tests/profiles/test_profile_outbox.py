"""Tests of the profile outbox rules: what it keeps, when it is delivered, when it is sent again."""

from __future__ import annotations

from pipeline.model import MembershipChange, Outbox
from pipeline.profiles.outbox import KEEP_RUNS, Acks, decode_record, encode_record, messages_of, stamp
from pipeline.stages.messages import Send


def change(aid: str, status: str, key: str) -> MembershipChange:
    return MembershipChange("p1", aid, 1, status, None, {"ECID": ["c1"]}, {}, "why", None,  # type: ignore[arg-type]
                            "streaming", 10, 11, key)


def test_it_keeps_membership_and_profile_changes_but_not_stage_messages() -> None:
    # Given a handling's output: two membership changes, a profile change and a claim to the identity stage
    changes = [change("a1", "realized", "k1"), change("a2", "exited", "k2")]
    sends = [Send("activation.profile-changes", "p1", {"seq": 3}), Send("internal.identity-ops", "ECID:c2", {})]
    # When the outbox messages are taken from it Then they are the changes and the profile change, in order
    assert messages_of(changes, sends) == [
        ["activation.memberships", "p1|a1", changes[0].to_dict()],
        ["activation.memberships", "p1|a2", changes[1].to_dict()],
        ["activation.profile-changes", "p1", {"seq": 3}],
    ]


def test_a_newer_message_replaces_the_older_one_of_its_audience_and_goes_last() -> None:
    # Given an undelivered outbox with a1 realized and a2 realized
    old = Outbox("run1", 4, [["m", "p1|a1", {"s": "realized"}], ["m", "p1|a2", {"s": "realized"}]])
    # When a1 exits in a later epoch
    box = stamp(old, [["m", "p1|a1", {"s": "exited"}]], "run1", 6, delivered=False)
    # Then the outbox holds a2's entry and a1's exit, stamped with the later epoch
    assert box == Outbox("run1", 6, [["m", "p1|a2", {"s": "realized"}], ["m", "p1|a1", {"s": "exited"}]])


def test_an_undelivered_outbox_with_nothing_new_keeps_its_stamp() -> None:
    # (a replayed duplicate then writes nothing: the profile's bytes stay the same)
    old = Outbox("run1", 4, [["m", "p1|a1", {"s": "realized"}]])
    assert stamp(old, [], "run1", 6, delivered=False) is old


def test_a_delivered_outbox_is_dropped_and_an_empty_one_is_none() -> None:
    old = Outbox("run1", 4, [["m", "p1|a1", {"s": "realized"}]])
    assert stamp(old, [], "run1", 6, delivered=True) is None
    assert stamp(old, [["m", "p1|a2", {}]], "run1", 6, delivered=True) == Outbox("run1", 6, [["m", "p1|a2", {}]])
    assert stamp(None, [], "run1", 6, delivered=False) is None


def test_delivery_is_known_from_this_run_s_producer_or_the_partition_s_record() -> None:
    # Given this run has every epoch up to 10 acknowledged, and the record says run0 had up to 7
    acks = Acks("run1", 10, lambda: encode_record({}, "run0", 7))
    # Then this run's outboxes up to epoch 10 are delivered, later ones are in flight (never sent again here)
    assert [acks.delivered(Outbox("run1", e, [])) for e in (10, 11)] == [True, False]
    assert [acks.resend_now(Outbox("run1", e, [])) for e in (10, 11)] == [False, False]
    # And run0's are delivered up to 7; its later ones and those of a run the record does not know are sent again
    assert [acks.resend_now(Outbox("run0", e, [])) for e in (7, 8)] == [False, True]
    assert acks.resend_now(Outbox("gone", 1, [])) is True


def test_the_record_keeps_the_latest_runs() -> None:
    record: dict[str, int] = {}
    for n in range(KEEP_RUNS + 3):
        record = decode_record(encode_record(record, f"run{n}", n))
    record = decode_record(encode_record(record, "run5", 99))  # an existing run moves to the newest place
    assert len(record) == KEEP_RUNS
    assert list(record)[-2:] == [f"run{KEEP_RUNS + 2}", "run5"] and record["run5"] == 99
    assert "run0" not in record and decode_record(None) == {}


def test_the_record_is_read_once_and_only_for_another_run_s_outbox() -> None:
    reads: list[int] = []

    def read() -> bytes | None:
        reads.append(1)
        return None

    acks = Acks("run1", 10, read)
    assert acks.delivered(Outbox("run1", 3, [])) and reads == []
    assert not acks.delivered(Outbox("run0", 3, [])) and not acks.delivered(Outbox("run0", 4, []))
    assert reads == [1]
