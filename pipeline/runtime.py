"""The worker's runtime context: the Faust app, its topics and tables, processors, and the one `emit` path."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import faust
from confluent_kafka import KafkaError, Producer

from pipeline.errors import PipelineError
from pipeline.identity.stitch import Send
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.settings import PipelineConfig, Settings
from pipeline.topics import TopicRegistry

# Bounded RocksDB memory: faust's defaults give each table partition a 2 GiB block cache.
ROCKSDB_OPTIONS = {
    "block_cache_size": 32 * 1024 * 1024,
    "block_cache_compressed_size": 8 * 1024 * 1024,
    "write_buffer_size": 16 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 32 * 1024 * 1024,
}


log = logging.getLogger(__name__)


class OutputProducer:
    """The agents' one producer (librdkafka): no per-message await, batched and compressed by librdkafka.

    At-least-once: Faust flushes its producer before committing consumed offsets; `build_app` chains
    `flush()` into that, so an offset is only committed once everything its processing produced is acked.
    Partitioning is Java-compatible murmur2, the same as Faust/aiokafka, so a key lands on the partition
    where the table data for that key lives, whichever producer sent it.
    """

    def __init__(self, bootstrap: str) -> None:
        self._p = Producer({
            "bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all",
            "enable.idempotence": True, "linger.ms": 5, "compression.type": "lz4",
            "queue.buffering.max.messages": 200_000, "batch.num.messages": 10_000,
        })
        self._errors: list[KafkaError] = []
        self._n = 0

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._errors.append(err)

    def produce(self, topic: str, key: bytes, value: bytes, headers: dict[str, bytes] | None = None,
                partition: int | None = None) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if headers:
            kwargs["headers"] = list(headers.items())
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._p.produce(topic, **kwargs)
                break
            except BufferError:  # librdkafka's queue is full: backpressure on this agent
                self._p.poll(0.05)
        self._n += 1
        if self._n % 256 == 0:
            self._p.poll(0)

    async def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every produced message is acknowledged; raise if any delivery failed."""
        deadline = time.monotonic() + timeout_s
        while self._p.flush(0) > 0:
            if time.monotonic() > deadline:
                raise PipelineError(f"output producer: {len(self._p)} messages not acknowledged in {timeout_s}s")
            await asyncio.sleep(0.002)
        if self._errors:
            errors, self._errors = self._errors, []
            raise PipelineError(f"{len(errors)} output messages failed, first: {errors[0]}")


@dataclass
class Runtime:
    """Everything agents share; built once by `build_app`."""

    settings: Settings
    config: PipelineConfig
    registry: TopicRegistry
    app: faust.App
    engine: SegmentEngine
    processor: ProfileProcessor
    output: OutputProducer
    topics: dict[str, faust.TopicT] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)

    def topic(self, logical: str) -> faust.TopicT:
        """The Faust topic for a logical name (declared once in topics.yaml)."""
        if logical not in self.topics:
            spec = self.registry[logical]
            self.topics[logical] = self.app.topic(spec.name, key_type=bytes, value_type=bytes,
                                                  key_serializer="raw", value_serializer="raw",
                                                  partitions=spec.partitions, internal=False)
        return self.topics[logical]

    async def emit(self, send: Send, headers: dict[str, bytes] | None = None,
                   partition: int | None = None) -> None:
        """The one path every outgoing message takes: encode with the topic's codec, then produce."""
        spec = self.registry[send.topic]
        self.output.produce(spec.name, send.key.encode(), spec.codec.encode(send.value), headers, partition)

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)
