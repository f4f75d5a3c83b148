"""`pipeline dlq replay` (issue 18): records dead-lettered for a reason a configuration change fixes reach their
profiles once the worker runs with the fix and they are replayed; other reasons stay; a second run replays nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from http_client import HTTP
from kafka_helpers import Collector, produce
from procs import PipelineProc

pytestmark = pytest.mark.integration

SEGMENTS = """
audiences:
  - {id: visitors, name: Visitors, description: d, query: event pageView within 1d}
"""
LOYALTY = "  - {name: LOYALTY, kind: person, priority: 70, unique: false, normaliser: trim}\n"


def page_view(eid: str, ts: int, ids: dict[str, list[str]]) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {ns: [{"id": v} for v in values] for ns, values in ids.items()}, "fields": {}}


def events_of(url: str, namespace: str, value: str) -> list[str]:
    r = HTTP.get(f"{url}/profiles", params={"namespace": namespace, "id": value}, timeout=10)
    return sorted(e["event_id"] for e in r.json()["recent_events"]) if r.status_code == 200 else []


def run_replay(worker_env: dict[str, str], log: Path, *args: str) -> str:
    p = PipelineProc(["dlq", "replay", *args], worker_env, log)
    assert p.proc.wait(120) == 0, p.log()
    return p.log()


def test_records_dead_lettered_for_an_unknown_namespace_reach_their_profiles_once_replayed(
        registry, kafka_bootstrap, start_worker, make_config, tmp_path):
    # Given a worker whose identity.yaml has no LOYALTY namespace
    tag = uuid.uuid4().hex[:6]
    config_dir = make_config(SEGMENTS)
    worker = start_worker("w1", config_dir=config_dir)
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    now = int(time.time() * 1000)
    # When a new source sends 3 page views identified only by LOYALTY ids, and records bad for other reasons
    # arrive (25 identities, a null value)
    loyal = [page_view(f"{tag}-e{i}", now - i, {"LOYALTY": [f"L-{tag}-{i}"]}) for i in range(3)]
    produce(registry, kafka_bootstrap, "ingest.events", loyal)
    produce(registry, kafka_bootstrap, "ingest.events",
            [page_view(f"{tag}-many", now, {"ECID": [f"c{tag}-{i}" for i in range(25)]})])
    produce(registry, kafka_bootstrap, "ingest.events", [None], raw=True, key=lambda v: "null")
    # Then all 5 are dead-lettered, the LOYALTY ones as no-usable-identity
    dlq.wait_for(lambda ms: len(ms) >= 5, timeout_s=60, what="5 dead letters")
    assert sorted(m["headers"]["reason"] for m in dlq.messages) == \
        ["no-usable-identity"] * 3 + ["null-value", "too-many-identities"]
    # When LOYALTY is added to identity.yaml, the worker restarted, and the dead letters of that reason replayed
    worker.stop()
    identity = config_dir / "identity.yaml"
    identity.write_text(identity.read_text().replace("namespaces:\n", "namespaces:\n" + LOYALTY, 1))
    worker = start_worker("w1", config_dir=config_dir)
    out = run_replay(worker.env, tmp_path / "replay-1.log", "--reason", "no-usable-identity", "--since", "1h")
    # Then the 3 are replayed to the events topic, the other 2 left for their reason
    assert "replayed 3 records (no-usable-identity); 3 to ingest.events\nleft 2: other reason\n" in out, out
    assert "dlq replay: 5/5 entries read, 3 replayed" in out
    # And each LOYALTY page view is in its profile
    deadline = time.monotonic() + 60
    expected = {f"L-{tag}-{i}": [f"{tag}-e{i}"] for i in range(3)}
    got: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        got = {lid: events_of(worker.url, "LOYALTY", lid) for lid in expected}
        if got == expected:
            break
        time.sleep(0.3)
    assert got == expected
    # And a second replay replays nothing (each entry once), and nothing was dead-lettered again
    out = run_replay(worker.env, tmp_path / "replay-2.log", "--reason", "no-usable-identity")
    assert "replayed 0 records (no-usable-identity)\nleft 3: already replayed\nleft 2: other reason\n" in out, out
    dlq.settle(quiet_s=2)
    assert len(dlq.messages) == 5
    # When a record whose cause is not fixed is replayed anyway
    out = run_replay(worker.env, tmp_path / "replay-3.log", "--reason", "too-many-identities")
    assert "replayed 1 records (too-many-identities); 1 to ingest.events\n" in out, out
    # Then it is dead-lettered again, naming the entry it was replayed from
    many = next(m for m in dlq.messages if m["headers"]["reason"] == "too-many-identities")
    dlq.wait_for(lambda ms: len(ms) >= 6, timeout_s=60, what="the replayed record dead-lettered again")
    again = dlq.messages[5]["headers"]
    entry, dead_lettered_ms = again["replay_of"].rsplit(":", 1)  # partition:offset:time of the first entry
    assert (again["reason"], entry) == ("too-many-identities", f"{many['partition']}:{many['offset']}")
    assert now - 60_000 < int(dead_lettered_ms) < int(time.time() * 1000)
    dlq.close()
