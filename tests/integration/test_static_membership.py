"""Static group membership (issue 14, item 6): a worker restarted after a SIGKILL is ready again at once.

Without it, the restarted worker joins both consumer groups as a new member; the broker then waits for every
known member to rejoin, and the dead one never does: its partitions (and the new member's join) wait for its
session to expire, 60 s in Faust's group and 45 s in the ingest group. With `group.instance.id` (app id +
worker name) the restarted worker takes its old member over, with its partitions, without a rebalance.

Static members do not leave their groups when they close, so the worker removes them itself on a graceful
stop: a worker that is SIGTERMed hands its partitions over at once (the second test).

Times are printed; the assertions are about the mechanism (no rebalance, well inside the session timeouts,
which nothing but static membership can beat), not speed targets. The same test without static membership
(`STATIC_MEMBERSHIP_BASELINE=1` runs it too) shows what it replaces: ~60 s to ready.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient
from http_client import HTTP
from kafka_helpers import produce

from pipeline.ingest.agents import ingest_group
from pipeline.local.broker import free_port
from pipeline.topics import TopicRegistry

pytestmark = pytest.mark.integration

FAUST_SESSION_S = 60.0  # faust's broker_session_timeout default (not overridden by the worker)
INGEST_SESSION_S = 45.0  # librdkafka's session.timeout.ms default (not overridden by consumer_config)
# Nothing but a static rejoin can beat a session timeout after a SIGKILL: the dead member is dropped at
# (last heartbeat + session timeout), at least `session - heartbeat interval (1 s in the tests, 3 s by
# default)` after the kill.
WELL_INSIDE = 0.75


def ev(eid: str, ts: int, cookie: str) -> dict[str, object]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {"ECID": [{"id": cookie}]}}


def produce_batch(registry: TopicRegistry, bootstrap: str, tag: str, n: int = 12) -> list[str]:
    """n new people, one event each (keys spread them over every ingest partition); returns their cookies."""
    cookies = [f"{tag}-c{i}" for i in range(n)]
    now = int(time.time() * 1000)
    produce(registry, bootstrap, "ingest.events", [ev(f"{c}-1", now + i, c) for i, c in enumerate(cookies)])
    return cookies


def serves(w: Any, cookies: list[str]) -> Callable[[], bool]:
    """True when the worker's API serves every cookie's profile with its event."""
    def check() -> bool:
        for cookie in cookies:
            try:
                r = HTTP.get(f"{w.url}/profiles", params={"namespace": "ECID", "id": cookie}, timeout=5)
            except httpx.HTTPError:
                return False
            if r.status_code != 200 or r.json()["event_count"] != 1:
                return False
        return True
    return check


def wait_for(what: str, check: Callable[[], bool], w: Any, timeout_s: float = 120) -> float:
    """Waits for `check`; returns the time it took. Fails at once if the worker exited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert w.proc.poll() is None, f"{w.name} exited {w.proc.returncode}:\n{w.log()[-5000:]}"
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{w.log()[-5000:]}")


def ready(w: Any) -> Callable[[], bool]:
    """GET /readyz answers 200: partitions assigned, tables recovered, ingest consuming."""
    return lambda: w.readyz()[0] == 200


def members(admin: AdminClient, group: str) -> list[Any] | None:
    """The stable group's members (None while it rebalances or has none)."""
    d = admin.describe_consumer_groups([group])[group].result()
    return list(d.members) if d.state == ConsumerGroupState.STABLE else None


def holds(admin: AdminClient, group: str, instance_ids: set[str | None], partitions: int) -> Callable[[], bool]:
    """True when the group is stable with exactly these members (by group.instance.id, None for dynamic
    ones) and they hold `partitions` partitions between them."""
    def check() -> bool:
        ms = members(admin, group)
        return (ms is not None and sorted(map(str, (m.group_instance_id for m in ms))) == sorted(map(str, instance_ids))
                and sum(len(m.assignment.topic_partitions) for m in ms) == partitions)
    return check


def generation(w: Any) -> int:
    """The generation of Faust's group whose assignment the worker has recovered (GET /readyz; 0 if not ready)."""
    state = w.assignment()
    return state[0] if state else 0


@pytest.mark.parametrize("static", [
    True,
    pytest.param(False, marks=pytest.mark.skipif(not os.environ.get("STATIC_MEMBERSHIP_BASELINE"),
                                                 reason="the ~60 s baseline: STATIC_MEMBERSHIP_BASELINE=1")),
], ids=["static", "dynamic-baseline"])
def test_a_worker_restarted_after_sigkill_is_ready_without_waiting_for_its_session(
        static: bool, registry, kafka_bootstrap, start_worker, make_config, tmp_path: Path) -> None:
    config_dir = make_config("audiences: []\n")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    tag = uuid.uuid4().hex[:6]
    port = free_port()  # the same worker restarted: same name, data folder and HTTP port
    env = {"PIPELINE_WEB_PORT": str(port), "PIPELINE_STATIC_MEMBERSHIP": "1" if static else "0"}

    def start() -> Any:
        w = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1", extra_env=env, wait=False)
        w.web_port = port
        return w

    # Given a worker holding every partition of both groups, its first records handled
    w1 = start()
    wait_for("w1 ready", ready(w1), w1)
    app_id = w1.env["PIPELINE_APP_ID"]
    ingest = ingest_group(app_id)
    faust_id, ingest_id = (f"{app_id}-w1", f"{app_id}-w1-ingest") if static else (None, None)
    ingest_partitions = sum(registry[t].partitions for t in ("ingest.events", "ingest.profiles"))
    wait_for("w1 alone in the ingest group", holds(admin, ingest, {ingest_id}, ingest_partitions), w1)
    wait_for("w1 alone in Faust's group", lambda: [m.group_instance_id for m in members(admin, app_id) or []]
             == [faust_id], w1)
    wait_for("first batch served", serves(w1, produce_batch(registry, kafka_bootstrap, tag + "a")), w1)
    before = generation(w1)
    assert before > 0

    # When it is SIGKILLed (no shutdown at all), records arrive, and it is started again under the same name
    w1.kill()
    killed = time.monotonic()
    batch = produce_batch(registry, kafka_bootstrap, tag + "b")
    w1 = start()
    wait_for("the restarted w1 ready", ready(w1), w1, timeout_s=150)
    ready_s = time.monotonic() - killed
    wait_for("the records sent meanwhile served", serves(w1, batch), w1, timeout_s=150)
    consumed_s = time.monotonic() - killed
    print(f"\nstatic membership {'on' if static else 'off'}: after the SIGKILL, ready again in {ready_s:.1f} s, "
          f"the records sent meanwhile served in {consumed_s:.1f} s (session timeouts: Faust "
          f"{FAUST_SESSION_S:.0f} s, ingest {INGEST_SESSION_S:.0f} s)")
    after = generation(w1)
    if static:
        # Then it took its old members over: the same generation (no rebalance), in less time than any
        # dynamic rejoin could take, and it handles what was produced meanwhile
        assert after == before, f"Faust's group rebalanced: generation {before} -> {after}"
        assert ready_s < WELL_INSIDE * FAUST_SESSION_S
        assert consumed_s < WELL_INSIDE * INGEST_SESSION_S
    else:
        # (the baseline: a new member, the group rebalances once the dead member's session expired)
        assert after > before
    assert holds(admin, ingest, {ingest_id}, ingest_partitions)()
    wait_for("a new batch served", serves(w1, produce_batch(registry, kafka_bootstrap, tag + "c")), w1)


@pytest.mark.parametrize("leave", [
    True,
    pytest.param(False, marks=pytest.mark.skipif(not os.environ.get("STATIC_MEMBERSHIP_BASELINE"),
                                                 reason="the ~45 s baseline: STATIC_MEMBERSHIP_BASELINE=1")),
], ids=["leave-on-stop", "remain-baseline"])
def test_a_static_worker_stopped_gracefully_hands_its_partitions_over_at_once(
        leave: bool, registry, kafka_bootstrap, start_worker, make_config, tmp_path: Path) -> None:
    config_dir = make_config("audiences: []\n")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    tag = uuid.uuid4().hex[:6]
    env = {"PIPELINE_STATIC_MEMBERSHIP": "1", "PIPELINE_LEAVE_GROUP_ON_STOP": "1" if leave else "0"}
    # Given two static workers sharing every partition
    w1 = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1", extra_env=env, wait=False)
    w2 = start_worker("w2", config_dir=config_dir, data_dir=tmp_path / "w2", extra_env=env, wait=False)
    wait_for("w1 ready", ready(w1), w1)
    wait_for("w2 ready", ready(w2), w2)
    app_id = w1.env["PIPELINE_APP_ID"]
    ingest = ingest_group(app_id)
    ingest_partitions = sum(registry[t].partitions for t in ("ingest.events", "ingest.profiles"))
    wait_for("both in the ingest group",
             holds(admin, ingest, {f"{app_id}-w1-ingest", f"{app_id}-w2-ingest"}, ingest_partitions), w1)
    wait_for("both in Faust's group", lambda: len(members(admin, app_id) or []) == 2, w1)
    assert all(len(m.assignment.topic_partitions) for m in members(admin, ingest) or [])

    # When w2 is stopped gracefully (SIGTERM)
    stopping = time.monotonic()
    assert w2.stop() == 0, w2.log()[-5000:]
    stopped_s = time.monotonic() - stopping
    assert w2.log().count("left consumer group") == (2 if leave else 0), w2.log()[-5000:]
    # Then w1 holds every ingest partition well before w2's session would have expired, and serves new records
    wait_for("w1 alone in the ingest group", holds(admin, ingest, {f"{app_id}-w1-ingest"}, ingest_partitions), w1)
    handover_s = time.monotonic() - stopping
    wait_for("w1 alone in Faust's group", lambda: [m.group_instance_id for m in members(admin, app_id) or []]
             == [f"{app_id}-w1"], w1)
    wait_for("a new batch served by w1", serves(w1, produce_batch(registry, kafka_bootstrap, tag)), w1)
    served_s = time.monotonic() - stopping
    print(f"\ngraceful stop of a static worker ({'leaving' if leave else 'remaining in'} its groups): stopped in "
          f"{stopped_s:.1f} s, its ingest partitions with the other worker {handover_s:.1f} s after the SIGTERM, "
          f"new records served after {served_s:.1f} s")
    if leave:
        assert handover_s < WELL_INSIDE * INGEST_SESSION_S
        # And the same worker started again joins back as a new member: a rebalance, no session to wait for
        restarting = time.monotonic()
        w2 = start_worker("w2", config_dir=config_dir, data_dir=tmp_path / "w2", extra_env=env, wait=False)
        wait_for("w2 ready again", ready(w2), w2)
        wait_for("both in the ingest group again",
                 holds(admin, ingest, {f"{app_id}-w1-ingest", f"{app_id}-w2-ingest"}, ingest_partitions), w1)
        rejoined_s = time.monotonic() - restarting
        print(f"the stopped worker started again: ready and back in both groups in {rejoined_s:.1f} s")
        assert rejoined_s < WELL_INSIDE * INGEST_SESSION_S


def test_a_static_worker_restarted_on_another_port_after_sigkill_keeps_its_partitions(
        registry, kafka_bootstrap, start_worker, make_config, tmp_path: Path) -> None:
    config_dir = make_config("audiences: []\n")
    tag = uuid.uuid4().hex[:6]

    def start(port: int) -> Any:
        w = start_worker("w1", config_dir=config_dir, data_dir=tmp_path / "w1", wait=False,
                         extra_env={"PIPELINE_WEB_PORT": str(port)})
        w.web_port = port
        return w

    # Given a static worker serving its first records on one HTTP port
    w1 = start(free_port())
    wait_for("w1 ready", ready(w1), w1)
    wait_for("first batch served", serves(w1, produce_batch(registry, kafka_bootstrap, tag + "a")), w1)
    # When it is SIGKILLed and started again under the same name on another port (a new pod address): the
    # broker hands it its old assignment, whose Faust metadata names the old URL
    w1.kill()
    w1 = start(free_port())
    # Then it does not die on Faust's URL check: it is ready, says why the URL is stale, and serves new records
    wait_for("the restarted w1 ready", ready(w1), w1, timeout_s=150)
    wait_for("a new batch served", serves(w1, produce_batch(registry, kafka_bootstrap, tag + "b")), w1)
    assert "rejoined the group as a static member" in w1.log()
    assert w1.proc.poll() is None
