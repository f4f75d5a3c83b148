"""Kafka-topic destination: mapped payloads as JSON, keyed by profile id so per-profile order holds."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.connection import client_config
from pipeline.destinations.base import Destination, DestinationContext, Payload, register_kind
from pipeline.destinations.config import DestinationConfig, Env, Fields, KindSettings
from pipeline.errors import DeliveryError
from pipeline.yamlconf import Doc


@dataclass(frozen=True)
class KafkaSettings:
    """Settings of a `kafka` destination: the logical topic the lead's registry resolves."""

    topic: str


class KafkaTopicDestination(Destination):
    """Produces each payload to the resolved topic; `flush()` waits for every acknowledgement."""

    def __init__(self, config: DestinationConfig, context: DestinationContext,
                 producer_config: dict[str, Any] | None = None) -> None:
        super().__init__(config, context)
        if not isinstance(config.settings, KafkaSettings):
            raise DeliveryError(f"destination {config.name} has no kafka settings", retryable=False)
        if context.kafka is None:
            raise DeliveryError(f"destination {config.name}: no Kafka connection", retryable=False)
        self._kafka = context.kafka
        topic = config.settings.topic
        self.topic = context.topics.name(topic) if context.topics else topic
        self._producer_config: dict[str, Any] = {
            "acks": "all",
            # Idempotent producer: broker-side retries cannot reorder or duplicate within a partition.
            "enable.idempotence": True,
            "linger.ms": 5,
            **(producer_config or {}),
        }
        self._producer: Producer | None = None
        self._errors: list[KafkaError] = []
        self.delivered = 0
        self.last_delivery_ms: int | None = None

    async def start(self) -> None:
        self._producer = Producer(client_config(self._kafka, self._producer_config))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        # Runs inside poll()/flush() on whichever thread called them.
        if err is not None:
            self._errors.append(err)
        else:
            self.delivered += 1
            ts = msg.timestamp()
            self.last_delivery_ms = ts[1] if ts and ts[1] > 0 else self.last_delivery_ms

    async def deliver(self, batch: list[Payload]) -> None:
        assert self._producer is not None, "start() first"
        for p in batch:
            value = json.dumps(p.to_dict(), separators=(",", ":")).encode("utf-8")
            while True:
                try:
                    self._producer.produce(self.topic, key=p.profile_id.encode("utf-8"), value=value,
                                           on_delivery=self._on_delivery)
                    break
                except BufferError:
                    # Local queue full: let acknowledgements drain (off the event loop), then retry.
                    await asyncio.to_thread(self._producer.poll, 0.1)
                except KafkaException as exc:
                    raise DeliveryError(f"produce failed: {exc}", retryable=False) from exc
        self._producer.poll(0)

    async def flush(self) -> None:
        """1. Wait (in a thread) until every produced message is acknowledged or failed.
        2. Raise DeliveryError if any failed; retryable unless Kafka says the error is fatal."""
        assert self._producer is not None, "start() first"
        remaining = await asyncio.to_thread(self._producer.flush, 30.0)
        if remaining:
            raise DeliveryError(f"{remaining} message(s) not acknowledged in 30 s", retryable=True)
        if self._errors:
            errors, self._errors = self._errors, []
            retryable = all(e.retriable() or not e.fatal() for e in errors)
            raise DeliveryError(f"{len(errors)} message(s) failed: {errors[0].str()}", retryable=retryable)

    async def close(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, 10.0)
            self._producer = None

    def stats(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "last_delivery_ms": self.last_delivery_ms,
                "pending_errors": len(self._errors)}


def parse_kafka_settings(doc: Doc, f: Fields, env: Env) -> KafkaSettings:
    """A kafka destination's own key: the logical topic."""
    return KafkaSettings(doc.string(f["topic"][1], "topic"))


register_kind("kafka", KafkaTopicDestination, KindSettings(required=frozenset({"topic"}), parse=parse_kafka_settings))
