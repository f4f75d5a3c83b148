"""Backfill: a destination that maps an audience for the first time gets that audience's current members.

Current members come from `activation.membership-state` (compacted: key `profile_id|audience_id`, value
the latest MembershipChange of that pair); what each destination already had backfilled is kept in
`activation.dest-state` (compacted, JSON, key = destination name). The runner calls `Backfill.run()`
after starting the destinations and before streaming, so the stream's later changes arrive after the
backfilled state (per profile, the last word is the stream's).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import OFFSET_INVALID, Consumer, Producer, TopicPartition

from pipeline.connection import Kafka, client_config
from pipeline.destinations.base import Payload, TopicResolver
from pipeline.destinations.config import DestinationConfig
from pipeline.destinations.lane import Decoder, group_id
from pipeline.destinations.mapping import SKIP_CONSENT_UNKNOWN, Skip, map_change
from pipeline.errors import DeliveryError
from pipeline.kafka_reads import ReadTimeout, read_to_end
from pipeline.observability import metrics
from pipeline.topics import DEST_STATE, MEMBERSHIP_STATE_TOPIC, MEMBERSHIP_TOPIC, PROFILE_CHANGES_TOPIC

log = logging.getLogger(__name__)

DEST_STATE_TOPIC = DEST_STATE


@dataclass(frozen=True)
class DestState:
    """What a destination has had backfilled: these audiences, or (all=True) every audience."""

    audiences: frozenset[str]
    all: bool = False
    updated_ms: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"backfilled": sorted(self.audiences), "all": self.all,
                           "updated_ms": self.updated_ms}, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> DestState:
        d = json.loads(raw)
        return cls(frozenset(map(str, d.get("backfilled") or [])), bool(d.get("all")),
                   int(d.get("updated_ms") or 0))

    def same_as(self, other: DestState | None) -> bool:
        return other is not None and (self.audiences, self.all) == (other.audiences, other.all)


@dataclass(frozen=True)
class Plan:
    """Audiences to backfill for one destination: `include` (None = every audience seen) minus `exclude`."""

    include: frozenset[str] | None
    exclude: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return self.include is not None and not (self.include - self.exclude)

    def wants(self, audience_id: str) -> bool:
        return (self.include is None or audience_id in self.include) and audience_id not in self.exclude


def plan_for(cfg: DestinationConfig, prev: DestState | None) -> Plan:
    """Which of `cfg`'s audiences were never backfilled (or streamed from the start)."""
    if prev is not None and prev.all:
        return Plan(frozenset())  # it activated every audience already: everything reached it by stream
    done = prev.audiences if prev is not None else frozenset()
    if cfg.audiences is None:
        return Plan(None, done)
    return Plan(cfg.audiences - done)


def next_state(cfg: DestinationConfig, prev: DestState | None, seen: Iterable[str]) -> DestState:
    """The state after a run: explicit lists record exactly the mapped audiences (so unmapping and
    re-mapping an audience backfills it again); "*" records every audience seen and all=True."""
    now = int(time.time() * 1000)
    if cfg.audiences is None:
        prior = prev.audiences if prev is not None else frozenset()
        return DestState(prior | frozenset(seen), True, now)
    return DestState(cfg.audiences, False, now)


def read_compacted(kafka: Kafka, topic: str, *, timeout_s: float = 120.0) -> dict[bytes, bytes | None]:
    """`read_to_end`, its timeout a retryable delivery error (the runner tries the backfill again)."""
    try:
        return read_to_end(kafka, topic, timeout_s=timeout_s)
    except ReadTimeout as exc:
        raise DeliveryError(str(exc), retryable=True) from exc


def current_members(raw: dict[bytes, bytes | None], decode: Decoder) -> list[dict[str, Any]]:
    """The latest membership of every pair that is not `exited`, decoded (MembershipChange dicts)."""
    out = []
    for value in raw.values():
        if not value:
            continue  # tombstone: the pair was deleted
        msg = decode(MEMBERSHIP_STATE_TOPIC, value)
        if msg.get("status") != "exited":
            out.append(msg)
    out.sort(key=lambda m: (str(m["audience_id"]), str(m["profile_id"])))
    return out


def member_payloads(cfg: DestinationConfig, members: Iterable[dict[str, Any]], plan: Plan | None = None,
                    skips: Counter[str] | None = None, key_suffix: str = ":backfill") -> list[Payload]:
    """A `realized` payload per current member of `cfg`'s (planned) audiences, through the normal
    mapping (identities, attributes and consent rules apply). The idempotency key is the latest
    change's key plus `key_suffix` (`:backfill`: a receiver can tell a backfill from the change)."""
    out: list[Payload] = []
    for msg in members:
        audience = str(msg["audience_id"])
        if not cfg.activates(audience) or (plan is not None and not plan.wants(audience)):
            continue
        result = map_change({**msg, "status": "realized",
                             "idempotency_key": f"{msg['idempotency_key']}{key_suffix}"}, cfg)
        if isinstance(result, Skip):
            if skips is not None:
                skips[result.reason] += 1
            continue
        out.append(result)
    return out


def read_current_members(kafka: Kafka, topics: TopicResolver, decode: Decoder) -> list[dict[str, Any]]:
    """Current members of every audience, from activation.membership-state (blocking)."""
    return current_members(read_compacted(kafka, topics.name(MEMBERSHIP_STATE_TOPIC)), decode)


class BackfillTarget(Protocol):
    """What a backfill needs of the runner (`DestinationRunner` is one): its cluster, topics, decoder and
    destinations, and its delivery path for payloads that do not come from a lane's consumer."""

    kafka: Kafka
    topics: TopicResolver
    decode: Decoder

    def configs(self) -> list[DestinationConfig]: ...

    def record_skips(self, name: str, skips: Counter[str]) -> None: ...

    async def deliver_and_flush(self, name: str, payloads: list[Payload]) -> None: ...


class Backfill:
    """Run once per runner start; see the module docstring."""

    def __init__(self, *, source_topics: Iterable[str] = (MEMBERSHIP_TOPIC, PROFILE_CHANGES_TOPIC),
                 timeout_s: float = 120.0) -> None:
        self.source_topics = tuple(source_topics)
        self.timeout_s = timeout_s
        self.last_run: dict[str, int] = {}  # destination -> payloads backfilled in the last run

    async def run(self, runner: BackfillTarget) -> dict[str, int]:
        """1. Read activation.dest-state; plan per destination (audiences never backfilled).
        2. If nothing is planned: done. Else note which destinations' consumer groups are new and
           the end offsets of the source topics (before reading the membership state).
        3. Read activation.membership-state to its end; deliver + flush each destination's payloads.
        4. A new group starts at the noted end offsets: the backfill replaces replaying history.
        5. Record each destination's backfilled audiences in activation.dest-state."""
        topics = runner.topics
        states_raw = await asyncio.to_thread(read_compacted, runner.kafka, topics.name(DEST_STATE_TOPIC),
                                             timeout_s=self.timeout_s)
        states = {k.decode("utf-8", "replace"): DestState.from_json(v) for k, v in states_raw.items() if v}
        configs = runner.configs()
        plans = {cfg.name: plan_for(cfg, states.get(cfg.name)) for cfg in configs}
        self.last_run = {}
        seen: set[str] = set()
        if any(not p.empty for p in plans.values()):
            planned = [cfg for cfg in configs if not plans[cfg.name].empty]
            fresh, ends = await asyncio.to_thread(self._fresh_groups, runner.kafka, topics,
                                                  [group_id(c.name) for c in planned])
            members = await asyncio.to_thread(read_current_members, runner.kafka, topics, runner.decode)
            seen = {str(m["audience_id"]) for m in members}
            for cfg in planned:
                plan = plans[cfg.name]
                skips: Counter[str] = Counter()
                payloads = member_payloads(cfg, members, plan, skips)
                await runner.deliver_and_flush(cfg.name, payloads)
                for reason, n in skips.items():
                    metrics.DESTINATION_SKIPS.labels(cfg.name, reason).inc(n)
                if skips[SKIP_CONSENT_UNKNOWN]:
                    metrics.DESTINATION_CONSENT_UNKNOWN.labels(cfg.name).inc(skips[SKIP_CONSENT_UNKNOWN])
                runner.record_skips(cfg.name, skips)
                if group_id(cfg.name) in fresh:
                    await asyncio.to_thread(self._commit_group, runner.kafka, group_id(cfg.name), ends)
                self.last_run[cfg.name] = len(payloads)
                audiences = [a for a in sorted(seen if plan.include is None else plan.include)
                             if plan.wants(a)]
                log.info("destination %s: backfilled %d member(s) of %s (%d skipped)%s", cfg.name,
                         len(payloads), ", ".join(audiences) or "no audience", sum(skips.values()),
                         "; new consumer group starts at the current end" if group_id(cfg.name) in fresh else "")
        else:
            log.info("destinations: nothing to backfill")
        writes = []
        for cfg in configs:
            prev = states.get(cfg.name)
            nxt = next_state(cfg, prev, seen if not plans[cfg.name].empty else ())
            if not nxt.same_as(prev):
                writes.append((cfg.name, nxt))
        if writes:
            await asyncio.to_thread(self._write_states, runner.kafka, topics.name(DEST_STATE_TOPIC), writes)
        return self.last_run

    def _fresh_groups(self, kafka: Kafka, topics: TopicResolver, groups: list[str]
                      ) -> tuple[set[str], list[TopicPartition]]:
        """(groups without any committed offset on the source topics, the source topics' end offsets)."""
        probe = Consumer(client_config(kafka, {"group.id": f"cdp-probe-{uuid.uuid4().hex[:12]}",
                                        "enable.auto.commit": False}))
        try:
            tps: list[TopicPartition] = []
            for logical in self.source_topics:
                name = topics.name(logical)
                meta = probe.list_topics(name, timeout=10).topics.get(name)
                if meta is None or meta.error is not None:
                    continue
                tps.extend(TopicPartition(name, p) for p in meta.partitions)
            ends = [TopicPartition(tp.topic, tp.partition,
                                   probe.get_watermark_offsets(tp, timeout=10)[1]) for tp in tps]
        finally:
            probe.close()
        fresh: set[str] = set()
        for group in groups:
            c = Consumer(client_config(kafka, {"group.id": group, "enable.auto.commit": False}))
            try:
                committed = c.committed([TopicPartition(tp.topic, tp.partition) for tp in tps], timeout=10)
                if all(tp.offset is None or tp.offset < 0 or tp.offset == OFFSET_INVALID for tp in committed):
                    fresh.add(group)
            finally:
                c.close()
        return fresh, ends

    @staticmethod
    def _commit_group(kafka: Kafka, group: str, ends: list[TopicPartition]) -> None:
        if not ends:
            return
        c = Consumer(client_config(kafka, {"group.id": group, "enable.auto.commit": False}))
        try:
            c.commit(offsets=ends, asynchronous=False)
        finally:
            c.close()

    @staticmethod
    def _write_states(kafka: Kafka, topic: str, writes: list[tuple[str, DestState]]) -> None:
        errors: list[Any] = []
        p = Producer(client_config(kafka, {"enable.idempotence": True}))
        for name, state in writes:
            p.produce(topic, key=name.encode("utf-8"), value=state.to_json(),
                      on_delivery=lambda err, _m: errors.append(err) if err else None)
        if p.flush(30) or errors:
            raise DeliveryError(f"cannot record backfill state in {topic}: {errors[:1]}", retryable=True)
