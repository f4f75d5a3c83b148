"""Identity stitching across partitions and worker processes, on the real broker (4 partitions, 2 workers).

The oracle is tests/identity/reference.py (connected components of the link graph); the state checked is
read from the tables' changelog topics, i.e. the whole graph whichever worker owns which partition.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from http_client import HTTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from identity.reference import reference_components
from kafka_helpers import produce, wait_group_stable
from procs import wait_settled

from pipeline.model import Identity
from pipeline.settings import DEFAULT_CONFIG, PipelineConfig
from pipeline.state.snapshot import GraphSnapshot, snapshot

pytestmark = pytest.mark.integration

NO_SEGMENTS = "audiences: []\n"


@pytest.fixture
def config_dir(make_config) -> Path:
    return make_config(NO_SEGMENTS)


def ev(eid: str, ts: int, ids: list[tuple[str, str]]) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {ns: [{"id": v} for v in sorted({v for n, v in ids if n == ns})] for ns, _ in ids}}


def check_graph(snap: GraphSnapshot, records: list[list[tuple[str, str]]], event_ids: set[str]) -> list[str]:
    """Problems with the stitched graph for these records (empty when right)."""
    cfg = PipelineConfig.load(DEFAULT_CONFIG).profile
    problems: list[str] = []
    idents = {Identity(ns, v.lower() if ns == "Email" else v) for rec in records for ns, v in rec}
    keys = {i.key for i in idents}
    holders: dict[str, list[str]] = {}
    for pid, p in snap.profiles.items():
        for i in p.identity_list():
            if i.key in keys:
                holders.setdefault(i.key, []).append(pid)
    for k in sorted(keys):
        owner = snap.owner(k)
        if owner is None or owner not in snap.profiles:
            problems.append(f"{k}: no live owner ({snap.identities.get(k)})")
        elif holders.get(k) != [owner]:
            problems.append(f"{k}: owner {owner} but held by {holders.get(k)}")
    expected = {frozenset(c) for c in reference_components(
        [[Identity(ns, v.lower() if ns == "Email" else v) for ns, v in rec] for rec in records], cfg.identity)}
    got: dict[str, set[Identity]] = {}
    for i in idents:
        owner = snap.owner(i.key)
        if owner:
            got.setdefault(owner, set()).add(i)
    if {frozenset(g) for g in got.values()} != expected:
        problems.append(f"components differ: expected {sorted(map(sorted, expected))}, got {sorted(map(sorted, got.values()))}")
    seen = Counter(e.event_id for p in snap.profiles.values() for e in p.events if e.event_id in event_ids)
    if set(seen) != event_ids or any(n != 1 for n in seen.values()):
        problems.append(f"events: missing {sorted(event_ids - set(seen))[:5]}, "
                        f"duplicated {[e for e, n in seen.items() if n > 1][:5]}")
    return problems


def wait_graph(registry, bootstrap, records, event_ids, timeout_s: float = 150) -> GraphSnapshot:
    deadline = time.monotonic() + timeout_s
    problems: list[str] = ["not checked"]
    while time.monotonic() < deadline:
        snap = snapshot(registry, bootstrap)
        problems = check_graph(snap, records, event_ids)
        if not problems:
            return snap
        time.sleep(1)
    raise AssertionError("graph not right after quiescence:\n" + "\n".join(problems[:20]))


@st.composite
def link_graphs(draw: st.DrawFn) -> list[list[tuple[str, str]]]:
    """People with cookies, devices, an e-mail and at most one CRM id; records link random subsets of one
    person's identities (so no unique-namespace conflict), in a shuffled arrival order."""
    records: list[list[tuple[str, str]]] = []
    for p in range(draw(st.integers(1, 4))):
        ids = [("ECID", f"c{p}-{i}") for i in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            ids.append(("Email", f"P{p}@Mail.io"))
        if draw(st.booleans()):
            ids.append(("CRMID", f"C{p}"))
        if draw(st.booleans()):
            ids.append(("GAID", f"g{p}"))
        for _ in range(draw(st.integers(1, 4))):
            records.append(draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True)))
    return draw(st.permutations(records))


def test_random_graphs_stitch_into_connected_components(registry, kafka_bootstrap, start_worker, config_dir):
    # Given two worker processes sharing 4 partitions of every topic
    w1 = start_worker("w1", config_dir=config_dir, wait=False)
    w2 = start_worker("w2", config_dir=config_dir, wait=False)
    w1.wait_ready()
    w2.wait_ready()
    wait_group_stable(kafka_bootstrap, w1.env["PIPELINE_APP_ID"], members=2)
    wait_settled([w1, w2])

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(link_graphs())
    def run(graph: list[list[tuple[str, str]]]) -> None:
        # When the records of a random graph arrive in a random order (identities unique to this example)
        tag = uuid.uuid4().hex[:6]
        records = [[(ns, f"{tag}.{v}") for ns, v in rec] for rec in graph]
        now = int(time.time() * 1000)
        events = [ev(f"{tag}-e{i}", now + i, rec) for i, rec in enumerate(records)]
        produce(registry, kafka_bootstrap, "ingest.events", events)
        # Then, after quiescence, profiles are exactly the connected components, with every event once
        wait_graph(registry, kafka_bootstrap, records, {e["eventId"] for e in events})  # type: ignore[misc]

    run()


def _partition(key: str, n: int = 4) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % n


def test_merge_across_partitions_with_a_burst_on_both_sides(registry, kafka_bootstrap, start_worker, config_dir):
    # Given two identities whose identity-table partitions differ, each with its own profile
    start_worker("w1", config_dir=config_dir)
    tag = uuid.uuid4().hex[:6]
    cookie = ("ECID", f"{tag}-cookie")
    email = next(("Email", f"{tag}-{i}@x.io") for i in range(100)
                 if _partition(f"Email:{tag}-{i}@x.io") != _partition(f"ECID:{tag}-cookie"))
    now = int(time.time() * 1000)
    before = [ev(f"{tag}-a{i}", now + i, [cookie]) for i in range(30)] + \
             [ev(f"{tag}-b{i}", now + i, [email]) for i in range(30)]
    # When the link arrives in the middle of a burst of events for both sides
    link = [ev(f"{tag}-link", now + 100, [cookie, email])]
    after = [ev(f"{tag}-{side}{i}", now + 200 + i, [ids])
             for i in range(40) for side, ids in (("c", cookie), ("d", email))]
    produce(registry, kafka_bootstrap, "ingest.events", before + link + after)
    # Then one profile holds both identities and all 141 events exactly once
    all_ids = {e["eventId"] for e in before + link + after}
    snap = wait_graph(registry, kafka_bootstrap, [[cookie, email]], all_ids)  # type: ignore[misc]
    owner = snap.owner(Identity(*cookie).key)
    assert owner is not None and len(snap.profiles[owner].events) == 141


def test_unique_namespace_conflict_keeps_two_customers_apart(registry, kafka_bootstrap, start_worker, config_dir):
    # Given customer C1 known by a shared cookie
    start_worker("w1", config_dir=config_dir)
    tag = uuid.uuid4().hex[:6]
    cookie, c1, c2 = ("ECID", f"{tag}-shared"), ("CRMID", f"{tag}-C1"), ("CRMID", f"{tag}-C2")
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.events", [ev(f"{tag}-1", now, [cookie, c1])])
    wait_graph(registry, kafka_bootstrap, [[cookie, c1]], {f"{tag}-1"})
    # When a second, different CRM id logs in on the same cookie
    produce(registry, kafka_bootstrap, "ingest.events", [ev(f"{tag}-2", now + 1, [cookie, c2])])
    # Then the two customers stay apart: the cookie stays with C1, C2 gets its own profile with the event
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snap = snapshot(registry, kafka_bootstrap)
        o1, o2 = snap.owner(Identity(*c1).key), snap.owner(Identity(*c2).key)
        if o1 and o2 and o2 in snap.profiles and snap.profiles[o2].events:
            break
        time.sleep(1)
    assert o1 != o2
    assert snap.owner(Identity(*cookie).key) == o1
    assert [e.event_id for e in snap.profiles[o1].events] == [f"{tag}-1"]
    assert [e.event_id for e in snap.profiles[o2].events] == [f"{tag}-2"]
    assert set(snap.profiles[o2].identities) == {"CRMID"}


def test_state_survives_a_restart_from_the_changelogs(registry, kafka_bootstrap, start_worker, config_dir,
                                                      tmp_path):
    # Given a worker that stitched a cookie and an e-mail into one profile
    w = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "d1")
    tag = uuid.uuid4().hex[:6]
    cookie, email = ("ECID", f"{tag}-c"), ("Email", f"{tag}@x.io")
    now = int(time.time() * 1000)
    first = [ev(f"{tag}-1", now, [cookie]), ev(f"{tag}-2", now + 1, [email]), ev(f"{tag}-3", now + 2, [cookie, email])]
    produce(registry, kafka_bootstrap, "ingest.events", first)
    snap = wait_graph(registry, kafka_bootstrap, [[cookie, email]], {e["eventId"] for e in first})  # type: ignore[misc]
    pid = snap.owner(Identity(*cookie).key)
    # When it stops and a new one starts on an empty data folder (everything must come from changelogs)
    w.stop()
    w2 = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "d2")
    produce(registry, kafka_bootstrap, "ingest.events", [ev(f"{tag}-4", now + 3, [email])])
    # Then the same profile holds all four events, and the API serves it from the recovered table
    snap = wait_graph(registry, kafka_bootstrap, [[cookie, email]], {f"{tag}-{i}" for i in range(1, 5)})
    assert snap.owner(Identity(*email).key) == pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = HTTP.get(f"{w2.url}/profiles", params={"namespace": "ECID", "id": cookie[1]}, timeout=5)
        if r.status_code == 200 and r.json()["event_count"] == 4:
            break
        time.sleep(0.5)
    assert r.status_code == 200 and r.json()["profile_id"] == pid and r.json()["event_count"] == 4


def test_a_worker_joining_mid_stream_loses_nothing(registry, kafka_bootstrap, start_worker, config_dir):
    # Given one worker handling a steady stream of records: 120 people, each seen by a cookie, then
    # linking it to an e-mail, then by the e-mail alone
    w1 = start_worker("w1", config_dir=config_dir)
    tag = uuid.uuid4().hex[:6]
    people = [(("ECID", f"{tag}-c{p}"), ("Email", f"{tag}-p{p}@x.io")) for p in range(120)]
    records = [[c] for c, _ in people] + [[c, e] for c, e in people] + [[e] for _, e in people]
    now = int(time.time() * 1000)
    events = [ev(f"{tag}-e{i}", now + i, rec) for i, rec in enumerate(records)]
    chunks = [events[i:i + 30] for i in range(0, len(events), 30)]
    # When a second worker joins while the records arrive (both consumer groups rebalance under load)
    for i, chunk in enumerate(chunks):
        if i == 2:
            w2 = start_worker("w2", config_dir=config_dir, wait=False)
        produce(registry, kafka_bootstrap, "ingest.events", chunk)
        time.sleep(0.3)  # spread the stream over the rebalances (pacing, not waiting for a result)
    w2.wait_ready()
    # Then the graph is exactly the 120 people with every event once, and both workers are still running
    wait_graph(registry, kafka_bootstrap, records, {e["eventId"] for e in events})  # type: ignore[misc]
    assert w1.proc.poll() is None, w1.log()[-3000:]
    assert w2.proc.poll() is None, w2.log()[-3000:]
