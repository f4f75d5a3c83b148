"""Rebalances 1 -> 2 -> 3 -> 1 workers while events flow."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(600)]


def test_rebalances_1_2_3_1_while_events_flow_end_as_the_reference(scenario) -> None:
    # Given one worker and 800 generated people (about 7,500 records) fed at 100 records/s
    s = scenario("rebalance-1-2-3-1", people=800, rate=100).begin()
    # When a second and a third worker join, then both leave (SIGTERM), at a fifth of the feed each
    s.feed.wait_sent(0.2)
    s.join("w2")
    s.feed.wait_sent(0.4)
    s.join("w3")
    s.feed.wait_sent(0.6)
    s.leave("w2")
    s.feed.wait_sent(0.8)
    s.leave("w3")
    # Then the result is the reference's
    s.finish(quiesce_s=180, converge_s=60)
    s.check()
