"""What a process knows of `control.erasure`: each request's latest status record and the suppression list
(the subjects of requests made with `suppress`), followed from the topic by a reader thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message

from pipeline.connection import Kafka
from pipeline.kafka_reads import follow
from pipeline.model import Identity
from pipeline.observability import metrics
from pipeline.privacy.erasure import ERASURE_TOPIC, hashed
from pipeline.topics import TopicRegistry

log = logging.getLogger(__name__)


class ErasureLog:
    """Requests by id (their latest status record) and the suppressed subjects. Written by one thread (the
    reader) and by `note` on the event loop; plain dict and set updates, read anywhere."""

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self.requests: dict[str, dict[str, Any]] = {}
        self.suppressed: set[str] = set()
        self.caught_up = threading.Event()  # the topic read to the end it had when the reader started
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
        """Read the topic from its beginning in a daemon thread (`kafka_reads.follow`), then keep up with it;
        `caught_up` is set once it has read what the topic held when it started. `error_cb`: the worker's (its
        outage tracker counts connection errors instead of logging each one)."""
        spec = registry[ERASURE_TOPIC]

        def on_messages(batch: list[Message]) -> None:
            for m in batch:
                if m.value() is None:
                    continue
                try:
                    self.note(spec.codec.decode(m.value()))
                except Exception:  # noqa: BLE001 - a record we cannot read is not a request
                    log.warning("control.erasure: a record at offset %s could not be decoded", m.offset())

        self._thread = threading.Thread(
            target=follow, args=(kafka, spec.name, on_messages),
            kwargs={"stop": self._stop, "caught_up": self.caught_up.set, "error_cb": error_cb, "group": "cdp-erasure"},
            name="erasure-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
