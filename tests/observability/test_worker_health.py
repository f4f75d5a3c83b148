"""A running worker's GET /healthz, /readyz and /metrics (issue 18): not ready until its partitions are
assigned and its tables recovered, then ready; consumer lag, assignments, rebalances and the dashboard's
worker metrics move on /metrics while it works off a backlog."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from http_client import HTTP
from kafka_helpers import produce
from procs import probe
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

RECORDS = 3000


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as {(sample name, sorted labels): value}; {} while nothing answers."""
    try:
        text = HTTP.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_worker_is_ready_only_after_recovery_and_shows_lag(registry: Any, kafka_bootstrap: str,
                                                          start_worker: Any) -> None:
    # Given 3000 CRM records (gold loyalty: each a new profile entering `gold-loyalty`) waiting on ingest.profiles
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles", [
        {"recordId": f"r{i}", "timestamp": now, "dataset": "crm", "crmId": f"CRM-{i}",
         "loyalty": {"tier": "gold", "points": i}} for i in range(RECORDS)])
    # When a worker starts, measuring its consumer groups every 0.5 s
    worker = start_worker(wait=False, extra_env={"PIPELINE_KAFKA_STATS_INTERVAL_MS": "500"})
    app_id = worker.env["PIPELINE_APP_ID"]
    seen: list[tuple[int, int, dict[str, Any]]] = []  # (healthz status, readyz status, readyz body)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        health, (status, body) = probe(f"{worker.url}/healthz")[0], probe(f"{worker.url}/readyz")
        if status:
            seen.append((health, status, body))
        if status == 200:
            break
        time.sleep(0.1)
    # Then /readyz answered 503 with the reason while /healthz answered 200, and 200 only after recovery
    # (and the 200 names the assignment whose tables it recovered: every stage partition, one generation)
    every = {t: list(range(registry[t].partitions)) for t in ("internal.identity", "internal.profile-ops")}
    assert seen and seen[-1][:2] == (200, 200), seen[-3:]
    assert seen[-1][2] == {"ready": True, "generation": seen[-1][2].get("generation"), "partitions": every}, seen[-1]
    assert isinstance(seen[-1][2]["generation"], int) and seen[-1][2]["generation"] >= 1
    assert seen[0][:2] == (200, 503), seen[:3]
    assert "partitions: waiting for partitions and table recovery" in seen[0][2]["reasons"], seen[0]
    assert "generation" not in seen[0][2]  # nothing recovered yet
    # and while the backlog is worked off, /metrics shows the ingest group's lag, then none left
    max_lag, samples = 0.0, {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        samples = scrape(worker.url)
        lag = total(samples, "cdp_consumer_lag", group=f"{app_id}-ingest")
        max_lag = max(max_lag, lag)
        done = total(samples, "cdp_membership_changes_total", status="realized") >= RECORDS
        if done and lag == 0 and total(samples, "cdp_consumer_lag", group=f"{app_id}-stages") == 0:
            break
        time.sleep(0.25)
    assert max_lag > 0
    assert total(samples, "cdp_consumer_lag", group=f"{app_id}-ingest") == 0
    # (the stage consumer's lag is measured too: one series per stage partition it committed)
    stage_lag = {dict(ls)["partition"] for (n, ls), _ in samples.items()
                 if n == "cdp_consumer_lag" and dict(ls).get("group") == f"{app_id}-stages"}
    assert len(stage_lag) >= 1, sorted(k for k in samples if k[0] == "cdp_consumer_lag")
    assert total(samples, "cdp_records_ingested_total") == RECORDS
    assert total(samples, "cdp_membership_changes_total", status="realized") >= RECORDS
    # every partition of each group is this worker's, each group joined at least once
    ingest_partitions = registry["ingest.events"].partitions + registry["ingest.profiles"].partitions
    stage_partitions = sum(registry[t].partitions for t in ("internal.identity", "internal.profile-ops",
                                                            "activation.receipts"))
    assert total(samples, "cdp_partitions_assigned", group=f"{app_id}-ingest") == ingest_partitions
    assert total(samples, "cdp_partitions_assigned", group=f"{app_id}-stages") == stage_partitions
    assert total(samples, "cdp_rebalances_total", group=f"{app_id}-ingest") >= 1
    assert total(samples, "cdp_rebalances_total", group=app_id) >= 1
    # and the other worker metrics of the dashboard moved: latency, commits, broker round trips, CPU, memory
    assert total(samples, "cdp_event_to_membership_seconds_count") >= RECORDS
    assert total(samples, "cdp_commit_seconds_count", group=f"{app_id}-ingest") >= 1
    assert total(samples, "cdp_commit_seconds_count", group=f"{app_id}-stages") >= 1
    assert total(samples, "cdp_kafka_broker_rtt_seconds") > 0
    assert total(samples, "cdp_ready") == 1
    assert total(samples, "process_cpu_seconds_total") > 0 and total(samples, "process_resident_memory_bytes") > 0
