"""Identity hygiene through a real worker (issue 16 item 6): placeholder ids ("undefined", "null") sent by
two different people do not merge them, and a record carrying nothing but placeholders is dead-lettered
with its reason."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from http_client import HTTP
from kafka_helpers import Collector, produce

pytestmark = pytest.mark.integration

SEGMENTS = """
audiences:
  - id: visitors
    name: Visitors
    description: viewed a page in the last day
    query: event pageView within 1d
"""


@pytest.fixture
def config_dir(make_config) -> Path:
    return make_config(SEGMENTS)


def page_view(eid: str, ts: int, ids: dict[str, list[str]]) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {ns: [{"id": v} for v in values] for ns, values in ids.items()}}


def profile(url: str, namespace: str, value: str) -> httpx.Response:
    return HTTP.get(f"{url}/profiles", params={"namespace": namespace, "id": value}, timeout=10)


def test_placeholder_ids_do_not_merge_two_people_and_an_all_placeholder_record_is_dead_lettered(
        registry, kafka_bootstrap, start_worker, config_dir):
    # Given a worker with the example identity rules (placeholders dropped from records)
    worker = start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    # When Ann and Bob each send a page view whose cookie and CRM id are a broken tag's placeholders, and
    # a third record carries nothing but placeholders
    produce(registry, kafka_bootstrap, "ingest.events", [
        page_view("ann-1", now - 2, {"Email": ["ann@example.com"], "ECID": ["undefined"], "CRMID": ["null"]}),
        page_view("bob-1", now - 1, {"Email": ["bob@example.com"], "ECID": ["UNDEFINED"], "CRMID": ["null"]}),
        page_view("nobody-1", now, {"ECID": ["undefined"], "Email": ["null"], "Phone": ["0"]}),
    ], key=lambda v: "one-partition")
    # Then the placeholder-only record is on the dead-letter topic with its reason, and no value
    msgs = dlq.wait_for(lambda ms: len(ms) >= 1, timeout_s=30, what="the dead letter")
    headers = msgs[0]["headers"]
    assert (headers["reason"], headers["detail"]) == (
        "no-usable-identity", "blocked ECID value: a placeholder on the blocked_values list; "
        "blocked Email value: a placeholder on the blocked_values list; "
        "blocked Phone value: a placeholder on the blocked_values list")
    # And Ann and Bob have a profile each, holding only their own identities and their own event
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ann, bob = profile(worker.url, "Email", "ann@example.com"), profile(worker.url, "Email", "bob@example.com")
        if ann.status_code == bob.status_code == 200:
            break
        time.sleep(0.3)
    ann_p, bob_p = ann.json(), bob.json()
    assert ann_p["profile_id"] != bob_p["profile_id"]
    assert sorted(ann_p["identities"]) == sorted(bob_p["identities"]) == ["EMAIL_LC_SHA256", "Email"]
    assert [e["event_id"] for e in ann_p["recent_events"]] == ["ann-1"]
    assert [e["event_id"] for e in bob_p["recent_events"]] == ["bob-1"]
    # And a placeholder cannot even be looked up, and the drops are counted by namespace and reason
    assert profile(worker.url, "ECID", "undefined").json() == {
        "type": "urn:cdp-pipeline:problem:invalid-identity", "title": "Bad Request", "status": 400,
        "detail": "blocked ECID value: a placeholder on the blocked_values list"}
    text = HTTP.get(f"{worker.url}/metrics", timeout=10).text
    counted = {(m[0], m[1]): float(m[2]) for m in re.findall(
        r'^cdp_identities_dropped_total\{namespace="([^"]+)",reason="([^"]+)"\} (\S+)$', text, re.M)}
    assert counted == {("ECID", "blocked-value"): 3.0, ("CRMID", "blocked-value"): 2.0,
                       ("Email", "blocked-value"): 1.0, ("Phone", "blocked-value"): 1.0}
    assert "undefined" not in worker.log().lower() and "Traceback" not in worker.log()
    dlq.settle(quiet_s=1)
    assert len(dlq.messages) == 1
    dlq.close()
