"""Crashes and replays (issue 14): a crash between a profile's write and its membership messages loses nothing (the profile's
outbox is sent again by the next worker, on a real broker with real worker processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from http_client import HTTP
from kafka_helpers import Collector, produce

from pipeline.profiles.outbox import acks_key, decode_record
from pipeline.state.codec import peek_entry
from pipeline.state.snapshot import read_changelog, snapshot
from pipeline.state.tables import partition_for
from pipeline.topics import TopicRegistry

pytestmark = pytest.mark.integration

SEGMENTS = """
audiences:
  - id: visitors
    name: Visitors
    description: viewed a page
    query: event pageView within 30d
  - id: shoppers
    name: Shoppers
    description: added to a cart
    query: event addToCart within 30d
"""
COOKIES = [f"c{i}" for i in range(40)]


def event(eid: str, ts: int, cookie: str, kind: str) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": kind, "dataset": "web-events",
            "identityMap": {"ECID": [{"id": cookie}]}}


def stored_memberships(registry: TopicRegistry, bootstrap: str) -> dict[str, set[str]]:
    """cookie -> audiences its stored profile (read from the changelog) is an active member of."""
    snap = snapshot(registry, bootstrap)
    return {c: p.active_segments() for p in snap.profiles.values() for c in p.identities.get("ECID", {})}


def delivered(messages: list[dict[str, Any]]) -> dict[str, set[str]]:
    """cookie -> audiences whose last membership message on the topic says it is a member."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for m in messages:
        v = m["value"]
        last[(v["profile_id"], v["audience_id"])] = v
    out: dict[str, set[str]] = {}
    for v in last.values():
        if v["status"] != "exited":
            for c in v["identities"].get("ECID", []):
                out.setdefault(c, set()).add(v["audience_id"])
    return out


@pytest.mark.parametrize("disk", ["kept", "empty"])
def test_membership_messages_lost_in_a_crash_after_the_profile_write_are_sent_again(
        registry, kafka_bootstrap, start_worker, make_config, tmp_path: Path, disk: str) -> None:
    # Given a worker whose membership messages never leave the process (as if a SIGKILL caught them in flight)
    config_dir = make_config(SEGMENTS)
    lose = {"PIPELINE_FAULT_LOSE_OUTPUT": "activation.memberships,activation.membership-state"}
    worker = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1", extra_env=lose)
    now = int(time.time() * 1000)
    events = [event(f"v-{c}", now, c, "pageView") for c in COOKIES]
    events += [event(f"a-{c}", now + 1, c, "addToCart") for c in COOKIES[::2]]
    expected = {c: {"visitors", "shoppers"} if i % 2 == 0 else {"visitors"} for i, c in enumerate(COOKIES)}
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    # When the events are handled and the profiles (with their memberships) are on the changelog
    produce(registry, kafka_bootstrap, "ingest.events", events, key=lambda v: v["identityMap"]["ECID"][0]["id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and stored_memberships(registry, kafka_bootstrap) != expected:
        time.sleep(0.5)
    assert stored_memberships(registry, kafka_bootstrap) == expected
    assert memberships.settle(quiet_s=1) == []
    # And the worker is SIGKILLed and started again without the fault (on its data folder, or an empty one)
    worker.kill()
    restarted = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / ("w1" if disk == "kept" else "w1b"))
    # Then every membership the stored profiles hold reaches the activation topic
    memberships.wait_for(lambda ms: delivered(ms) == expected, timeout_s=60, what="every stored membership")
    # And nothing was decided twice: one realized message per membership, each with its own idempotency key
    memberships.settle(quiet_s=2)
    keys = [m["value"]["idempotency_key"] for m in memberships.messages]
    assert len(set(keys)) == sum(len(a) for a in expected.values())
    assert {m["value"]["status"] for m in memberships.messages} == {"realized"}
    assert restarted.proc.poll() is None
    memberships.close()


def outboxes_known_delivered(registry: TopicRegistry, bootstrap: str) -> bool:
    """Every outbox stamp on the profiles changelog is covered by its partition's acknowledgement record."""
    changelog = read_changelog(registry, bootstrap, "state.profiles-changelog")
    partitions = registry["state.profiles-changelog"].partitions
    for key, raw in changelog.items():
        if key.startswith(b"__"):
            continue
        stamp = peek_entry(raw).outbox
        if stamp is not None:
            record = decode_record(changelog.get(acks_key(partition_for(key, partitions))))
            if record.get(stamp[0], -1) < stamp[1]:
                return False
    return True


def test_a_graceful_restart_sends_no_membership_again(registry, kafka_bootstrap, start_worker, make_config,
                                                      tmp_path: Path) -> None:
    # Given a worker that has delivered every membership, and recorded its producer's acknowledgements
    config_dir = make_config(SEGMENTS)
    worker = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1")
    now = int(time.time() * 1000)
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    produce(registry, kafka_bootstrap, "ingest.events", [event(f"v-{c}", now, c, "pageView") for c in COOKIES],
            key=lambda v: v["identityMap"]["ECID"][0]["id"])
    memberships.wait_for(lambda ms: len(ms) == len(COOKIES), timeout_s=60, what="a membership per cookie")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not outboxes_known_delivered(registry, kafka_bootstrap):
        time.sleep(0.5)
    assert outboxes_known_delivered(registry, kafka_bootstrap)
    # When it stops gracefully and starts again on an empty disk (everything restored from the changelog)
    assert worker.stop() == 0
    start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1b")
    produce(registry, kafka_bootstrap, "ingest.events", [event("v-late", now, "late", "pageView")],
            key=lambda v: "late")
    # Then the only new membership message is the new visitor's: no outbox is sent again
    memberships.wait_for(lambda ms: len(ms) > len(COOKIES), timeout_s=60, what="the late visitor")
    memberships.settle(quiet_s=2)
    assert [m["value"]["identities"]["ECID"] for m in memberships.messages[len(COOKIES):]] == [["late"]]
    memberships.close()


def duplicates_seen(url: str) -> float:
    text = HTTP.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('cdp_profile_events_total{what="duplicates"}'))


def test_replayed_duplicates_write_nothing(registry, kafka_bootstrap, start_worker, make_config,
                                           tmp_path: Path) -> None:
    # Given a worker that has handled a page view per cookie, and the same events again (its first replay
    # may write each profile once more: its outbox, delivered by then, is dropped)
    worker = start_worker("w1", config_dir=make_config(SEGMENTS), data_dir=tmp_path / "w1")
    now = int(time.time() * 1000)
    events = [event(f"v-{c}", now, c, "pageView") for c in COOKIES]
    changelog = Collector(registry, kafka_bootstrap, "state.profiles-changelog")

    def replay(rounds: int, duplicates: int) -> list[str]:
        produce(registry, kafka_bootstrap, "ingest.events", events * rounds,
                key=lambda v: v["identityMap"]["ECID"][0]["id"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and duplicates_seen(worker.url) < duplicates:
            time.sleep(0.3)
        assert duplicates_seen(worker.url) == duplicates
        changelog.settle(quiet_s=2)
        return [m["key"] for m in changelog.messages if not m["key"].startswith("__")]

    first = replay(1, 0)
    assert len(set(first)) == len(COOKIES)
    replayed = replay(1, len(events))
    assert len(replayed) <= len(first) + len(COOKIES)
    # When the same events come twice more (a producer's retries, a replay after a crash)
    again = replay(2, 3 * len(events))
    # Then no profile is written again: no new changelog record
    assert again == replayed
    changelog.close()
