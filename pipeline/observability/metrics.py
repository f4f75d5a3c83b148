"""All Prometheus metrics of the pipeline, defined once here and imported where they are updated."""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

RECORDS_INGESTED = Counter("cdp_records_ingested_total", "Records decoded and accepted", ["topic"])
RECORDS_DEAD_LETTERED = Counter("cdp_records_dead_lettered_total", "Records sent to the DLQ", ["topic", "reason"])
IDENTITIES_DROPPED = Counter("cdp_identities_dropped_total",
                             "Identities left out of ingest records (invalid, blocked placeholder, too long, "
                             "over the per-record limit, unknown namespace)", ["namespace", "reason"])
RECORDS_SKIPPED = Counter("cdp_records_skipped_total", "Valid records kept out of profiles", ["dataset", "reason"])
IDENTITY_OPS = Counter("cdp_identity_ops_total", "Identity-stage messages handled", ["op"])
LOCAL_DELIVERIES = Counter("cdp_local_deliveries_total",
                           "Stage messages handled in-process (target partition held by this worker)", ["topic"])
PROFILE_OPS = Counter("cdp_profile_ops_total", "Profile-stage messages handled", ["op"])
PROFILE_EVENTS = Counter("cdp_profile_events_total", "Profile-stage outcomes (merges, refusals...)", ["what"])
MEMBERSHIP_CHANGES = Counter("cdp_membership_changes_total", "Membership changes emitted",
                             ["audience", "status", "evaluation"])
EVALUATION_SECONDS = Histogram("cdp_profile_op_seconds", "Time to handle one profile-stage message",
                               buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
END_TO_END_SECONDS = Histogram("cdp_event_to_membership_seconds", "Event time to membership message",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
STAGE_BACKLOG = Gauge("cdp_stage_backlog_messages",
                      "Identity and profile-op messages this worker's agents have still to handle (its ingest "
                      "waits while this is over PIPELINE_STAGE_BACKLOG_MAX)")
INGEST_BACKPRESSURE_SECONDS = Counter("cdp_ingest_backpressure_seconds_total",
                                      "Time the ingest loop took no new records because the stage topics were behind")
DEADLINES_PENDING = Gauge("cdp_deadlines_pending", "Profiles with a pending time-driven re-evaluation")
BATCH_PROFILES = Counter("cdp_batch_profiles_total", "Profiles evaluated by batch runs")
DESTINATION_DELIVERIES = Counter("cdp_destination_deliveries_total", "Payloads delivered", ["destination"])
DESTINATION_FAILURES = Counter("cdp_destination_failures_total", "Failed delivery attempts",
                               ["destination", "reason"])
DESTINATION_SKIPS = Counter("cdp_destination_skips_total", "Payloads skipped by mapping", ["destination", "reason"])
DESTINATION_CONSENT_UNKNOWN = Counter(
    "cdp_destination_consent_unknown_total",
    "Memberships not delivered: no value of the destination's consent attribute (on_missing: deny)", ["destination"])
READY = Gauge("cdp_ready", "1 while the worker can do its work (GET /readyz answers 200), else 0")
NOT_READY = Gauge("cdp_not_ready", "1 while this reason keeps the worker not ready (GET /readyz)", ["reason"])
OUTPUT_UNACKNOWLEDGED = Gauge("cdp_output_unacknowledged",
                              "Output messages produced and not yet acknowledged by the broker")
KAFKA_OUTAGES = Counter("cdp_kafka_outages_total", "Times the worker found Kafka unreachable and waited")
# Consumer groups and Kafka clients (pipeline/observability/kafka_stats.py fills most of them): the worker's
# two groups (`<app id>` for Faust, `<app id>-ingest`) and each destination's (`cdp-dest-<name>`).
CONSUMER_LAG = Gauge("cdp_consumer_lag", "Records not yet committed by the consumer group (log end offset minus "
                     "committed offset), per partition this process consumes", ["group", "topic", "partition"])
PARTITIONS_ASSIGNED = Gauge("cdp_partitions_assigned", "Partitions this process consumes, per consumer group",
                            ["group"])
REBALANCES = Counter("cdp_rebalances_total", "Partition assignments received, per consumer group", ["group"])
COMMIT_SECONDS = Histogram("cdp_commit_seconds", "Time for the broker to answer an offset commit", ["group"],
                           buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
TABLE_RECOVERY_REMAINING = Gauge("cdp_table_recovery_remaining",
                                 "Changelog records left to replay before this worker's tables are recovered")
KAFKA_BROKER_RTT = Gauge("cdp_kafka_broker_rtt_seconds",
                         "Average request round-trip time to a broker over a librdkafka client's last statistics "
                         "window", ["client", "broker"])
KAFKA_CLIENT_QUEUE = Gauge("cdp_kafka_client_queue_messages",
                           "Messages in a librdkafka client's queues (producer: waiting to be sent or "
                           "acknowledged; consumer: fetched, not consumed yet)", ["client"])
DESTINATION_BREAKER_OPEN = Gauge("cdp_destination_breaker_open",
                                 "1 while a destination's circuit breaker is open (deliveries paused)", ["destination"])
DESTINATION_DEAD_LETTERS = Counter("cdp_destination_dead_letters_total",
                                   "Payloads sent to the destination dead-letter topic", ["destination"])
DESTINATION_RECEIPTS = Counter("cdp_destination_receipts_total",
                               "Receipts of delivered membership changes published on activation.receipts",
                               ["destination"])
DESTINATION_RECEIPTS_FAILED = Counter("cdp_destination_receipts_failed_total",
                                      "Receipts Kafka refused (they are not retried: the console's view stays older)")
GC_PAUSE_SECONDS = Histogram("cdp_gc_pause_seconds", "Python garbage-collector pauses (the event loop stops)",
                             ["generation"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2))
ERASURES = Counter("cdp_erasures_total", "Erasure requests handled by the profile stage, by outcome (pipeline.privacy)",
                   ["outcome"])
SUPPRESSED_IDENTITIES = Gauge("cdp_erasure_suppressed_identities",
                              "Identities on the suppression list this worker holds (erased with --suppress)")


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, cached: the hot path updates a few label sets thousands of times a second."""
    key = (id(metric), labels)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*labels)
    return c


class Tally:
    """Counter increments gathered in a hot loop and applied once per batch: prometheus-client takes a lock
    and resolves the label set on every `inc`."""

    def __init__(self) -> None:
        self._n: dict[tuple[Any, tuple[str, ...]], float] = {}

    def add(self, metric: Any, *labels: str, n: float = 1) -> None:
        key = (metric, labels)
        self._n[key] = self._n.get(key, 0) + n

    def flush(self) -> None:
        pending, self._n = self._n, {}
        for (metric, labels), n in pending.items():
            child(metric, *labels).inc(n)



_gc_started = [0.0]
_gc_pauses = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_pauses[info["generation"]].observe(time.perf_counter() - _gc_started[0])


def watch_gc() -> None:
    """Time every collection of the cyclic garbage collector (`GC_PAUSE_SECONDS`): a full collection walks
    every live container object, so its pauses grow with the decoded-profile cache. Idempotent."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
