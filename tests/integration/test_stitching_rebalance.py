"""Identity stitching through the broker while workers join, leave, crash and restart (issue 13).

The generated customers of tests/stitching.py (households sharing a cookie, late links, hostile records with
two CRM ids) are produced as ingest records, keyed by their home identity, in chunks paced over the run.
Between the chunks the consumer group changes: a third worker joins, one leaves (SIGTERM), one is killed
(SIGKILL, while it handles a burst of records) and restarted on its data folder, one is restarted on an empty
one. After quiescence the whole graph, read from the changelogs, must be the plain reference (`check_world`),
every hostile record must be on the dead-letter topic, no worker may log "is locked" or a traceback, and the
workers stopped with SIGTERM must exit 0.

Default: 150 people (about 1.5 minutes). `STITCH_PEOPLE=2000` for a bigger run, `STITCH_SEED` to choose the
world (the default seed is random and printed; the interleaving on the broker is never reproducible).
Run with `pytest -s` to see the report line and timings.
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient
from kafka_helpers import Collector, produce
from procs import wait_settled
from stitching import Rec, World, check_world, generate_world

from pipeline.state.snapshot import snapshot
from pipeline.topics import TopicRegistry

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PEOPLE = int(os.environ.get("STITCH_PEOPLE", "150"))
SEED = int(os.environ.get("STITCH_SEED") or random.randrange(1_000_000))
CHUNKS = 10
# Faust's group drops a SIGKILLed worker after 10 s instead of its default 60 s. (The ingest consumer,
# librdkafka, keeps its default 45 s session: the killed worker's ingest partitions wait that long.)
FAST_FAILOVER = {"BROKER_SESSION_TIMEOUT": "10"}
QUIESCENCE_S = 120 + PEOPLE * 0.15  # after the last chunk, for the graph to become right
BAD_LOG_LINES = ("is locked", "Traceback")


def message(rec: Rec, ts: int) -> tuple[str, dict[str, Any]]:
    """The ingest topic and record for a generated record (its identities are already normalised)."""
    identity_map: dict[str, list[dict[str, str]]] = {}
    for i in rec.ids:
        identity_map.setdefault(i.namespace, []).append({"id": i.id})
    if rec.kind == "p":
        return "ingest.profiles", {"recordId": rec.rid, "timestamp": ts, "dataset": "crm",
                                   "identityMap": identity_map, "attributes": {"crm.source": f"rec {rec.rid}"}}
    return "ingest.events", {"eventId": rec.rid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
                             "identityMap": identity_map}


class Feed:
    """Produces a world's records in chunks, each keyed by the record's home identity."""

    def __init__(self, registry: TopicRegistry, bootstrap: str, world: World) -> None:
        self.registry, self.bootstrap = registry, bootstrap
        now = int(time.time() * 1000)
        self.items = [(*message(r, now + n), r.home().key) for n, r in enumerate(world.records)]
        size = -(-len(self.items) // CHUNKS)
        self.chunks = [self.items[i:i + size] for i in range(0, len(self.items), size)]
        self.sent = 0
        self.last_sent_at = time.monotonic()

    def send(self, n: int, over_s: float = 2.0) -> None:
        """Chunk n, in 8 slices spread over `over_s` seconds (pacing, so records flow during a rebalance)."""
        chunk = self.chunks[n]
        step = -(-len(chunk) // 8)
        for i in range(0, len(chunk), step):
            for logical in ("ingest.events", "ingest.profiles"):
                batch = [(v, k) for t, v, k in chunk[i:i + step] if t == logical]
                if batch:
                    keys = {id(v): k for v, k in batch}
                    produce(self.registry, self.bootstrap, logical, [v for v, _ in batch],
                            key=lambda v, keys=keys: keys[id(v)])  # type: ignore[misc]
            self.sent += len(chunk[i:i + step])
            time.sleep(over_s / 8)
        self.last_sent_at = time.monotonic()


class GroupWatch:
    """Samples a consumer group in the background and records each new stable membership (a finished
    rebalance). Sampling can miss a membership that lasted less than its period: the count is a lower bound."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.group = group
        self.memberships: list[frozenset[str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> frozenset[str] | None:
        """The member ids while the group is stable (recorded if new), else None."""
        d = self.admin.describe_consumer_groups([self.group], request_timeout=5)[self.group].result()
        if d.state != ConsumerGroupState.STABLE or not d.members:
            return None
        members = frozenset(m.member_id for m in d.members)
        with self._lock:
            if not self.memberships or self.memberships[-1] != members:
                self.memberships.append(members)
        return members

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.current()
            except Exception:  # noqa: BLE001 - the group may not exist yet; sample again
                continue

    @property
    def rebalances(self) -> int:
        return max(0, len(self.memberships) - 1)

    def wait_for(self, size: int, other_than: frozenset[str] | None, workers: Callable[[], list[Any]],
                 timeout_s: float = 90) -> frozenset[str]:
        """Wait until the group is stable with `size` members, not the membership `other_than`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            healthy(workers())
            try:
                members = self.current()
            except Exception:  # noqa: BLE001 - the group may not exist yet
                members = None
            if members is not None and len(members) == size and members != other_than:
                return members
            time.sleep(0.3)
        raise AssertionError(f"group {self.group} not stable with {size} new members after {timeout_s}s:\n"
                             + tails(workers()))

    def close(self) -> None:
        """Stop sampling and destroy the admin client now, while the broker is up (a client left to the
        interpreter's exit, after the session's broker stopped, can block its exit in rd_kafka_destroy)."""
        self._stop.set()
        self._thread.join()
        del self.admin


def tails(workers: list[Any], n: int = 3000) -> str:
    return "\n".join(f"----- {w.log_path.name} (exit {w.proc.poll()}) -----\n{w.log()[-n:]}" for w in workers)


def bad_lines(w: Any) -> list[str]:
    return [line for line in w.log().splitlines() if any(s in line for s in BAD_LOG_LINES)]


def healthy(workers: list[Any]) -> None:
    """Fails at once if a worker meant to be running exited."""
    for w in workers:
        assert w.proc.poll() is None, f"worker {w.log_path.name} exited {w.proc.returncode}:\n{w.log()[-5000:]}"


def dead_lettered(registry: TopicRegistry, messages: list[dict[str, Any]]) -> dict[str, set[str]]:
    """eventId -> reasons, for the dead-lettered ingest events (the DLQ holds the original bytes)."""
    codec = registry["ingest.events"].codec
    out: dict[str, set[str]] = {}
    for m in messages:
        raw = base64.b64decode(m["value_b64"]) if "value_b64" in m else None
        eid = codec.decode(raw)["eventId"] if raw else f"<undecodable at offset {m['offset']}>"
        out.setdefault(eid, set()).add(m.get("headers", {}).get("reason", "<no reason>"))
    return out


@pytest.mark.timeout(int(300 + PEOPLE * 0.5))
def test_generated_customers_stitch_right_while_workers_join_leave_crash_and_restart(
        registry, kafka_bootstrap, start_worker, make_config, tmp_path: Path) -> None:
    started = time.monotonic()
    config_dir = make_config("audiences: []\n")
    tag = f"{uuid.uuid4().hex[:6]}."
    world = generate_world(random.Random(SEED), PEOPLE, tag=tag)
    timing = random.Random(SEED)
    hostile = {r.rid for r in world.records if r.hostile}
    feed = Feed(registry, kafka_bootstrap, world)
    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    label = f"seed {SEED}, {PEOPLE} people, tag {tag}"

    def worker(name: str, data: str) -> Any:
        return start_worker(name, config_dir=config_dir, wait=False, data_dir=tmp_path / data,
                            extra_env=FAST_FAILOVER)

    # Given two workers, ready and alone in the group
    live = {"w1": worker("w1", "w1"), "w2": worker("w2", "w2")}
    group = live["w1"].env["PIPELINE_APP_ID"]
    watch = GroupWatch(kafka_bootstrap, group)
    ingest_watch = GroupWatch(kafka_bootstrap, f"{group}-ingest")
    everyone = list(live.values())  # every worker started, for the log checks

    def running() -> list[Any]:
        return list(live.values())

    stopped: list[str] = []
    exits: list[tuple[str, int]] = []  # (log, exit code) of the workers stopped with SIGTERM

    def stop(w: Any) -> str:
        """SIGTERM, SIGKILL after 60 s (a worker's event loop can be blocked for up to the ingest group's 45 s
        session timeout, see the report); the exit code is checked at the end."""
        t0 = time.monotonic()
        code = w.stop(timeout_s=60)
        exits.append((w.log_path.name, code))
        return f"{w.log_path.name} exit {code} after {time.monotonic() - t0:.1f} s"

    try:
        for w in running():
            w.wait_ready()
        members = watch.wait_for(2, None, running)
        wait_settled(running())
        first_record_at = time.monotonic()
        feed.send(0)

        def change(chunk: int, action: Callable[[], None], size: int, burst: bool = False) -> None:
            """Run the membership change while chunk `chunk` is produced, then wait for the new group.
            burst: the chunk is produced at once and the change follows 0.1-0.5 s later, while the workers are
            busy with it (so a SIGKILL lands in the middle of handling, not between two quiet slices)."""
            nonlocal members
            if burst:
                feed.send(chunk, over_s=0)
                time.sleep(0.1 + timing.random() * 0.4)
            t = threading.Thread(target=action)
            t.start()
            if not burst:
                feed.send(chunk)
            t.join()
            for w in running():
                w.wait_ready()
            members = watch.wait_for(size, members, running)

        # When, while the records arrive: a third worker joins ...
        feed.send(1)

        def join() -> None:
            live["w3"] = worker("w3", "w3")
            everyone.append(live["w3"])
        change(2, join, 3)
        feed.send(3)

        # ... one of three leaves (SIGTERM) ...
        def leave() -> None:
            stopped.append(stop(live.pop("w2")))
        change(4, leave, 2)
        feed.send(5)

        # ... one is killed (SIGKILL) and restarted on its data folder ...
        def crash() -> None:
            live.pop("w1").kill()
            live["w1"] = worker("w1", "w1")
            everyone.append(live["w1"])
        change(6, crash, 2, burst=True)
        feed.send(7)

        # ... and one is restarted on an empty data folder (its partitions come from the changelogs)
        def fresh() -> None:
            stopped.append(stop(live.pop("w3")))
            live["w3"] = worker("w3", "w3-empty")
            everyone.append(live["w3"])
        change(8, fresh, 2)
        for n in range(9, len(feed.chunks)):
            feed.send(n)
        assert feed.sent == len(world.records)

        # Then, after quiescence, the graph is the reference: one profile per person, each shared cookie
        # with one of its household, every event once in the profile of its home identity
        deadline = feed.last_sent_at + QUIESCENCE_S
        while True:
            healthy(running())
            rep = check_world(world, snapshot(registry, kafka_bootstrap), include_hostile_events=False)
            if not rep.problems:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"graph not right {QUIESCENCE_S:.0f}s after the last record ({label}):\n{rep.line()}\n"
                    + "\n".join(rep.problems[:30]) + "\n" + tails(running()))
            time.sleep(1)
        quiet_at = time.monotonic()
        # ... every hostile record is dead-lettered for its two CRM ids, and nothing else is
        dlq.wait_for(lambda ms: hostile <= set(dead_lettered(registry, ms)), 60,
                     f"the {len(hostile)} hostile records")
        assert dead_lettered(registry, dlq.messages) == {rid: {"conflicting-unique-identities"} for rid in hostile}
        # ... the graph stays right
        rep = check_world(world, snapshot(registry, kafka_bootstrap), include_hostile_events=False)
        assert not rep.problems, f"{rep.line()} ({label})\n" + "\n".join(rep.problems[:30])
        events = sum(r.kind == "e" for r in world.records)
        print(f"\nstitching under rebalances ({label}): {rep.line()}\n"
              f"  records {len(world.records)} ({events} events, {len(world.records) - events} profile records, "
              f"{len(hostile)} hostile, dead-lettered), {len(world.shared)} shared cookies\n"
              f"  rebalances observed: worker group {watch.rebalances}, ingest group {ingest_watch.rebalances}; "
              f"SIGTERM: {'; '.join(stopped)}\n"
              f"  records produced over {feed.last_sent_at - first_record_at:.1f} s; right "
              f"{quiet_at - feed.last_sent_at:.1f} s after the last one; test {time.monotonic() - started:.1f} s")
        # ... and the workers still running are up, none hit a locked store or an exception, and the ones
        # stopped with SIGTERM stopped cleanly
        healthy(running())
        for w in everyone:
            errors = [line for line in w.log().splitlines() if "[ERROR]" in line or "[CRITICAL]" in line]
            assert not bad_lines(w), (f"{w.log_path.name}: {bad_lines(w)[:10]}\n" + "\n".join(errors[:10])
                                      + f"\n{w.log()[-5000:]}")
        assert all(code == 0 for _, code in exits), f"SIGTERM did not stop every worker cleanly: {stopped}"
        assert watch.rebalances >= 4, watch.memberships
    finally:
        watch.close()
        ingest_watch.close()
        dlq.close()
