"""The per-event path in one process, without Kafka: where a worker's CPU goes per record, by step.

The bench's mix (bench.workload: 50,000 people, page and product views, carts, purchases, logins that link
ECID + CRMID + Email, CRM records) goes through the worker's own pure code in the order a worker runs it, every
partition held here, the tables plain dicts:
  decode    Avro bytes -> record (pipeline.ingest.decode.Decoder, the registry codec)
  route     the record's wire form, its home identity and the home-hop lookup (pipeline.identity.stitch)
  identity  identity-stage handlers (resolve, claim, repoint ...) and their messages' encode + decode, as
            through Kafka (they always are: pipeline.identity.stitch.in_process_allowed)
  profile   profile-stage handlers (pipeline.profiles.ops.ProfileProcessor.handle: apply, claimed, link ...)
  load      decoding the stored profile (a share of loads miss the worker's decoded cache: --miss)
  write     encoding the profile (pipeline.state.codec.encode_profile_within)
  publish   encoding membership changes, profile changes and Kafka-bound stage messages with their codecs
Not here: librdkafka (consume, produce), RocksDB, Faust's consumer for the stage topics, the event loop: the
end-to-end figure is `make bench`'s. This one moves with the code alone, so a change can be measured in seconds.

Run: `python -m bench.event_path [--records 60000] [--warm 40000] [--miss 0.3] [--profile]`.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import random
import time
from pathlib import Path
from typing import Any

from bench.workload import Workload
from pipeline.identity.stitch import apply_msg, handle_identity, home_key, start_resolve
from pipeline.ingest.decode import Decoder, Rejected, Skipped
from pipeline.observability.memory import tune_gc
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine, load_segments
from pipeline.settings import PipelineConfig
from pipeline.stages import messages
from pipeline.stages.messages import Send, record_to_wire, wire_identity_keys
from pipeline.state.codec import Forward, decode_profile_entry, encode_forward, encode_profile_within
from pipeline.topics import (
    IDENTITY_TOPIC,
    INGEST_EVENTS,
    INGEST_PROFILES,
    MEMBERSHIP_TOPIC,
    PROFILE_CHANGES_TOPIC,
    PROFILE_TOPIC,
    TopicRegistry,
)

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("decode", "route", "identity", "profile", "load", "write", "publish")


class EventPath:
    """The worker's per-event path over dict tables; `timed[step]` accumulates seconds."""

    def __init__(self, miss: float, seed: int = 3) -> None:
        cfg = PipelineConfig.load(ROOT / "config" / "example")
        self.reg = TopicRegistry.load()
        retention = cfg.profile.datasets.event_history.retention_ms
        engine = SegmentEngine(load_segments(ROOT / "bench" / "segments.yaml"), history_retention_ms=retention)
        self.clock = [1_780_000_000.0]
        self.proc = ProfileProcessor(cfg.profile, engine, lambda: self.clock[0])
        self.budget = cfg.profile.datasets.limits.max_profile_bytes
        self.unique = cfg.profile.identity.unique_namespaces
        self.decoders = {self.reg[lg].name: Decoder(kind, self.reg[lg].codec, cfg.profile.identity,  # type: ignore[arg-type]
                                                     cfg.profile.datasets)
                         for lg, kind in ((INGEST_EVENTS, "event"), (INGEST_PROFILES, "profile"))}
        self.identities: dict[str, str] = {}
        self.stored: dict[str, bytes] = {}  # profile id -> encoded entry
        self.decoded: dict[str, Any] = {}  # profile id -> decoded entry (the worker's decoded cache)
        self.rnd = random.Random(seed)
        self.miss = miss
        self.timed: dict[str, float] = collections.defaultdict(float)
        self.counts: collections.Counter[str] = collections.Counter()
        self.codec = {t: self.reg[t].codec for t in (MEMBERSHIP_TOPIC, PROFILE_CHANGES_TOPIC)}

    def record(self, topic: str, value: bytes) -> None:
        timed, perf = self.timed, time.perf_counter
        t0 = perf()
        verdict = self.decoders[topic].decode(value, int(self.clock[0] * 1000))
        t1 = perf()
        timed["decode"] += t1 - t0
        if isinstance(verdict, Rejected | Skipped):
            return
        wire = record_to_wire(verdict)
        home = home_key(wire_identity_keys(wire), self.unique)
        owner = self.identities.get(home)
        send = apply_msg(owner, wire, home) if owner else start_resolve(wire, home, int(self.clock[0] * 1000))
        timed["route"] += perf() - t1
        self.deliver([send])

    def deliver(self, sends: list[Send]) -> None:
        """Stage messages in send order (a FIFO, as local delivery and one partition's log keep them)."""
        queue = collections.deque(sends)
        timed, perf = self.timed, time.perf_counter
        while queue:
            send = queue.popleft()
            t0 = perf()
            if send.topic == IDENTITY_TOPIC:  # through Kafka: encoded and decoded
                msg = messages.decode(messages.encode(send.value))
                ires = handle_identity(send.key, self.identities.get(send.key), msg)  # type: ignore[arg-type]
                if ires.write is not None:
                    self.identities[send.key] = ires.write
                elif ires.delete:
                    self.identities.pop(send.key, None)
                queue.extend(ires.sends)
                timed["identity"] += perf() - t0
                self.counts["identity"] += 1
                continue
            if send.topic != PROFILE_TOPIC:
                self.publish(send)
                timed["publish"] += perf() - t0
                continue
            pid = send.key
            entry = self.decoded.get(pid)
            if pid in self.stored and (entry is None or self.rnd.random() < self.miss):
                entry = decode_profile_entry(self.stored[pid])
            t1 = perf()
            timed["load"] += t1 - t0
            res = self.proc.handle(pid, entry, send.value)
            t2 = perf()
            timed["profile"] += t2 - t1
            self.counts["profile"] += 1
            if res.delete:
                self.stored.pop(pid, None)
                self.decoded.pop(pid, None)
            elif res.write is not None:
                if isinstance(res.write, Forward):
                    self.stored[pid] = encode_forward(res.write)
                    self.decoded.pop(pid, None)
                else:
                    self.stored[pid], _ = encode_profile_within(res.write, self.budget)
                    self.decoded[pid] = res.write
            t3 = perf()
            timed["write"] += t3 - t2
            for change in res.changes:
                self.codec[MEMBERSHIP_TOPIC].encode(change.to_dict())
            for s in res.sends:
                if s.topic in (PROFILE_TOPIC, IDENTITY_TOPIC):
                    if isinstance(s.value, messages.Absorb | messages.Link):  # through Kafka
                        messages.encode(s.value)
                    queue.append(s)
                else:
                    self.publish(s)
            timed["publish"] += perf() - t3
            self.counts["changes"] += len(res.changes)

    def publish(self, send: Send) -> None:
        codec = self.codec.get(send.topic) or self.reg[send.topic].codec
        codec.encode(send.value)


def run(records: int, warm: int, miss: float, profile: bool, seed: int = 11) -> dict[str, Any]:
    path = EventPath(miss)
    gen = Workload(path.reg, seed=seed)
    t_ms = int(path.clock[0] * 1000)
    batch: list[tuple[str, bytes]] = []
    for i in range(warm + records):
        _kind, topic, _key, value = gen.next_record(t_ms + i)
        batch.append((topic, value))
    for topic, value in batch[:warm]:
        path.record(topic, value)
        path.clock[0] += 0.0005
    path.timed.clear()
    path.counts.clear()
    tune_gc()  # as the worker does once built (the warm-up's profiles are then frozen out of the collector's sight)
    prof = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if prof:
        prof.enable()
    for topic, value in batch[warm:]:
        path.record(topic, value)
        path.clock[0] += 0.0005
    if prof:
        prof.disable()
    wall = time.perf_counter() - started
    out = {"records": records, "us_per_record": 1e6 * wall / records,
           "steps_us": {s: round(1e6 * path.timed[s] / records, 2) for s in STEPS},
           "per_record": {k: round(v / records, 3) for k, v in path.counts.items()}}
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--warm", type=int, default=40_000, help="records before the measured ones (known people)")
    ap.add_argument("--miss", type=float, default=0.3, help="share of profile loads that decode the stored bytes")
    ap.add_argument("--profile", action="store_true", help="cProfile the measured records (slower)")
    args = ap.parse_args(argv)
    out = run(args.records, args.warm, args.miss, args.profile)
    print(f"{out['us_per_record']:.1f} us per record ({1e6 / out['us_per_record']:,.0f} records/s on one core)")
    for step, us in out["steps_us"].items():
        print(f"  {step:9s} {us:7.1f} us")
    print("  messages per record:", out["per_record"])


if __name__ == "__main__":
    main()
