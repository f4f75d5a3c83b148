"""Audience sizes kept per partition: counted from a store, moved by the membership changes the owner publishes."""

from __future__ import annotations

from collections import Counter

from pipeline.model import MembershipChange, MembershipStatus
from pipeline.segments.sizes import AudienceSizes, delta


def change(status: MembershipStatus, previous: MembershipStatus | None, audience: str = "a") -> MembershipChange:
    return MembershipChange("p1", audience, 1, status, previous, {}, {}, "r", None, "streaming", 0, 0, "k")


def test_a_change_counts_only_when_it_makes_or_ends_a_member() -> None:
    assert [delta("realized", None), delta("realized", "exited"), delta("exited", "realized"),
            delta("exited", "existing"), delta("existing", "realized"), delta("exited", None)] == [1, 1, -1, -1, 0, 0]


def test_counts_per_partition_from_the_store_then_by_changes() -> None:
    # Given partition 0 counted from its store (2 members of a, 1 of b) and a scan for partitions counted later
    sizes = AudienceSizes()
    sizes.set(0, Counter({"a": 2, "b": 1}))
    scanned: list[int] = []
    sizes.scan = lambda p: scanned.append(p) or Counter({"a": 5})  # type: ignore[func-returns-value]
    # When partition 0 publishes a new member of a and an exit from b, and partition 3 (not counted yet) a change
    sizes.apply(0, [change("realized", None), change("exited", "existing", "b"), change("existing", "realized")])
    sizes.apply(3, [change("realized", None)])
    # Then a's size is partition 0's 3 and partition 3's count from its store (its change is in the store already)
    assert sizes.of("a", [0, 3]) == {0: 3, 3: 5} and scanned == [3]
    assert sizes.of("b", [0, 3]) == {0: 0, 3: 0}
    # When partition 0 is revoked and counted again by its next owner, Then the old count is gone
    sizes.drop(0)
    assert sizes.of("a", [0]) == {0: 5} and scanned == [3, 0]


def test_entries_and_exits_are_counted_per_minute_for_a_day() -> None:
    # Given changes published at minutes 0, 0, 1 and a day later (a change that makes no member or ends none too)
    sizes = AudienceSizes()
    day = 24 * 60 * 60_000

    def at(ms: int, status: MembershipStatus, previous: MembershipStatus | None, audience: str = "a") -> MembershipChange:
        return MembershipChange("p1", audience, 1, status, previous, {}, {}, "r", None, "streaming", 0, ms, "k")

    sizes.apply(0, [at(1_000, "realized", None), at(59_000, "exited", "realized"), at(61_000, "realized", "exited"),
                    at(62_000, "existing", "realized"), at(5_000, "realized", None, "b")])
    # Then the minutes hold their entries and exits (partition 0 is not counted: flows are counted all the same)
    assert sizes.flows("a", 120_000) == {0: [1, 1], 60_000: [1, 0]}
    assert sizes.flows("b", 120_000) == {0: [1, 0]} and sizes.flows("c", 0) == {}
    # When a change comes a day later, Then the minutes older than a day are gone
    sizes.apply(0, [at(day + 60_000, "exited", "realized")])
    assert sizes.flows("a", day + 60_000) == {day + 60_000: [0, 1]}
