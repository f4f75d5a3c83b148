"""Tests of a profile's byte budget for what evicting events cannot shrink: attributes and identities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from pipeline.errors import ProfileOverBudget
from pipeline.identity.datasets import Limits
from pipeline.model import Identity, ProfileRecord, ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.stages.messages import Apply, record_to_wire
from pipeline.state.codec import size_without_events

BUDGET = 4_000
T0 = 1_800_000_000_000  # real timestamps: all encode in the same number of bytes
HOME = Identity("CRMID", "42")


@pytest.fixture
def processor(make_config: Callable[..., ProfileConfig]) -> ProfileProcessor:
    config = make_config()
    limited = replace(config, datasets=replace(config.datasets, limits=Limits(max_profile_bytes=BUDGET)))
    return ProfileProcessor(limited, SegmentEngine([]), clock=lambda: 1_800_000_000.0)


def apply(processor: ProfileProcessor, entry: ProfileState | None, rec: ProfileRecord) -> ProfileState:
    res = processor.handle("p1", entry, Apply(pid="p1", rec=record_to_wire(rec), home=HOME.key, hop=True))
    assert isinstance(res.write, ProfileState)
    return res.write


def test_a_record_that_would_take_the_attributes_over_the_budget_is_refused(
        processor: ProfileProcessor, make_record: Callable[..., ProfileRecord]) -> None:
    # Given a CRM profile of about 1,700 bytes
    profile = apply(processor, None, make_record(100, attributes={f"a{i}": "v" * 30 for i in range(40)},
                                                 record_id="r1"))
    assert 1_000 < size_without_events(profile) < BUDGET
    # When a record would add 3,000 bytes of attributes Then it is refused, naming the sizes, not the values
    with pytest.raises(ProfileOverBudget) as info:
        apply(processor, profile, make_record(200, attributes={f"b{i}": "w" * 30 for i in range(80)},
                                              record_id="r2"))
    assert info.value.size > BUDGET and "w" * 30 not in str(info.value)
    # And a record that changes a value in place still applies
    fresh = apply(processor, None, make_record(100, attributes={f"a{i}": "v" * 30 for i in range(40)}))
    updated = apply(processor, fresh, make_record(300, attributes={"a0": "x" * 30}, record_id="r3"))
    assert updated.attributes["a0"].value == "x" * 30


def test_a_profile_already_over_the_budget_may_still_shrink_or_stay(
        processor: ProfileProcessor, make_record: Callable[..., ProfileRecord]) -> None:
    # Given a profile over the budget (stored before the budget was lowered)
    unlimited = ProfileProcessor(replace(processor.config, datasets=replace(processor.config.datasets,
                                                                             limits=Limits())),
                                 SegmentEngine([]), clock=lambda: 1_800_000_000.0)
    big = apply(unlimited, ProfileState("p1", 0, identities={"CRMID": {"42": T0}}),
                make_record(T0 + 100, attributes={f"a{i}": "v" * 100 for i in range(60)}))
    assert size_without_events(big) > BUDGET
    # When a record deletes an attribute, and another sets one to a value of the same size
    shrunk = apply(processor, big, make_record(T0 + 200, attributes={"a0": None}, record_id="r2"))
    same = apply(processor, shrunk, make_record(T0 + 300, attributes={"a1": "w" * 100}, record_id="r3"))
    # Then both apply
    assert "a0" not in {k for k, v in same.attributes.items() if v.value is not None}
    assert same.attributes["a1"].value == "w" * 100
