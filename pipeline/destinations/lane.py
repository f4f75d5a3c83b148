"""What the runner's parts share: its settings, one destination's lane, consumer group names, the decoder."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer

from pipeline.destinations.base import Destination, Payload
from pipeline.destinations.config import DestinationConfig
from pipeline.observability.kafka_stats import STATS_INTERVAL_MS
from pipeline.topics import DEST_DLQ, MEMBERSHIP_TOPIC, PROFILE_CHANGES_TOPIC, RECEIPTS_TOPIC

# (logical topic name, message value bytes) -> the message as a dict. The CLI wires the registry's codecs in
# (`registry_decoder`); `json_decoder` is the stand-in for tests and JSON topics.
Decoder = Callable[[str, bytes], dict[str, Any]]


def json_decoder(logical_topic: str, value: bytes) -> dict[str, Any]:
    """Decode a JSON message value (any topic)."""
    result = json.loads(value)
    if not isinstance(result, dict):
        raise ValueError(f"{logical_topic}: expected a JSON object")
    return result


class LogicalTopics:
    """A TopicResolver that uses logical names as physical names (tests, single-cluster dev)."""

    def name(self, logical: str) -> str:
        return logical


def group_id(name: str) -> str:
    """The consumer group of a destination's lane."""
    return f"cdp-dest-{name}"


@dataclass(frozen=True)
class RunnerSettings:
    """Topics and tuning of the runner; topic names are logical (resolved by the TopicResolver)."""

    membership_topic: str = MEMBERSHIP_TOPIC
    profile_change_topic: str = PROFILE_CHANGES_TOPIC
    # Logical dead-letter topic shared by every destination; the `destination` header says whose.
    dead_letter_topic: str = DEST_DLQ
    create_dead_letter_topic: bool = True
    # Logical topic of the receipts of delivered membership changes (receipts.py); None: none published.
    receipts_topic: str | None = RECEIPTS_TOPIC
    max_poll_records: int = 500
    poll_timeout_s: float = 0.2
    commit_interval_ms: int = 1000
    # For destinations whose deliver()/flush() raise retryable DeliveryErrors (kafka, file):
    deliver_max_attempts: int = 5
    retry_base_delay_ms: int = 200
    retry_max_delay_ms: int = 5000
    stop_timeout_s: float = 30.0  # final flush per destination; past it, uncommitted messages are re-read
    stats_interval_ms: int = STATS_INTERVAL_MS  # librdkafka statistics: lag per partition, broker rtt
    consumer_config: dict[str, Any] = field(default_factory=dict)
    producer_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lane:
    """Mutable per-destination state of the runner."""

    config: DestinationConfig
    destination: Destination
    consumer: Consumer | None = None
    task: asyncio.Task[None] | None = None
    uncommitted: list[Payload] = field(default_factory=list)  # delivered since the last commit
    dirty: bool = False  # consumed something since the last commit
    last_commit: float = 0.0
    consumed: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    joined: bool = False  # the consumer has had its first assignment (possibly empty)
    last_delivery_ms: int | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # Held for a whole consume-deliver-commit round, so a redrive never commits offsets of messages
    # the loop consumed but has not delivered yet.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()
