"""Consumer lag, broker round trips, queue depths and rebalances from librdkafka's statistics; readiness's
starting reasons; the destination runner's operations endpoints (issue 18, items 1 and 2)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from pipeline.destinations.cli import STARTING, operations_app
from pipeline.observability import metrics
from pipeline.observability.kafka_stats import (
    ClientStats,
    GroupLag,
    LibrdkafkaStats,
    parse_stats,
    partition_lag,
)
from pipeline.observability.readiness import Assignment, Readiness


def partition(n: int, *, lag: int, fetch_state: str = "active", hi: int = 100, committed: int = 40,
              lo: int = 0, fetchq: int = 0) -> dict[str, Any]:
    return {"partition": n, "fetch_state": fetch_state, "consumer_lag": lag, "hi_offset": hi,
            "committed_offset": committed, "lo_offset": lo, "fetchq_cnt": fetchq}


CONSUMER_STATS = {
    "name": "w1-ingest#consumer-1", "type": "consumer", "msg_cnt": 0,
    "brokers": {
        "127.0.0.1:9092/1": {"nodeid": 1, "rtt": {"avg": 2500, "cnt": 12}},
        "127.0.0.1:9092/bootstrap": {"nodeid": -1, "rtt": {"avg": 0, "cnt": 0}},
        "GroupCoordinator": {"nodeid": -1, "rtt": {"avg": 900, "cnt": 3}},
        "127.0.0.1:9093/2": {"nodeid": 2, "rtt": {"avg": 0, "cnt": 0}},  # no request measured yet
    },
    "topics": {
        "ingest.events": {"partitions": {
            "0": partition(0, lag=60, fetchq=7),
            "1": partition(1, lag=-1, hi=30, committed=-1001, lo=5, fetchq=3),  # nothing committed yet
            "2": partition(2, lag=-1, fetch_state="none"),  # another worker's
            "-1": partition(-1, lag=-1),  # librdkafka's internal unassigned partition
        }},
    },
    "cgrp": {"state": "up", "rebalance_cnt": 3},
}


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_consumer_statistics_document_gives_lag_per_assigned_partition_rtt_queue_and_rebalances() -> None:
    # Given librdkafka's statistics of a consumer with two assigned partitions of three, one never committed
    # When they are read
    stats = parse_stats(json.dumps(CONSUMER_STATS))
    # Then the lag of each assigned partition (the uncommitted one: all its records), brokers measured, the
    # records fetched and not consumed, and the group's rebalance count
    assert stats == ClientStats(lag={("ingest.events", 0): 60, ("ingest.events", 1): 25},
                                rtt_s={"127.0.0.1:9092/1": 0.0025}, queued=10, rebalances=3)


def test_a_producer_statistics_document_gives_its_queue_and_no_lag() -> None:
    doc = {"type": "producer", "msg_cnt": 42, "brokers": {"b:1/1": {"nodeid": 1, "rtt": {"avg": 1000, "cnt": 1}}},
           "topics": {"t": {"partitions": {"0": partition(0, lag=5)}}}}
    assert parse_stats(doc) == ClientStats(lag={}, rtt_s={"b:1/1": 0.001}, queued=42, rebalances=None)


def test_partition_lag_counts_from_the_commit_else_from_the_first_record() -> None:
    assert [partition_lag(100, 40, 0), partition_lag(100, -1001, 10), partition_lag(-1, 5, 0),
            partition_lag(100, 120, 0)] == [60, 90, None, 0]


def test_group_lag_forgets_partitions_that_moved_to_another_worker() -> None:
    # Given a group reported with two partitions
    lag = GroupLag("g-moved")
    lag.report({("t", 0): 5, ("t", 1): 7})
    # When the next report has only one (the other was revoked)
    lag.report({("t", 1): 9})
    # Then only that one is shown, with its new value, and the assignment count follows
    assert sample("cdp_consumer_lag", {"group": "g-moved", "topic": "t", "partition": "0"}) is None
    assert sample("cdp_consumer_lag", {"group": "g-moved", "topic": "t", "partition": "1"}) == 9
    assert sample("cdp_partitions_assigned", {"group": "g-moved"}) == 1


def test_statistics_callback_sets_the_gauges_and_counts_new_rebalances_only() -> None:
    # Given a statistics callback for client c1 of group g-cb
    cb = LibrdkafkaStats("c1", "g-cb")
    # When two documents arrive, 3 then 5 rebalances, and a broken one
    cb(json.dumps(CONSUMER_STATS))
    cb(json.dumps({**CONSUMER_STATS, "cgrp": {"rebalance_cnt": 5}, "brokers": {}}))
    cb("{not json")
    # Then the rebalances counter says 5, the lag and queue are the latest, and the gone broker is dropped
    assert sample("cdp_rebalances_total", {"group": "g-cb"}) == 5
    assert sample("cdp_consumer_lag", {"group": "g-cb", "topic": "ingest.events", "partition": "0"}) == 60
    assert sample("cdp_kafka_client_queue_messages", {"client": "c1"}) == 10
    assert sample("cdp_kafka_broker_rtt_seconds", {"client": "c1", "broker": "127.0.0.1:9092/1"}) is None
    assert cb.config(1000) == {"statistics.interval.ms": 1000, "stats_cb": cb}


def test_readiness_starts_with_the_reasons_given_until_cleared() -> None:
    # Given a worker's readiness starting with two reasons
    r = Readiness({"partitions": "waiting", "ingest": "joining"})
    assert (r.ready, metrics.READY._value.get()) == (False, 0)
    # When one clears, it is still not ready; when both clear, it is
    r.clear("partitions")
    assert (r.ready, r.reasons()) == (False, {"ingest": "joining"})
    r.clear("ingest")
    assert (r.ready, metrics.READY._value.get()) == (True, 1)


def test_readiness_body_gives_the_reasons_and_the_recovered_assignment() -> None:
    # Given a worker not ready before its first assignment
    r = Readiness({"partitions": "waiting"})
    assert r.body() == {"ready": False, "reasons": ["partitions: waiting"]}
    # When its first assignment is recovered
    r.assignment = Assignment(3, {"internal.identity": [0, 2], "internal.profile-ops": [1]})
    r.clear("partitions")
    # Then GET /readyz's body says which, and still does during the next rebalance
    assert r.body() == {"ready": True, "generation": 3,
                        "partitions": {"internal.identity": [0, 2], "internal.profile-ops": [1]}}
    r.set("partitions", "rebalancing")
    assert r.body() == {"ready": False, "reasons": ["partitions: rebalancing"], "generation": 3,
                        "partitions": {"internal.identity": [0, 2], "internal.profile-ops": [1]}}


async def test_destination_runner_endpoints_answer_health_readiness_and_metrics() -> None:
    # Given the runner's operations endpoints, the runner starting, then one destination still joining
    reasons: list[dict[str, str]] = [STARTING]
    async with TestClient(TestServer(operations_app(lambda: reasons[0]))) as client:
        # Then /healthz answers 200 throughout, /readyz 503 with the reasons, then 200 when there are none
        assert ((await client.get("/healthz")).status, await (await client.get("/healthz")).json()) == (
            200, {"alive": True})
        r = await client.get("/readyz")
        assert (r.status, await r.json()) == (503, {"ready": False, "reasons": [
            "starting: destinations starting (backfill, consumers joining their groups)"]})
        reasons[0] = {"destination webhook": "joining consumer group cdp-dest-webhook"}
        r = await client.get("/readyz")
        assert (r.status, await r.json()) == (503, {"ready": False, "reasons": [
            "destination webhook: joining consumer group cdp-dest-webhook"]})
        reasons[0] = {}
        r = await client.get("/readyz")
        assert (r.status, await r.json()) == (200, {"ready": True})
        # and /metrics is Prometheus's text format, with the runner's metrics
        m = await client.get("/metrics")
        assert m.status == 200 and m.content_type == "text/plain"
        assert "# TYPE cdp_ready gauge" in await m.text()
