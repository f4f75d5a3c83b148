"""What a process knows of `control.erasure`: each request's latest status record and the suppression list
(the subjects of requests made with `suppress`), followed from the topic by a reader thread."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.connection import Kafka, client_config
from pipeline.model import Identity
from pipeline.observability import metrics
from pipeline.privacy.erasure import ERASURE_TOPIC, hashed
from pipeline.topics import TopicRegistry

log = logging.getLogger(__name__)

POLL_S = 0.2


class ErasureLog:
    """Requests by id (their latest status record) and the suppressed subjects. Written by one thread (the
    reader) and by `note` on the event loop; plain dict and set updates, read anywhere."""

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self.requests: dict[str, dict[str, Any]] = {}
        self.suppressed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, record: dict[str, Any] | None) -> None:
        """One status record (None: a tombstone, ignored: a request is never forgotten by a process)."""
        if not isinstance(record, dict) or "request" not in record:
            return
        self.requests[record["request"]] = record
        if record.get("suppress") and record.get("subject") not in self.suppressed:
            self.suppressed.add(record["subject"])
            metrics.SUPPRESSED_IDENTITIES.set(len(self.suppressed))

    def is_suppressed(self, ident: Identity) -> bool:
        """The ingest filter: only hashed when the list holds anything (almost always it is empty)."""
        return bool(self.suppressed) and hashed(self.salt, ident.key) in self.suppressed

    def follow(self, registry: TopicRegistry, kafka: Kafka, error_cb: Callable[[Any], None] | None = None) -> None:
        """Read the topic from its beginning in a daemon thread, then keep up with it. `error_cb`: the worker's
        (its outage tracker counts connection errors instead of logging each one)."""
        spec = registry[ERASURE_TOPIC]

        def run() -> None:
            c = Consumer(client_config(kafka, {"group.id": f"cdp-erasure-{uuid.uuid4().hex[:12]}",
                                               "enable.auto.commit": False}, error_cb=error_cb))
            try:
                c.assign([TopicPartition(spec.name, p, OFFSET_BEGINNING) for p in range(spec.partitions)])
                while not self._stop.is_set():
                    m = c.poll(POLL_S)
                    if m is None or m.error() is not None or m.value() is None:
                        continue
                    try:
                        self.note(spec.codec.decode(m.value()))
                    except Exception:  # noqa: BLE001 - a record we cannot read is not a request
                        log.warning("control.erasure: a record at offset %s could not be decoded", m.offset())
            finally:
                c.close()

        self._thread = threading.Thread(target=run, name="erasure-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
