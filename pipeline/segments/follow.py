"""Every worker's copy of the audience definitions kept equal: a console save is published on `control.audiences`
and a reader thread writes the latest record into this worker's segments.yaml (the hot reload then applies it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pipeline.connection import Kafka, client_config
from pipeline.errors import ConfigError, DefinitionsNotShared
from pipeline.kafka_reads import follow
from pipeline.segments.sync import SEGMENTS_FILE, decide, read_record, shared, write_atomically
from pipeline.topics import AUDIENCES_TOPIC, TopicRegistry

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0


class DefinitionsSync:
    """This worker's segments.yaml and `control.audiences`. `lock` is held by whoever writes the file (the console's
    save on the event loop, the reader thread), so a save never interleaves with a write from the topic."""

    def __init__(self, segments_file: Path, worker: str, writable: bool,
                 publish_timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self.segments_file = segments_file
        self.worker = worker
        self.writable = writable
        self.publish_timeout_s = publish_timeout_s
        self.lock = threading.Lock()
        self._producer: Producer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, registry: TopicRegistry, kafka: Kafka, text: str) -> None:
        """Blocking (run it in a thread): the saved file on the topic, acknowledged by the brokers, or
        DefinitionsNotShared."""
        spec = registry[AUDIENCES_TOPIC]
        if self._producer is None:
            self._producer = Producer(client_config(kafka, {"acks": "all", "enable.idempotence": True,
                                                            "linger.ms": 0,
                                                            "message.timeout.ms": int(self.publish_timeout_s * 1000)}))
        errors: list[KafkaError] = []
        acked = threading.Event()

        def done(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)
            acked.set()

        record = shared(text, self.worker, int(time.time() * 1000)).to_record()
        self._producer.produce(spec.name, spec.codec.encode(record), SEGMENTS_FILE.encode(), on_delivery=done)
        deadline = time.monotonic() + self.publish_timeout_s + 1.0  # the message times out first
        while not acked.is_set() and time.monotonic() < deadline:
            self._producer.poll(0.05)
        if errors or not acked.is_set():
            why = errors[0].str() if errors else f"not acknowledged in {self.publish_timeout_s:g}s"
            raise DefinitionsNotShared(f"{AUDIENCES_TOPIC}: {why}")

    def apply(self, value: Any) -> bool:
        """One decoded record: written into this worker's file when it differs and loads; True when written."""
        try:
            record = read_record(value)
        except ConfigError as exc:
            log.warning("%s: a record was ignored: %s", AUDIENCES_TOPIC, exc.problem)
            return False
        with self.lock:
            try:
                current: str | None = self.segments_file.read_text(encoding="utf-8")
            except FileNotFoundError:
                current = None
            decision = decide(record, current)
            if decision.problem is not None:
                # the location only: a query's literals may be personal data
                where = f"line {decision.problem.line}, column {decision.problem.column}"
                log.error("%s: the definitions saved by %s are not valid segments (%s): ignored, %s unchanged",
                          AUDIENCES_TOPIC, record.worker, where, self.segments_file)
                return False
            if not decision.write:
                return False
            write_atomically(self.segments_file, record.text, "control")
        log.info("%s: definitions saved by %s written into %s; audiences changed: %s", AUDIENCES_TOPIC,
                 record.worker, self.segments_file, ", ".join(decision.changed) or "none")
        return True

    def follow(self, registry: TopicRegistry, kafka: Kafka, error_cb: Callable[[Any], None] | None = None) -> None:
        """Read the topic from its beginning in a daemon thread (`kafka_reads.follow`), then keep up with it; only
        the latest record is applied, once the reader has caught up and then with each batch. Nothing when the
        definitions are not writable here (managed elsewhere, e.g. a ConfigMap)."""
        if not self.writable:
            return
        spec = registry[AUDIENCES_TOPIC]
        latest: list[bytes] = []  # the latest record read while catching up
        caught_up = threading.Event()

        def apply_latest(value: bytes) -> None:
            try:
                self.apply(spec.codec.decode(value))
            except Exception:  # noqa: BLE001 - the reader must outlive one bad record or write
                log.exception("%s: a record could not be applied", AUDIENCES_TOPIC)

        def on_messages(batch: list[Message]) -> None:
            values = [v for v in (m.value() for m in batch) if v is not None]
            if not values:
                return
            if caught_up.is_set():
                apply_latest(values[-1])
            else:
                latest[:] = values[-1:]

        def on_caught_up() -> None:
            caught_up.set()
            if latest:
                apply_latest(latest.pop())

        self._thread = threading.Thread(
            target=follow, args=(kafka, spec.name, on_messages),
            kwargs={"stop": self._stop, "caught_up": on_caught_up, "error_cb": error_cb, "group": "cdp-audiences"},
            name="audiences-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._producer is not None:
            self._producer.flush(1)
