"""Table partitions moving between two workers and back (issue 13, defect 3).

A worker that gives a partition up must close its RocksDB store, or it cannot reopen it when the partition
comes back: faust retried "DB for partition N is locked" for 30 s, then the worker exited. Here one worker
(the survivor) stays up while the other joins and leaves three times (twice SIGTERM, once SIGKILL), with
records produced between the rebalances; the survivor must reopen its stores every time and serve them all.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient
from http_client import HTTP
from kafka_helpers import produce
from procs import wait_settled

from pipeline.model import Identity
from pipeline.state.snapshot import snapshot
from pipeline.topics import TopicRegistry

pytestmark = pytest.mark.integration

# Faust's group drops a SIGKILLed worker after its session timeout: 10 s instead of the default 60 s.
FAST_FAILOVER = {"BROKER_SESSION_TIMEOUT": "10"}
PEOPLE_PER_BATCH = 15
LOCKED = ("is locked", "lock hold by current process")

Person = tuple[str, str]  # (cookie, e-mail)


def ev(eid: str, ts: int, ids: list[tuple[str, str]]) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {ns: [{"id": v}] for ns, v in ids}}


def produce_batch(registry: TopicRegistry, bootstrap: str, tag: str, n: int) -> list[Person]:
    """PEOPLE_PER_BATCH new people, two events each: the cookie alone, then the cookie with the e-mail."""
    people = [(f"{tag}-b{n}-c{i}", f"{tag}-b{n}-p{i}@x.io") for i in range(PEOPLE_PER_BATCH)]
    now = int(time.time() * 1000)
    events = [ev(f"{c}-1", now + i, [("ECID", c)]) for i, (c, _) in enumerate(people)]
    events += [ev(f"{c}-2", now + 100 + i, [("ECID", c), ("Email", e)]) for i, (c, e) in enumerate(people)]
    produce(registry, bootstrap, "ingest.events", events)
    return people


def healthy(*workers: Any) -> None:
    """Fails at once if a worker exited or could not reopen a store."""
    for w in workers:
        text = w.log()
        assert not any(s in text for s in LOCKED), f"{w.name} could not reopen a store:\n{text[-5000:]}"
        assert w.proc.poll() is None, f"{w.name} exited {w.proc.returncode}:\n{text[-5000:]}"


def wait_for(what: str, check: Callable[[], bool], survivor: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        healthy(survivor)
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{survivor.log()[-5000:]}")


def group_members(admin: AdminClient, group: str) -> int | None:
    """The stable group's member count (None while it rebalances)."""
    d = admin.describe_consumer_groups([group])[group].result()
    return len(d.members) if d.state == ConsumerGroupState.STABLE else None


def generation(w: Any) -> int:
    """The generation of Faust's group whose assignment `w` has recovered (GET /readyz; 0 while not ready)."""
    state = w.assignment()
    return state[0] if state else 0


def rebalanced(w: Any, generation_before: int) -> Callable[[], bool]:
    """True once `w` is ready on an assignment newer than `generation_before`: it had a new assignment and
    recovered its tables after it."""
    return lambda: generation(w) > generation_before


def serves(w: Any, people: list[Person]) -> Callable[[], bool]:
    """True when the worker's API serves every person from its own stores: one profile with both events."""
    def check() -> bool:
        for cookie, _ in people:
            r = HTTP.get(f"{w.url}/profiles", params={"namespace": "ECID", "id": cookie}, timeout=5)
            if r.status_code != 200 or r.json()["event_count"] != 2:
                return False
        return True
    return check


def stitched(registry: TopicRegistry, bootstrap: str, people: list[Person]) -> Callable[[], bool]:
    """True when the changelogs (whichever worker wrote them) hold each person as one profile, both events."""
    def check() -> bool:
        snap = snapshot(registry, bootstrap)
        for cookie, email in people:
            owner = snap.owner(Identity("ECID", cookie).key)
            if owner is None or owner != snap.owner(Identity("Email", email).key) or owner not in snap.profiles:
                return False
            if sorted(e.event_id for e in snap.profiles[owner].events) != [f"{cookie}-1", f"{cookie}-2"]:
                return False
        return True
    return check


def test_the_survivor_reopens_its_stores_on_every_rebalance(registry, kafka_bootstrap, start_worker, make_config,
                                                           tmp_path: Path) -> None:
    config_dir = make_config("audiences: []\n")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    tag = uuid.uuid4().hex[:6]
    started = time.monotonic()
    # Given one worker holding every partition, with a first batch of people applied
    w1 = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1", extra_env=FAST_FAILOVER)
    group = w1.env["PIPELINE_APP_ID"]
    wait_for("w1 alone in the group", lambda: group_members(admin, group) == 1, w1)
    first = wait_settled([w1])
    applied = produce_batch(registry, kafka_bootstrap, tag, 0)
    wait_for("batch 0 served by w1", serves(w1, applied), w1)
    n = 1
    leavers = []
    for round_, leave in enumerate(("SIGTERM", "SIGKILL", "SIGTERM")):
        # When a second worker joins (the survivor gives half of its partitions up, closing their stores) ...
        w2 = start_worker("w2", config_dir=config_dir, data_dir=tmp_path / "w2", extra_env=FAST_FAILOVER)
        leavers.append(w2)
        wait_for(f"round {round_}: two workers in the group", lambda: group_members(admin, group) == 2, w1, 90)
        wait_settled([w1, w2], timeout_s=120)  # the rebalance reached w1 too: one generation, every partition once
        batch = produce_batch(registry, kafka_bootstrap, tag, n)
        n += 1
        wait_for(f"round {round_}: batch {n - 1} stitched by the two workers",
                 stitched(registry, kafka_bootstrap, batch), w1, 90)
        applied += batch
        # ... and leaves again (the partitions come back to the survivor, which reopens their stores)
        before = generation(w1)
        if leave == "SIGKILL":
            os.killpg(w2.proc.pid, signal.SIGKILL)
            w2.proc.wait(10)
        else:
            w2.stop()
        wait_for(f"round {round_}: w1 alone after w2's {leave}", lambda: group_members(admin, group) == 1, w1, 60)
        wait_for(f"round {round_}: w1 rebalanced after w2's {leave}", rebalanced(w1, before), w1)
        # Then the survivor serves everyone so far from its reopened stores, and what comes next
        wait_for(f"round {round_}: w1 serves all {len(applied)} people", serves(w1, applied), w1)
        batch = produce_batch(registry, kafka_bootstrap, tag, n)
        n += 1
        if leave != "SIGKILL":
            # (after the SIGKILL, the dead worker's ingest consumer keeps its partitions until librdkafka's
            # session timeout, 45 s: that batch is checked at the end, so the wait overlaps the next round)
            wait_for(f"round {round_}: w1 serves batch {n - 1}", serves(w1, batch), w1)
        applied += batch
    wait_for(f"w1 serves all {len(applied)} people", serves(w1, applied), w1, 90)
    healthy(w1)
    assert not [w.log_path.name for w in leavers if any(s in w.log() for s in LOCKED)]
    assert generation(w1) >= first + 6  # six rebalances after the first assignment
    print(f"rebalance test: {time.monotonic() - started:.1f} s")
