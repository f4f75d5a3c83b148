"""The fault suite's fast subset, in `make test`: three SIGKILLs and a 1 -> 2 -> 1 rebalance on a small load."""

from __future__ import annotations

import math
import random

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_three_sigkills_with_restarts_end_as_the_reference(scenario) -> None:
    # Given one worker and 200 generated people (about 2,000 records) fed at 100 records/s
    s = scenario("sigkill-x3", people=200, rate=100).begin()
    timing = random.Random(s.seed)
    # When the worker is SIGKILLed at three random points of the feed and restarted at once, the last time
    # onto an empty disk (its partitions come back from the changelogs)
    for n, at in enumerate(sorted(timing.uniform(0.1, 0.9) for _ in range(3))):
        s.feed.wait_sent(at)
        s.sigkill_restart("w1", empty_disk=n == 2)
    # Then the final memberships, the stored profiles and the records equal the undisturbed reference
    s.finish(quiesce_s=120, converge_s=30)
    s.check()
    # And after each fault both groups' lag came back down
    assert math.inf not in s.report.caught_up_s, s.report.line()


def test_a_1_2_1_rebalance_while_events_flow_ends_as_the_reference(scenario) -> None:
    # Given one worker and 200 generated people fed at 100 records/s
    s = scenario("rebalance-1-2-1", people=200, rate=100).begin()
    # When a second worker joins at a third of the feed and leaves (SIGTERM) at two thirds
    s.feed.wait_sent(0.33)
    s.join("w2")
    s.feed.wait_sent(0.66)
    s.leave("w2")
    # Then the result is the reference's
    s.finish(quiesce_s=120, converge_s=30)
    s.check()
    # And after each fault both groups' lag came back down
    assert math.inf not in s.report.caught_up_s, s.report.line()
