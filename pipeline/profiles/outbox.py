"""A profile's outbox: output written with the profile until it is known delivered, sent again after a crash.

A handling writes the profile (its changelog record) and sends membership and profile-change messages on the
same producer, but Kafka acknowledges them independently: a SIGKILL can keep the profile and lose the messages.
The redelivered input then finds its effect stored (a duplicate event, an attribute already set) and decides
nothing again, so the messages would never be sent. Instead each write keeps the messages it caused, stamped
with the producer's (run, epoch), and whoever loads the profile later sends them again unless that epoch is
known acknowledged:
  - by this process: its producer's `acked_epoch` has reached the epoch;
  - by an earlier process or another worker: the partition's acknowledgement record (a metadata key in the
    profile table, written by the owner as its epochs are acknowledged) has reached it.
A worker assigned a partition also sends every undelivered outbox found in it, so a profile no input touches
again still gets its messages. Copies sent twice carry the same idempotency key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import cached_property
from typing import Any, Protocol

import msgpack

from pipeline.model import MembershipChange, Outbox, ProfileState
from pipeline.stages.messages import Send
from pipeline.state.codec import Forward
from pipeline.state.tables import PartitionedTable
from pipeline.topics import MEMBERSHIP_TOPIC, PROFILE_CHANGES_TOPIC

KEEP_RUNS = 32  # runs an acknowledgement record remembers; an outbox of an older run is sent again (harmless)

Message = list[Any]  # [logical topic, key, value]


def acks_key(partition: int) -> bytes:
    """The profile-table key of a partition's acknowledgement record (a metadata key: walks skip `__` keys)."""
    return f"__cdp_acked__:{partition}".encode()


def messages_of(changes: Iterable[MembershipChange], sends: Iterable[Send]) -> list[Message]:
    """What of a handling's output an outbox keeps: its membership changes and profile changes (stage
    messages have their own redelivery rules, pipeline.profiles.ops)."""
    out: list[Message] = [[MEMBERSHIP_TOPIC, f"{c.profile_id}|{c.audience_id}", c.to_dict()] for c in changes]
    out += [[s.topic, s.key, s.value] for s in sends if s.topic == PROFILE_CHANGES_TOPIC]
    return out


def stamp(previous: Outbox | None, messages: list[Message], run: str, epoch: int,
          delivered: bool) -> Outbox | None:
    """The outbox to write: the previous one's messages unless delivered, then the new ones, the latest per
    (topic, key) (only the last membership change of an audience matters to whoever reads the topic)."""
    if not messages and previous is not None and not delivered:
        return previous  # unchanged, stamp included: nothing new to wait for, and the stored bytes stay the same
    latest: dict[tuple[str, str], Message] = {}
    if previous is not None and not delivered:
        for m in previous.messages:
            latest[(m[0], m[1])] = m
    for m in messages:
        latest.pop((m[0], m[1]), None)  # keep the send order: a newer message goes last
        latest[(m[0], m[1])] = m
    return Outbox(run, epoch, list(latest.values())) if latest else None


class Acks:
    """Which outboxes are delivered, for one partition: this run's producer, and the partition's record (read
    only when an outbox of another run asks: most outboxes a worker meets are its own)."""

    def __init__(self, run: str, acked_epoch: int, read_record: Callable[[], bytes | None]) -> None:
        self.run = run
        self.acked_epoch = acked_epoch  # this run's: every epoch up to it is acknowledged
        self._read_record = read_record

    @cached_property
    def record(self) -> dict[str, int]:
        """run -> acknowledged epoch, for earlier runs and other workers."""
        return decode_record(self._read_record())

    def delivered(self, outbox: Outbox) -> bool:
        if outbox.run == self.run:
            return outbox.epoch <= self.acked_epoch
        return self.record.get(outbox.run, -1) >= outbox.epoch

    def resend_now(self, outbox: Outbox) -> bool:
        """Sent by another run and not known delivered: that run may have died with it in flight (this run's
        own undelivered messages are still in flight in this process's producer: not sent again)."""
        return outbox.run != self.run and not self.delivered(outbox)


def decode_record(raw: bytes | None) -> dict[str, int]:
    return dict(msgpack.unpackb(raw, raw=False)) if raw else {}


def encode_record(record: dict[str, int], run: str, acked_epoch: int) -> bytes:
    """The record with this run's acknowledged epoch, keeping the KEEP_RUNS most recently written runs."""
    updated = {r: e for r, e in record.items() if r != run}
    updated[run] = acked_epoch
    return msgpack.packb(dict(list(updated.items())[-KEEP_RUNS:]))  # type: ignore[no-any-return]


class Epochs(Protocol):
    """The output producer's epochs (pipeline.runtime.OutputProducer): this run, the epoch an outbox written
    now is stamped with, and how far its messages are acknowledged."""

    run: str
    acked_epoch: int

    @property
    def epoch(self) -> int: ...


def with_outbox(entry: ProfileState | Forward, box: Outbox | None) -> ProfileState | Forward:
    if isinstance(entry, Forward):
        return replace(entry, outbox=box)
    entry.outbox = box
    return entry


class Stamps:
    """The profile agent's outboxes on one table: stamping an entry's outbox when it is written, and keeping
    each partition's acknowledgement record up to date as the producer acknowledges epochs."""

    def __init__(self, table: PartitionedTable, output: Epochs) -> None:
        self.table = table
        self.output = output
        self.acks_written: dict[int, int] = {}  # partition -> this run's acknowledged epoch last written to its record
        self.stamped: dict[int, int] = {}  # partition -> the latest epoch this run stamped an outbox of it with

    def acks(self, partition: int) -> Acks:
        return Acks(self.output.run, self.output.acked_epoch,
                    lambda: self.table.get(partition, acks_key(partition)))

    def stamp(self, partition: int, entry: ProfileState | Forward, previous: Outbox | None,
              messages: list[Message]) -> ProfileState | Forward:
        """The entry to write, with its outbox: the previous one unless delivered, plus `messages`."""
        if previous is None and not messages:
            return with_outbox(entry, None)
        delivered = previous is not None and self.acks(partition).delivered(previous)
        box = stamp(previous, messages, self.output.run, self.output.epoch, delivered)
        if box is not None:
            self.stamped[partition] = box.epoch
        return with_outbox(entry, box)

    def record_acks(self) -> None:
        """For each partition this run stamped outboxes in: once its producer has acknowledged more epochs,
        write that to the partition's acknowledgement record (so that the next owner knows those outboxes
        are delivered and does not send them again)."""
        table, stamped, acks_written = self.table, self.stamped, self.acks_written
        acked, active = self.output.acked_epoch, table.active()
        for partition, latest in list(stamped.items()):
            if partition not in active:
                del stamped[partition]
            elif acked > acks_written.get(partition, 0):
                key = acks_key(partition)
                table.put(partition, key, encode_record(decode_record(table.get(partition, key)),
                                                        self.output.run, acked))
                acks_written[partition] = acked
                if latest <= acked:
                    del stamped[partition]
