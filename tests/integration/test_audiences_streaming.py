"""Audiences on the real broker and worker: streaming memberships against the reference evaluator
(window edges, deadlines, late links and merges), definition changes while running, batch runs, edge."""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
from http_client import HTTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_helpers import Collector, produce

from pipeline.ingest.decode import flatten
from pipeline.model import ExperienceEvent, Identity, ProfileRecord, ProfileState
from pipeline.profiles.merge import apply_event, apply_record
from pipeline.segments import load_segments_text
from pipeline.segments.reference import reference_evaluate
from pipeline.settings import PipelineConfig, Settings
from pipeline.state.snapshot import snapshot

pytestmark = pytest.mark.integration


def segments(visit_s: int, abandon_s: int) -> str:
    """Audiences of every kind; `visit_s` and `abandon_s` are the two short, clock-driven windows."""
    return f"""
audiences:
  - {{id: shoes-2, name: s, description: d, query: 'count(event productView where product.category = "shoes" within 1d) >= 2'}}
  - {{id: just-visited, name: s, description: d, query: 'event pageView within {visit_s}s'}}
  - {{id: gold, name: s, description: d, query: 'loyalty.tier = "gold"'}}
  - {{id: big, name: s, description: d, query: 'sum(commerce.order.total of event purchase within 30d) > 500'}}
  - {{id: vip, name: s, description: d, query: 'inSegment("gold") and inSegment("big")'}}
  - {{id: abandoner, name: s, description: d, query: 'event cartAdd within 1d not followed by purchase within {abandon_s}s'}}
  - {{id: not-gold-shoes, name: s, description: d, query: 'not inSegment("gold") and event productView where product.category = "shoes" within 30d'}}
"""


SEGMENTS = segments(visit_s=20, abandon_s=8)  # the restart test: the 8 s deadline outlasts a worker's restart
# The streaming test waits out its short windows in every example, so they are short: events come 0-2 s
# before sending, so a 10 s visit and a 5 s abandonment still open inside their window; then a margin.
VISIT_S, ABANDON_S, PAST_EDGES_S = 10, 5, 4


def world_strategy(tag: str, send_ms: int) -> st.SearchStrategy[dict[str, Any]]:
    """One person: cookie events at offsets that keep every window edge away from the check time,
    maybe a CRM record, maybe a login that links the cookie to the CRM id (arriving in any order)."""
    offsets = st.sampled_from([-3 * 86400_000, -2 * 3600_000, -2000, -1000, 0])

    @st.composite
    def person(draw: st.DrawFn) -> dict[str, Any]:
        n = draw(st.integers(0, 10**6))
        cookie, crm = f"{tag}-c{n}", f"{tag}-C{n}"
        events: list[dict[str, Any]] = []
        for i in range(draw(st.integers(1, 6))):
            etype = draw(st.sampled_from(["pageView", "productView", "cartAdd", "purchase"]))
            ev: dict[str, Any] = {"eventId": f"{tag}-{n}-{i}", "timestamp": send_ms + draw(offsets),
                                  "eventType": etype, "dataset": "web-events",
                                  "identityMap": {"ECID": [{"id": cookie, "primary": True}]}}
            if etype in ("productView", "cartAdd"):
                ev["product"] = {"category": draw(st.sampled_from(["shoes", "bags"])), "price": 10.0}
            if etype == "purchase":
                ev["commerce"] = {"order": {"id": f"o{i}", "total": draw(st.sampled_from([100.0, 450.0])),
                                            "currency": "EUR"}}
            events.append(ev)
        records = []
        if draw(st.booleans()):
            records.append({"recordId": f"{tag}-r{n}", "timestamp": send_ms - 5000, "dataset": "crm",
                            "crmId": crm, "loyalty": {"tier": draw(st.sampled_from(["gold", "silver"]))}})
            if draw(st.booleans()):
                events.append({"eventId": f"{tag}-{n}-login", "timestamp": send_ms - 500, "eventType": "login",
                               "dataset": "web-events",
                               "identityMap": {"ECID": [{"id": cookie}], "CRMID": [{"id": crm}]}})
        return {"cookie": cookie, "crm": crm, "events": events, "records": records}

    return person()


def expected_profile(cfg: Any, events: list[dict[str, Any]], records: list[dict[str, Any]]) -> ProfileState:
    """The reference profile of one component: every input applied to a fresh state."""
    p = ProfileState("ref", created_ms=0)
    for r in records:
        attrs: dict[str, Any] = {}
        flatten({k: v for k, v in r.items() if k in ("loyalty",)}, "", attrs)
        apply_record(p, ProfileRecord(r["recordId"], r["timestamp"], r["dataset"], (), None, attrs), cfg)
    for e in events:
        fields: dict[str, Any] = {}
        flatten({k: v for k, v in e.items() if k in ("product", "commerce")}, "", fields)
        apply_event(p, ExperienceEvent(e["eventId"], e["timestamp"], e["eventType"], e["dataset"], (), None,
                                       fields), cfg)
    return p


def test_streaming_memberships_match_the_reference(make_config, registry, kafka_bootstrap, start_worker, tmp_path):
    # Given a worker with audiences of every kind (attributes, counts, sums, absence, segment-of-segments)
    streaming_segments = segments(VISIT_S, ABANDON_S)
    config_dir = make_config(streaming_segments)
    start_worker(config_dir=config_dir)
    cfg = PipelineConfig.load(config_dir)
    audiences = load_segments_text(streaming_segments)
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")

    @settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        tag = uuid.uuid4().hex[:6]
        send_ms = int(time.time() * 1000)
        people = data.draw(st.lists(world_strategy(tag, send_ms), min_size=3, max_size=8,
                                    unique_by=lambda p: p["cookie"]))
        # When their events and records arrive in a shuffled order (links may come last)
        events = [e for p in people for e in p["events"]]
        random.Random(data.draw(st.integers(0, 1000))).shuffle(events)
        produce(registry, kafka_bootstrap, "ingest.profiles", [r for p in people for r in p["records"]])
        produce(registry, kafka_bootstrap, "ingest.events", events)
        # ... and the clock passes every short edge (visits, abandonment) without new data
        check_ms = send_ms + (max(VISIT_S, ABANDON_S) + PAST_EDGES_S) * 1000
        while time.time() * 1000 < check_ms:
            memberships.poll(0.5)
        # Then each person's final memberships equal the reference evaluator's over their whole input
        deadline = time.monotonic() + 30
        problems: list[str] = ["unchecked"]
        while problems and time.monotonic() < deadline:
            snap = snapshot(registry, kafka_bootstrap)
            problems = []
            for p in people:
                linked = any(e["eventType"] == "login" for e in p["events"])
                parts = ([(p["cookie"], p["events"], p["records"])] if linked else
                         [(p["cookie"], p["events"], []), (p["crm"], [], p["records"])] if p["records"] else
                         [(p["cookie"], p["events"], [])])
                for ident, evs, recs in parts:
                    ns = "ECID" if ident == p["cookie"] else "CRMID"
                    owner = snap.owner(Identity(ns, ident).key)
                    want = {a for a, ok in reference_evaluate(audiences, expected_profile(cfg.profile, evs, recs),
                                                               int(time.time() * 1000)).items() if ok}
                    got = snap.profiles[owner].active_segments() if owner in snap.profiles else None
                    if got != want:
                        problems.append(f"{ns} {ident}: pipeline {sorted(got or [])} != reference {sorted(want)}")
            if problems:
                time.sleep(1)
        assert not problems, "\n".join(problems)
        # And the emitted changes per (profile, audience) alternate realized/exited: no message for a non-change
        memberships.poll(1)
        seq: dict[tuple[str, str], list[str]] = defaultdict(list)
        for m in memberships.messages:
            v = m["value"]
            seq[(v["profile_id"], v["audience_id"])].append(v["status"])
        for key, statuses in seq.items():
            assert all(a != b for a, b in zip(statuses, statuses[1:], strict=False)), (key, statuses)
            assert statuses[0] == "realized", (key, statuses)

    run()
    kinds = {m["value"]["evaluation"] for m in memberships.messages}
    assert "deadline" in kinds  # time-driven changes happened without new events
    memberships.close()


V1 = """
audiences:
  - {id: gold, name: Gold, description: d, version: 1, query: 'loyalty.tier = "gold"'}
  - {id: silver, name: Silver, description: d, query: 'loyalty.tier = "silver"'}
"""
V2 = """
audiences:
  - {id: gold, name: Gold or silver, description: d, version: 2, query: 'loyalty.tier in ["gold", "silver"]'}
  - {id: bronze, name: Bronze, description: d, query: 'loyalty.tier = "bronze"'}
"""


def crm(tag: str, n: int, tier: str, ts: int) -> dict[str, Any]:
    return {"recordId": f"{tag}-{n}", "timestamp": ts, "dataset": "crm", "crmId": f"{tag}-C{n}",
            "email": f"{tag}.{n}@example.com", "loyalty": {"tier": tier}}


def test_definition_changes_evaluate_existing_profiles(make_config, registry, kafka_bootstrap, start_worker, tmp_path):
    # Given profiles evaluated under definitions v1 (gold, silver) by a running worker
    tag = uuid.uuid4().hex[:6]
    config_dir = make_config(V1, "live")
    w = start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    tiers = {0: "gold", 1: "silver", 2: "bronze"}
    produce(registry, kafka_bootstrap, "ingest.profiles", [crm(tag, n, t, now) for n, t in tiers.items()])
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    memberships.wait_for(lambda ms: len(ms) >= 2, what="v1 memberships")
    memberships.settle(quiet_s=2)
    before = len(memberships.messages)
    assert sorted(m["value"]["audience_id"] for m in memberships.messages) == ["gold", "silver"]
    # When a broken edit is saved, the worker keeps v1 and says where the problem is
    (config_dir / "segments.yaml").write_text(V2.replace('"bronze"\'', '"bronze"'))
    deadline = time.monotonic() + 30
    while "segments not reloaded" not in w.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"{config_dir / 'segments.yaml'}:" in w.log()
    # When v2 is saved while it runs: gold edited (now gold or silver), silver removed, bronze added
    time.sleep(1.1)  # a distinct modification time for the watcher
    (config_dir / "segments.yaml").write_text(V2)
    # Then existing profiles are evaluated at once: the silver one enters gold v2, leaves silver,
    # the bronze one enters bronze; the gold one gets no message (no change)
    memberships.wait_for(lambda ms: len(ms) >= before + 3, what="definition-change memberships")
    memberships.settle(quiet_s=3)
    new = sorted((m["value"]["audience_id"], m["value"]["status"], m["value"]["audience_version"],
                  m["value"]["evaluation"], m["value"]["identities"]["CRMID"][0])
                 for m in memberships.messages[before:])
    assert new == [("bronze", "realized", 1, "definition", f"{tag}-C2"),
                   ("gold", "realized", 2, "definition", f"{tag}-C1"),
                   ("silver", "exited", 1, "definition", f"{tag}-C1")]
    memberships.close()


def test_batch_run_and_edge_evaluation(make_config, registry, kafka_bootstrap, start_worker, tmp_path, topic_prefix,
                                       monkeypatch):
    # Given a worker with the example audiences and a few CRM profiles
    config_dir = make_config(V1)
    w = start_worker(config_dir=config_dir)
    tag = uuid.uuid4().hex[:6]
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles", [crm(tag, n, "gold" if n % 2 else "silver", now)
                                                           for n in range(20)])
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    memberships.wait_for(lambda ms: len(ms) >= 20, what="streaming memberships")
    memberships.settle(quiet_s=2)
    # When a batch run evaluates every audience over every profile
    from pipeline import cli
    monkeypatch.setenv("KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("PIPELINE_TOPIC_PREFIX", topic_prefix)
    settings_ = Settings.from_env(config_dir)
    before_run = int(time.time() * 1000)
    assert cli.run_batch(settings_, [], timeout_s=60) == 0
    # Then it emits nothing (streaming already got everything right): only real changes are emitted
    memberships.settle(quiet_s=2)
    assert len(memberships.messages) == 20
    # And an incremental run starts from that completed run
    assert cli.last_run_start(settings_) >= before_run
    # And the edge endpoint evaluates a profile's edge audiences on request
    r = HTTP.post(f"{w.url}/edge/evaluate", json={"namespace": "Email", "id": f"{tag}.1@example.com"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["audiences"] == {"gold": True, "silver": False}
    r = HTTP.post(f"{w.url}/edge/evaluate", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["type"].endswith(":invalid-json")
    memberships.close()


def test_pending_deadlines_survive_a_restart(make_config, registry, kafka_bootstrap, start_worker, tmp_path):
    # Given a cart add whose abandonment deadline (8 s) is pending in a worker's state
    config_dir = make_config(SEGMENTS)
    w = start_worker(config_dir=config_dir, data_dir=tmp_path / "d1")
    tag = uuid.uuid4().hex[:6]
    produce(registry, kafka_bootstrap, "ingest.events", [{
        "eventId": f"{tag}-cart", "timestamp": int(time.time() * 1000), "eventType": "cartAdd",
        "dataset": "web-events", "identityMap": {"ECID": [{"id": f"{tag}-c"}]}, "product": {"category": "bags"}}])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = snapshot(registry, kafka_bootstrap)
        owner = snap.owner(Identity("ECID", f"{tag}-c").key)
        if owner in snap.profiles and snap.profiles[owner].next_deadline_ms:
            break
        time.sleep(0.5)
    assert owner in snap.profiles and snap.profiles[owner].next_deadline_ms
    # When the worker is replaced by one on an empty disk before the deadline
    w.stop()
    start_worker(config_dir=config_dir, data_dir=tmp_path / "d2")
    # Then the deadline still fires: the profile enters the abandonment audience without any new event
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    msgs = memberships.wait_for(lambda ms: any(m["value"]["audience_id"] == "abandoner" for m in ms),
                                timeout_s=60, what="abandonment after restart")
    hit = next(m["value"] for m in msgs if m["value"]["audience_id"] == "abandoner")
    assert (hit["status"], hit["evaluation"], hit["profile_id"]) == ("realized", "deadline", owner)
    memberships.close()
