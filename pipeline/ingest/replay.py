"""`pipeline dlq replay`: dead-lettered ingest records, chosen by reason and time, produced again to the ingest topic
they came from; each ingest.dlq entry at most once (control.dlq-replays, written in the same transaction)."""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException, Producer

from pipeline.connection import Kafka, client_config
from pipeline.errors import PipelineError
from pipeline.kafka_reads import read_messages, read_to_end
from pipeline.topics import DLQ_REPLAYS, INGEST_DLQ, INGEST_EVENTS, INGEST_PROFILES, TopicRegistry

DLQ = INGEST_DLQ
REPLAYS = DLQ_REPLAYS
INGEST_TOPICS = (INGEST_EVENTS, INGEST_PROFILES)
# On a replayed record: the ingest.dlq entry it was replayed from (`entry_id`), and why it had been dead-lettered.
# Ingest keeps the first on the copy it dead-letters again, so an operator sees a record that failed twice.
REPLAY_OF_HEADER = "replay_of"
REPLAY_REASON_HEADER = "replay_reason"
TRANSACTION_SIZE = 500  # records per transaction: one progress line each

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now_ms: int) -> int:
    """--since: a time (ISO 8601, UTC unless it gives a zone) or an age (90s, 30m, 2h, 7d, 1w) -> epoch ms.
    ValueError says what is accepted."""
    value = text.strip()
    m = _RELATIVE.match(value.lower())
    if m:
        return now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since must be an ISO 8601 time (2026-05-01T08:00) or an age (90s, 30m, 2h, 7d, "
                         f"1w), not {text!r}") from None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000)


@dataclass(frozen=True)
class DeadLetter:
    """One ingest.dlq entry: the original record's key and bytes, and the headers ingest wrote."""

    partition: int
    offset: int
    timestamp_ms: int  # when it was dead-lettered
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    @property
    def entry_id(self) -> str:
        """Names the entry for good: its time too, so a topic deleted and made again starts no false matches."""
        return f"{self.partition}:{self.offset}:{self.timestamp_ms}"

    @property
    def reason(self) -> str:
        return self.headers.get("reason", b"").decode(errors="replace")

    def header(self, name: str) -> str:
        return self.headers.get(name, b"").decode(errors="replace")

    @classmethod
    def of(cls, msg: Any) -> DeadLetter:
        """From a confluent-kafka message of ingest.dlq."""
        return cls(msg.partition(), msg.offset(), msg.timestamp()[1], msg.key(), msg.value(),
                   {k: v or b"" for k, v in (msg.headers() or [])})


@dataclass(frozen=True)
class Replay:
    """What to produce for one entry: the original record back to its ingest topic and partition."""

    entry: DeadLetter
    logical: str
    partition: int | None  # None: the producer's partitioner (the original partition is gone)

    def headers(self) -> list[tuple[str, bytes]]:
        return [(REPLAY_OF_HEADER, self.entry.entry_id.encode()), (REPLAY_REASON_HEADER, self.entry.reason.encode())]


@dataclass
class Selection:
    """The entries chosen, and the others counted by why they were left."""

    replays: list[Replay] = field(default_factory=list)
    left: Counter[str] = field(default_factory=Counter)


def choose(entry: DeadLetter, reasons: frozenset[str], since_ms: int | None, replayed: set[str],
           sources: dict[str, tuple[str, int]]) -> Replay | str:
    """The replay of `entry`, or why it is left: `sources` maps an ingest topic's physical name to its logical
    name and partition count."""
    if entry.reason not in reasons:
        return "other reason"
    if since_ms is not None and entry.timestamp_ms < since_ms:
        return "dead-lettered before --since"
    if entry.entry_id in replayed:
        return "already replayed"
    if entry.value is None:
        return "null value (nothing to replay)"
    if entry.header("truncated") == "true":
        return "truncated copy (the record was bigger than the dead-letter copy)"
    source = sources.get(entry.header("source_topic"))
    if source is None:
        return "source topic not an ingest topic of this deployment"
    logical, partitions = source
    part = entry.header("source_partition")
    return Replay(entry, logical, int(part) if part.isdigit() and int(part) < partitions else None)


def select(entries: Iterable[DeadLetter], reasons: frozenset[str], since_ms: int | None, replayed: set[str],
           sources: dict[str, tuple[str, int]]) -> Iterator[Replay | str]:
    """`choose` for each entry, in order."""
    for entry in entries:
        yield choose(entry, reasons, since_ms, replayed, sources)


def replay_marker(r: Replay, now_ms: int) -> dict[str, Any]:
    """The value kept on control.dlq-replays for a replayed entry (no record content: ids and reason only)."""
    return {"entry": r.entry.entry_id, "reason": r.entry.reason, "topic": r.logical, "replayed_at_ms": now_ms}


def replay(reg: TopicRegistry, kafka: Kafka, *, reasons: frozenset[str], since_ms: int | None, app_id: str,
           dry_run: bool = False, progress: Callable[[str], None] = print,
           timeout_s: float = 3600.0) -> Selection:
    """Read ingest.dlq to its end and replay the chosen entries, TRANSACTION_SIZE at a time: each transaction
    produces the records and their markers on control.dlq-replays together, so a replay cut short by a crash
    leaves every entry either replayed and marked or neither. The transactional id is per app id: a second
    replay of the same deployment fences the first one out."""
    replayed = {k.decode() for k, v in read_to_end(kafka, reg.name(REPLAYS), timeout_s=timeout_s).items()
                if v is not None}
    sources = {reg.name(t): (t, reg[t].partitions) for t in INGEST_TOPICS}
    out = Selection()
    producer: Any = None
    if not dry_run:
        producer = Producer(client_config(kafka, {"transactional.id": f"{app_id}-dlq-replay", "acks": "all",
                                                  "linger.ms": 20}))
        producer.init_transactions(30)
    pending: list[Replay] = []
    scanned, total = 0, [0]
    marker_codec = reg[REPLAYS].codec

    def commit() -> None:
        if producer is not None and pending:
            producer.begin_transaction()
            now = int(time.time() * 1000)
            try:
                for r in pending:
                    kwargs = {} if r.partition is None else {"partition": r.partition}
                    producer.produce(reg.name(r.logical), key=r.entry.key, value=r.entry.value,
                                     headers=r.headers(), **kwargs)
                    producer.produce(reg.name(REPLAYS), key=r.entry.entry_id.encode(),
                                     value=marker_codec.encode(replay_marker(r, now)))
                producer.commit_transaction(60)
            except KafkaException as exc:
                with contextlib.suppress(KafkaException):
                    producer.abort_transaction(30)
                raise PipelineError(f"dlq replay stopped after {len(out.replays)} records: the transaction of the "
                                    f"next {len(pending)} failed ({exc.args[0]}); nothing of it was replayed, "
                                    "run the command again") from None
        out.replays.extend(pending)
        pending.clear()
        progress(f"dlq replay: {scanned}/{total[0]} entries read, {len(out.replays)} "
                 f"{'to replay' if dry_run else 'replayed'}")

    entries = (DeadLetter.of(m) for m in read_messages(kafka, reg.name(DLQ), timeout_s=timeout_s,
                                                       on_ends=lambda n: total.__setitem__(0, n)))
    for choice in select(entries, reasons, since_ms, replayed, sources):
        scanned += 1
        if isinstance(choice, str):
            out.left[choice] += 1
            continue
        pending.append(choice)
        if len(pending) >= TRANSACTION_SIZE:
            commit()
    commit()
    return out
