"""Backpressure: a burst of records of new people, more than the stage topics may fall behind by, is taken in
step with the identity stage (ingest waits), and every record still reaches its profile."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from http_client import HTTP
from kafka_helpers import produce

pytestmark = pytest.mark.integration

PEOPLE = 3000


def metric(url: str, name: str, labels: str = "") -> float:
    text = HTTP.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M))


@pytest.mark.timeout(240)
def test_a_burst_of_new_people_is_taken_in_step_with_the_identity_stage(registry: Any, kafka_bootstrap: str,
                                                                          start_worker: Any) -> None:
    # Given a worker whose ingest waits while its stage topics are more than 20 messages behind
    worker = start_worker("w1", extra_env={"PIPELINE_STAGE_BACKLOG_MAX": "20"})
    now = int(time.time() * 1000)
    # When a burst of page views of 3,000 people it has never seen arrives (each goes through the identity topic)
    produce(registry, kafka_bootstrap, "ingest.events", [{
        "eventId": f"bp-{i}", "timestamp": now, "eventType": "pageView", "dataset": "web-events",
        "identityMap": {"ECID": [{"id": f"bp-cookie-{i}", "primary": True}]}} for i in range(PEOPLE)],
        key=lambda v: v["eventId"])
    deadline = time.monotonic() + 180
    applied = 0.0
    while time.monotonic() < deadline:
        applied = metric(worker.url, "cdp_profile_ops_total", '{op="apply"}')
        if applied >= PEOPLE:
            break
        time.sleep(0.5)
    # Then every record reached its profile (once: one new profile each)
    assert applied == PEOPLE
    assert metric(worker.url, "cdp_profile_events_total", '{what="duplicates"}') == 0
    # and ingest waited for the identity stage meanwhile, and said so
    assert metric(worker.url, "cdp_ingest_backpressure_seconds_total") > 0
    assert "ingest waits for the stage topics" in worker.log()
    # and once caught up, nothing is behind
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(worker.url, "cdp_stage_backlog_messages") > 0:
        time.sleep(0.3)
    assert metric(worker.url, "cdp_stage_backlog_messages") == 0
