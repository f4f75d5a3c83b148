"""The worker's runtime context: the Faust app, its topics and tables, processors, and the one `emit` path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import faust

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


@dataclass
class Runtime:
    """Everything agents share; built once by `build_app`."""

    settings: Settings
    config: PipelineConfig
    registry: TopicRegistry
    app: faust.App
    engine: SegmentEngine
    processor: ProfileProcessor
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
        value = self.registry[send.topic].codec.encode(send.value)
        await self.topic(send.topic).send(key=send.key.encode(), value=value, headers=headers,
                                          partition=partition)

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)
