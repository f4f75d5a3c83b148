"""confluent-kafka clients for the CLI, tests and benchmarks: produce and read any registry topic decoded."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipeline.connection import Kafka, client_config
from pipeline.errors import PipelineError, SerdeError
from pipeline.ingest.keys import KeyChoice, record_id
from pipeline.serde.codecs import RawCodec
from pipeline.topics import TopicRegistry


def producer(kafka: Kafka, **extra: Any) -> Producer:
    return Producer(client_config(kafka, {"linger.ms": 5, "acks": "all", "enable.idempotence": True, **extra}))


def by_record_id(value: Any) -> KeyChoice:
    """The old default key: the record's own id (eventId, recordId or profile_id)."""
    return KeyChoice(record_id(value) if isinstance(value, dict) else None, "record id")


def produce_json_lines(reg: TopicRegistry, kafka: Kafka, logical: str, lines: Any, *,
                       key: Callable[[Any], KeyChoice] = by_record_id,
                       sources: Counter[str] | None = None) -> int:
    """Publish JSON-lines records to a registry topic with its codec; returns the count (raises on failure).

    `key` chooses each record's key (`ingest.keys.RecordKeyer` keys by identity); keys are partitioned with
    murmur2 like Java clients and the worker, so a key lands where any other producer would put it.
    `sources` counts how keys were chosen (never their values: a key may be an e-mail)."""
    spec = reg[logical]
    p = producer(kafka, partitioner="murmur2_random")
    errors: list[str] = []
    n = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"line {lineno}: not JSON: {exc.msg}") from exc
        try:
            data = line.encode() if isinstance(spec.codec, RawCodec) else spec.codec.encode(value)
        except SerdeError as exc:  # the reason and the field, never the value
            raise SerdeError(exc.reason, f"line {lineno}: {exc.detail}") from exc
        choice = key(value)
        if sources is not None:
            sources[choice.source] += 1
        k = None if choice.key is None else choice.key.encode()
        while True:
            try:
                p.produce(spec.name, key=k, value=data, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 1000 == 0:
            p.poll(0)
    p.flush(30)
    if errors:
        raise PipelineError(f"{len(errors)} records failed to publish, first: {errors[0]}")
    return n


def decode_message(reg: TopicRegistry, logical: str, msg: Any) -> dict[str, Any]:
    spec = reg[logical]
    out: dict[str, Any] = {"topic": logical, "partition": msg.partition(), "offset": msg.offset(),
                           "key": (msg.key() or b"").decode(errors="replace")}
    if msg.headers():
        out["headers"] = {k: (v or b"").decode(errors="replace") for k, v in msg.headers()}
    if isinstance(spec.codec, RawCodec):
        if msg.value() is None:
            out["value"] = None  # a null (tombstone) value, kept as such on dead-letter topics
            return out
        raw = msg.value()
        try:
            out["value"] = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            out["value_b64"] = base64.b64encode(raw).decode()
    else:
        out["value"] = spec.codec.decode(msg.value())
    return out


def tail(reg: TopicRegistry, kafka: Kafka, logical: str, *, from_beginning: bool = True,
         max_messages: int | None = None, idle_timeout_s: float = 5.0) -> Iterator[dict[str, Any]]:
    """Yield a topic's messages decoded, until max_messages or idle_timeout_s without one."""
    spec = reg[logical]
    c = Consumer(client_config(kafka, {"group.id": f"cdp-tail-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                                       "auto.offset.reset": "earliest" if from_beginning else "latest"}))
    try:
        md = c.list_topics(spec.name, timeout=10).topics.get(spec.name)
        if md is None or md.error is not None:
            raise PipelineError(f"topic {spec.name} does not exist; run `pipeline topics apply`")
        c.assign([TopicPartition(spec.name, p, -2 if from_beginning else -1) for p in md.partitions])
        seen = 0
        last = time.monotonic()
        while max_messages is None or seen < max_messages:
            msg = c.poll(0.2)
            if msg is None:
                if time.monotonic() - last > idle_timeout_s:
                    return
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise PipelineError(f"consume error: {err}")
            last = time.monotonic()
            seen += 1
            yield decode_message(reg, logical, msg)
    finally:
        c.close()
