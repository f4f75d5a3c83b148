"""One record never stops the pipeline (issue 14): records over the size limits anywhere in a batch, a null
value, and a profile that outgrows what the broker accepts, on a real broker and a real worker process."""

from __future__ import annotations

import base64
import time
from pathlib import Path

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


def page_view(eid: str, ts: int, cookie: str, **fields: object) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {"ECID": [{"id": cookie}]}, "fields": fields}


def events_of(url: str, cookie: str) -> list[str]:
    r = HTTP.get(f"{url}/profiles", params={"namespace": "ECID", "id": cookie}, timeout=10)
    return sorted(e["event_id"] for e in r.json()["recent_events"]) if r.status_code == 200 else []


def test_poison_records_at_the_start_middle_and_end_of_a_batch(registry, kafka_bootstrap, start_worker,
                                                               config_dir):
    # Given a running worker with the example limits (64 KiB per record, 20 identities per record)
    worker = start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    codec = registry["ingest.events"].codec
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    too_big = codec.encode(page_view("bad-big", now, "c-big", blob="x" * 100_000))
    too_many = codec.encode({**page_view("bad-many", now, "c-many"),
                             "identityMap": {"ECID": [{"id": f"c-many-{i}"} for i in range(25)]}})
    good = [codec.encode(page_view(f"e{i}", now - i, f"c{i % 60}")) for i in range(300)]
    # When one partition receives, in one batch: an oversized record first, 150 good ones, a record with 25
    # identities, 150 good ones, and a null value last
    batch: list[bytes | None] = [too_big, *good[:150], too_many, *good[150:], None]
    produce(registry, kafka_bootstrap, "ingest.events", batch, raw=True, key=lambda v: "one-partition")
    # Then the three poison records are on the dead-letter topic, in order, with their reason, source offset
    # and original size (the null as a null)
    msgs = dlq.wait_for(lambda ms: len(ms) >= 3, timeout_s=60, what="3 dead letters")
    dlq.settle(quiet_s=2)
    got = [(m["headers"]["reason"], int(m["headers"]["source_offset"]) - int(msgs[0]["headers"]["source_offset"]),
            m["headers"]["original_size"]) for m in sorted(dlq.messages, key=lambda m: int(m["headers"]["source_offset"]))]
    assert got == [("record-too-large", 0, str(len(too_big))), ("too-many-identities", 151, str(len(too_many))),
                   ("null-value", 302, "0")]
    by_reason = {m["headers"]["reason"]: m for m in dlq.messages}
    assert base64.b64decode(by_reason["record-too-large"]["value_b64"]) == too_big  # under the copy limit: whole
    assert by_reason["null-value"]["value"] is None
    # And every one of the 300 good records around them is applied
    deadline = time.monotonic() + 60
    expected = {f"c{c}": sorted(f"e{i}" for i in range(300) if i % 60 == c) for c in range(60)}
    while time.monotonic() < deadline:
        missing = [c for c, evs in expected.items() if events_of(worker.url, c) != evs]
        if not missing:
            break
        time.sleep(0.5)
    assert not missing, f"{len(missing)} cookies without all their events, e.g. {missing[:3]}"
    assert worker.proc.poll() is None
    dlq.close()


def test_a_profile_whose_attributes_outgrow_its_budget_refuses_the_records_and_stays_usable(
        registry, kafka_bootstrap, start_worker, config_dir):
    # Given a running worker (profile budget 256 KiB), and a CRM customer whose records each add 55 KB of new
    # attributes: after 4 of them the profile is at its budget (and after about 18 past the 1 MB a Kafka
    # message may hold)
    worker = start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    internal_dlq = Collector(registry, kafka_bootstrap, "internal.dlq")
    records = [{"recordId": f"r{n}", "timestamp": now - 1000 + n, "dataset": "crm", "crmId": "C-HUGE",
                "attributes": {f"a{n}.{k}": "v" * 500 for k in range(110)}} for n in range(22)]
    # When its 22 records arrive, then a small update of the same customer, and 100 page views of others
    produce(registry, kafka_bootstrap, "ingest.profiles", records, key=lambda v: "C-HUGE")
    produce(registry, kafka_bootstrap, "ingest.profiles", [{"recordId": "small", "timestamp": now, "dataset": "crm",
                                                            "crmId": "C-HUGE", "attributes": {"a0.0": "updated"}}],
            key=lambda v: "C-HUGE")
    produce(registry, kafka_bootstrap, "ingest.events", [page_view(f"v{i}", now, f"visitor{i}") for i in range(100)])
    # Then the 18 records the profile could not take are dead-lettered with the reason, without their values
    msgs = internal_dlq.wait_for(lambda ms: len(ms) >= 18, timeout_s=60, what="18 dead-lettered records")
    internal_dlq.settle(quiet_s=2)
    assert len(internal_dlq.messages) == 18
    assert {m["headers"]["reason"] for m in msgs} == {"handling-failed"}
    assert all("over its budget of 262144" in m["headers"]["detail"] for m in msgs), msgs[0]["headers"]
    assert {m["headers"]["stage_topic"] for m in msgs} == {"internal.profile-ops"}
    # And the profile holds the first 4 records and the small update
    deadline = time.monotonic() + 60
    profile: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = HTTP.get(f"{worker.url}/profiles", params={"namespace": "CRMID", "id": "C-HUGE"}, timeout=10)
        profile = r.json() if r.status_code == 200 else {}
        if profile.get("attributes", {}).get("a0.0", {}).get("value") == "updated":
            break
        time.sleep(0.5)
    attrs = profile["attributes"]
    assert isinstance(attrs, dict)
    assert attrs["a0.0"]["value"] == "updated" and sorted({k.split(".")[0] for k in attrs}) == ["a0", "a1", "a2", "a3"]
    # And the worker is still running and applies everything else
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(events_of(worker.url, f"visitor{i}") != [f"v{i}"] for i in (0, 50, 99)):
        time.sleep(0.5)
    assert [events_of(worker.url, f"visitor{i}") for i in range(100)] == [[f"v{i}"] for i in range(100)]
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log()
    internal_dlq.close()
