"""End to end on the real broker: Avro events -> stitched profile -> audience -> membership message; DLQ."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from http_client import HTTP
from kafka_helpers import Collector, produce

pytestmark = pytest.mark.integration

SEGMENTS = """
audiences:
  - id: shoe-viewers
    name: Shoe viewers
    description: viewed shoes in the last day
    query: event productView where product.category = "shoes" within 1d
    attributes: [loyalty.tier]
  - id: gold
    name: Gold
    description: gold loyalty tier
    query: loyalty.tier = "gold"
"""


@pytest.fixture
def config_dir(make_config) -> Path:
    return make_config(SEGMENTS)


def event(eid: str, ts: int, etype: str, ids: dict[str, str], **payload: object) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": etype, "dataset": "web-events",
            "identityMap": {ns: [{"id": v, "primary": i == 0}] for i, (ns, v) in enumerate(ids.items())},
            **payload}


def _active(messages: list[dict[str, object]]) -> set[tuple[str, str]]:
    """(profile, audience) pairs whose latest membership change is not an exit."""
    final: dict[tuple[str, str], str] = {}
    for m in messages:
        v = m["value"]
        final[(v["profile_id"], v["audience_id"])] = v["status"]  # type: ignore[index]
    return {k for k, s in final.items() if s != "exited"}


def test_events_and_records_become_membership_changes(registry, kafka_bootstrap, start_worker, config_dir):
    # Given a worker with two audiences, and a person known by a cookie and (after login) a CRM id
    worker = start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    # When the CRM says she is gold, and she views shoes anonymously, then logs in
    produce(registry, kafka_bootstrap, "ingest.profiles", [{
        "recordId": "r1", "timestamp": now - 5000, "dataset": "crm", "crmId": "C-1",
        "email": " Ana@Example.COM ", "loyalty": {"tier": "gold", "points": 10}}])
    # (two topics have no order between them: the events come once the CRM record is applied)
    memberships.wait_for(lambda ms: any(m["value"]["audience_id"] == "gold" for m in ms), timeout_s=60,
                         what="the CRM record's gold membership")
    produce(registry, kafka_bootstrap, "ingest.events", [
        event("e1", now - 4000, "productView", {"ECID": "cookie-1"},
              product={"sku": "S1", "name": "runner", "category": "shoes", "price": 99.0}),
        event("e2", now - 3000, "login", {"ECID": "cookie-1", "CRMID": "C-1"}),
    ])
    # (whether the cookie's profile lives long enough to join shoe-viewers before the merge, and so has to
    # leave it again, depends on how the hops interleave; the end state does not)
    memberships.wait_for(lambda ms: _active(ms) and {a for _, a in _active(ms)} == {"gold", "shoe-viewers"}
                         and len({pid for pid, _ in _active(ms)}) == 1,
                         timeout_s=60, what="gold + shoe-viewers realized on one surviving profile")
    memberships.settle(quiet_s=2)
    values = [m["value"] for m in memberships.messages]
    # Then: the cookie profile (shoe-viewers) merged into the older CRM profile (gold); the survivor holds both
    active = _active(memberships.messages)
    survivors = {pid for pid, _ in active}
    assert len(survivors) == 1, values
    survivor = survivors.pop()
    assert active == {(survivor, "gold"), (survivor, "shoe-viewers")}
    # every message carries the contract fields
    for v in values:
        assert set(v) >= {"profile_id", "audience_id", "status", "identities", "cause_event_id", "event_time_ms",
                          "emit_time_ms", "idempotency_key", "evaluation", "audience_version", "previous_status"}
        assert v["emit_time_ms"] >= v["event_time_ms"]
    shoe = [v for v in values if v["audience_id"] == "shoe-viewers" and v["profile_id"] == survivor]
    assert shoe[-1]["status"] == "realized" and shoe[-1]["attributes"] == {"loyalty.tier": "gold"}
    assert shoe[-1]["identities"]["CRMID"] == ["C-1"] and shoe[-1]["identities"]["ECID"] == ["cookie-1"]
    assert shoe[-1]["identities"]["Email"] == ["ana@example.com"]  # normalised
    # idempotency keys identify changes: no two different changes share one
    assert len({v["idempotency_key"] for v in values}) == len(values)
    # And the merged profile is served by the API under any of its identities
    for ns, ident in (("ECID", "cookie-1"), ("CRMID", "C-1"), ("Email", "ANA@example.com")):
        r = HTTP.get(f"{worker.url}/profiles", params={"namespace": ns, "id": ident}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["profile_id"] == survivor
        assert [e["event_id"] for e in body["recent_events"]] == ["e2", "e1"]
        assert body["attributes"]["loyalty.tier"]["value"] == "gold"
    r = HTTP.get(f"{worker.url}/profiles", params={"namespace": "Nope", "id": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["type"].endswith(":unknown-namespace")
    memberships.close()


def test_bad_records_go_to_the_dead_letter_topic(registry, kafka_bootstrap, start_worker, config_dir):
    # Given a running worker
    start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    spec = registry["ingest.events"]
    no_identity = spec.codec.encode({"eventId": "e-noid", "timestamp": now, "eventType": "pageView",
                                     "dataset": "web-events", "identityMap": {}})
    bad_email_only = spec.codec.encode({"eventId": "e-bad", "timestamp": now, "eventType": "pageView",
                                        "dataset": "web-events", "identityMap": {"Email": [{"id": "not-an-email"}]}})
    unknown_schema = b"\x00\x7f\xff\xff\x01" + b"\x02xx"
    # When malformed bytes, an unknown schema id, records without usable identity, then a good one arrive
    produce(registry, kafka_bootstrap, "ingest.events",
            [b"this is not avro", unknown_schema, no_identity, bad_email_only], raw=True,
            key=lambda v: "k")
    produce(registry, kafka_bootstrap, "ingest.events", [event("e-ok", now, "productView", {"ECID": "c9"},
                                                               product={"category": "shoes"})])
    # Then each bad record is on the DLQ with its original bytes, reason and source; the worker keeps going
    msgs = dlq.wait_for(lambda ms: len(ms) >= 4, timeout_s=60, what="4 dead letters")
    by_offset = sorted(msgs, key=lambda m: int(m["headers"]["source_offset"]))
    assert [m["headers"]["reason"] for m in by_offset] == [
        "not-avro", "unknown-schema-id", "no-usable-identity", "no-usable-identity"]
    assert all(m["headers"]["source_topic"] == spec.name for m in by_offset)
    import base64
    assert base64.b64decode(by_offset[0]["value_b64"]) == b"this is not avro"
    assert "not-an-email" not in by_offset[3]["headers"]["detail"]  # no personal data echoed
    memberships.wait_for(lambda ms: any(m["value"]["audience_id"] == "shoe-viewers" for m in ms),
                         timeout_s=60, what="the good record still processed")
    dlq.close()
    memberships.close()
