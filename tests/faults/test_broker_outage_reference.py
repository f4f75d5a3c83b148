"""The broker stopped (SIGTERM) or killed (SIGKILL) for 20 s and for 120 s while events flow, then started again."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.local.broker import LocalBroker

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(900)]


@pytest.fixture
def kafka_bootstrap(own_broker: LocalBroker) -> str:
    """This module's tests run on a broker of their own: taking it down disturbs no other test."""
    return own_broker.bootstrap


def take_down(broker: LocalBroker, how: str) -> None:
    if how == "stop":
        broker.stop(timeout_s=60)  # SIGTERM: a controlled shutdown
        return
    assert broker.proc is not None
    os.killpg(broker.proc.pid, signal.SIGKILL)
    broker.proc.wait(30)


@pytest.mark.parametrize(("how", "outage_s"), [("stop", 20), ("kill", 20), ("stop", 120), ("kill", 120)],
                         ids=["stop-20s", "sigkill-20s", "stop-120s", "sigkill-120s"])
def test_a_broker_outage_while_events_flow_ends_as_the_reference(how: str, outage_s: int, scenario,
                                                                  own_broker: LocalBroker) -> None:
    # Given one worker and 300 generated people, fed so that records keep coming through the outage (the
    # producer buffers them) and for a minute after it
    people = 300
    s = scenario(f"broker-{how}-{outage_s}s", people=people, rate=people * 9.5 / (outage_s + 60)).begin()
    worker = next(iter(s.fleet.live.values()))
    # When, at a fifth of the feed, the broker goes down for `outage_s` seconds and comes back on its data
    s.feed.wait_sent(0.2)
    s.inject(f"broker {'SIGTERM' if how == 'stop' else 'SIGKILL'} at {s.feed.progress:.0%} of the feed, "
             f"down for {outage_s}s")
    lines_before = len(worker.log().splitlines())
    down_at = time.monotonic()
    take_down(own_broker, how)
    time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))  # holding the outage open
    own_broker.start(timeout_s=180)
    s.fault_over()
    back = time.monotonic() - down_at
    lines = len(worker.log().splitlines()) - lines_before
    s.log(f"broker back after {back:.0f}s; the worker logged {lines} lines meanwhile"
          + (f" and exited {worker.proc.returncode}" if worker.proc.poll() is not None else ""))
    s.report.extra = f"broker unavailable {back:.0f}s, worker log lines during it {lines}"
    # Then the worker is still running, and the result is the reference's
    s.finish(quiesce_s=240, converge_s=60)
    s.check()
