"""SIGKILL of a worker at ten random points while events flow, each restarted at once (one onto an empty disk)."""

from __future__ import annotations

import random

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(900)]


def test_ten_sigkills_with_restarts_end_as_the_reference(scenario) -> None:
    # Given two workers sharing the partitions and 1,000 generated people (about 9,500 records) fed at 100/s
    s = scenario("sigkill-x10", people=1000, rate=100).begin(("w1", "w2"))
    timing = random.Random(s.seed)
    points = sorted(timing.uniform(0.05, 0.95) for _ in range(10))
    empty = timing.randrange(10)
    # When, at ten random points of the feed, one of them (chosen at random) is SIGKILLed and started again at
    # once under the same name (a static member takes its partitions back), once onto an empty disk
    for n, at in enumerate(points):
        s.feed.wait_sent(at)
        s.sigkill_restart(timing.choice(("w1", "w2")), empty_disk=n == empty)
    # Then the final memberships, the stored profiles and the records equal the undisturbed reference
    s.finish(quiesce_s=240, converge_s=60)
    s.check()
