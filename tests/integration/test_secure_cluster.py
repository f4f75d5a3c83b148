"""The pipeline on a secured, replicated cluster: 3 KRaft brokers (pipeline.local.cluster), SASL_SSL with a
SCRAM user and the cluster's own CA, every topic 3 replicas with 2 in sync, as topics.yaml declares them.

One cluster for the module (it takes about 40 s to start): end to end over SASL_SSL, refused credentials at
start-up, and a broker SIGKILLed mid-stream."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from confluent_kafka import Producer
from http_client import HTTP
from kafka_helpers import Collector, produce
from procs import WorkerProc, stop_all

from pipeline.connection import KafkaConnection, check_cluster, client_config
from pipeline.local.broker import free_port
from pipeline.local.cluster import DEFAULT_USERS, LocalCluster
from pipeline.settings import load_topics
from pipeline.topics import MIN_INSYNC_ENV, REPLICATION_ENV, TopicRegistry, apply

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

USER, PASSWORD = DEFAULT_USERS[0]
SEGMENTS = """
audiences:
  - id: viewers
    name: Viewers
    description: viewed a product in the last day
    query: event productView within 1d
"""
# What the workers get on top of the test process's environment: topics.yaml's own durability, not the
# single-broker override the other tests run with.
DURABLE = {REPLICATION_ENV: "3", MIN_INSYNC_ENV: "2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    c.start(timeout_s=180)
    try:
        yield c
    finally:
        c.kill()  # its data is thrown away


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "kafka-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def secure(cluster: LocalCluster, password: str = PASSWORD) -> KafkaConnection:
    return KafkaConnection(cluster.secure_bootstrap, "SASL_SSL", "SCRAM-SHA-512", USER, password,
                           ca_file=cluster.ca_file)


def secure_env(cluster: LocalCluster, password_file: Path) -> dict[str, str]:
    """The worker's connection, as an operator would give it: no secret on the command line or in a flag."""
    return {"KAFKA_BOOTSTRAP": cluster.secure_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_USERNAME": USER,
            "KAFKA_PASSWORD_FILE": str(password_file), "KAFKA_CA_FILE": str(cluster.ca_file)}


@pytest.fixture
def durable_registry(cluster: LocalCluster, topic_prefix: str) -> TopicRegistry:
    """This test's topics, created over SASL_SSL with topics.yaml's durability (3 replicas, 2 in sync)."""
    cluster.wait_all_up(180)  # a broker killed by an earlier test has rejoined
    with mock.patch.dict(os.environ, DURABLE):
        reg = load_topics(topic_prefix)
    apply(reg, secure(cluster), out=lambda *_: None)
    return reg


@pytest.fixture
def workers(cluster: LocalCluster, password_file: Path, topic_prefix: str, tmp_path: Path, make_config: Any,
            request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProc]]:
    """Factory: `pipeline worker` processes on the secure listener; stopped afterwards, logs shown on failure."""
    started: list[WorkerProc] = []

    def start(name: str = "w1", wait: bool = True, **env: str) -> WorkerProc:
        port = free_port()
        full = {**os.environ, **DURABLE, **secure_env(cluster, password_file), "PIPELINE_TOPIC_PREFIX": topic_prefix,
                "PIPELINE_APP_ID": f"cdp-{topic_prefix.rstrip('-')}", "PIPELINE_DATA_DIR": str(tmp_path / "data"),
                "PIPELINE_WEB_PORT": str(port), "PIPELINE_WORKER_NAME": name,
                "PIPELINE_CONFIG": str(make_config(SEGMENTS)), **env}
        w = WorkerProc(name, full, tmp_path / f"{name}-{len(started)}.log", port)
        started.append(w)
        if wait:
            w.wait_ready(timeout_s=120)
        return w

    yield start
    stop_all(started, request)


def view(person: str, ts: int) -> dict[str, Any]:
    return {"eventId": f"e-{person}-{uuid.uuid4().hex[:6]}", "timestamp": ts, "eventType": "productView",
            "dataset": "web-events", "identityMap": {"ECID": [{"id": f"cookie-{person}", "primary": True}]},
            "product": {"sku": "S1", "name": "runner", "category": "shoes", "price": 10.0}}


def realized_cookies(messages: list[dict[str, Any]]) -> dict[str, int]:
    """cookie -> how many times it was reported realized in `viewers` (no exits expected)."""
    out: dict[str, int] = {}
    for m in messages:
        v = m["value"]
        assert v["audience_id"] == "viewers" and v["status"] == "realized", v
        for cookie in v["identities"].get("ECID", []):
            out[cookie] = out.get(cookie, 0) + 1
    return out


def test_the_pipeline_runs_end_to_end_over_sasl_ssl_with_replicated_topics(cluster, durable_registry, workers):
    # Given topics made over SASL_SSL: 3 replicas each, 2 needed in sync
    conn = secure(cluster)
    admin_md = _topic_metadata(conn, durable_registry.name("ingest.events"))
    assert {len(p.replicas) for p in admin_md.partitions.values()} == {3}
    # And a worker that reaches the cluster only through the SASL_SSL listener (password from a file), its
    # API bound to another address than the default
    worker = workers(PIPELINE_WEB_HOST="127.0.0.2")
    memberships = Collector(durable_registry, conn, "activation.memberships")
    # When 40 people each view a product, published over SASL_SSL
    now = int(time.time() * 1000)
    people = [f"p{i}" for i in range(40)]
    produce(durable_registry, conn, "ingest.events", [view(p, now) for p in people])
    # Then each one's membership arrives, once
    memberships.wait_for(lambda ms: len(ms) >= len(people), timeout_s=90, what="40 memberships")
    memberships.settle(quiet_s=2)
    assert realized_cookies(memberships.messages) == {f"cookie-{p}": 1 for p in people}
    # And every topic of topics.yaml has 3 replicas and needs 2 in sync; Faust's own (its leader election,
    # no data) has 3 replicas too
    made = _pipeline_topics(conn, durable_registry, worker.env["PIPELINE_APP_ID"])
    declared = {spec.name for spec in durable_registry}
    assert {name: made[name] for name in declared} == {name: (3, "2") for name in declared}
    faust_own = set(made) - declared
    assert faust_own and {made[name][0] for name in faust_own} == {3}, made
    # And its API answers on the address it was given, and only there
    assert HTTP.get(f"http://127.0.0.2:{worker.web_port}/healthz", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        HTTP.get(f"http://127.0.0.1:{worker.web_port}/healthz", timeout=5)
    # And it is still ready, and its log, from its first line on, never has the password
    assert worker.readyz()[0] == 200
    log = worker.log()
    assert PASSWORD not in log and "worker w1: " in log  # (cli.cmd_worker's line, before it connects)
    memberships.close()


def test_refused_credentials_stop_start_up_with_the_listener_and_the_reason(cluster, durable_registry, workers,
                                                                           tmp_path):
    # Given a worker whose password is wrong
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    started = time.monotonic()
    worker = workers(wait=False, KAFKA_PASSWORD_FILE=str(wrong))
    # When it starts, it stops by itself quickly (no hang), as a configuration error
    code = worker.proc.wait(timeout=60)
    took = time.monotonic() - started
    log = worker.log()
    assert code == 2, log[-3000:]
    # Then the one line says which listener, as whom, and why, and never a password
    line = next(ln for ln in log.splitlines() if ln.startswith("configuration error:"))
    assert cluster.secure_bootstrap in line and "SASL_SSL/SCRAM-SHA-512 as pipeline" in line, line
    assert "invalid credentials" in line, line
    assert "not-the-password" not in log and PASSWORD not in log
    assert took < 45, took


def test_a_broker_killed_mid_stream_loses_no_membership_and_stops_nothing(cluster, durable_registry, workers):
    # Given a worker on the 3-broker cluster (3 replicas, 2 in sync) and a steady stream of new people
    conn = secure(cluster)
    worker = workers()
    memberships = Collector(durable_registry, conn, "activation.memberships", log_level=2)
    people = [f"k{i}" for i in range(400)]
    sent: list[str] = []
    errors: list[BaseException] = []
    spec = durable_registry["ingest.events"]

    def feed() -> None:  # 20 new people every 0.25 s: 5 s of stream, the kill comes about 1.25 s in
        try:
            producer = Producer(client_config(conn, {"linger.ms": 5, "acks": "all", "enable.idempotence": True,
                                                     "log_level": 2}))
            failed: list[Any] = []
            for i in range(0, len(people), 20):
                for p in people[i:i + 20]:
                    event = view(p, int(time.time() * 1000))
                    producer.produce(spec.name, key=event["eventId"].encode(), value=spec.codec.encode(event),
                                     on_delivery=lambda err, _m: failed.append(err) if err else None)
                producer.poll(0)
                sent.extend(people[i:i + 20])
                time.sleep(0.25)
            assert producer.flush(120) == 0 and not failed, failed
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    memberships.wait_for(lambda ms: len(ms) >= 1 and len(sent) >= 100, timeout_s=90, what="the stream flowing")
    # When one broker (the first listed: the worker bootstrapped from it) is SIGKILLed mid-stream
    victim = cluster.brokers[0]
    victim.kill()
    killed_at = len(sent)
    feeder.join(timeout=180)
    assert not feeder.is_alive() and not errors, errors
    # Then every person's membership arrives, once, though a third of the replicas is gone
    memberships.wait_for(lambda ms: len(realized_cookies(ms)) >= len(people), timeout_s=180,
                         what="every person's membership")
    memberships.settle(quiet_s=3)
    assert realized_cookies(memberships.messages) == {f"cookie-{p}": 1 for p in people}
    assert 0 < killed_at < len(people)  # the kill came mid-stream
    # And the worker carried on in the same process
    assert worker.proc.poll() is None
    assert PASSWORD not in worker.log()
    memberships.close()
    victim.start(wait=False)  # back for the module's next test (`durable_registry` waits for it)


def _pipeline_topics(conn: KafkaConnection, reg: TopicRegistry, app_id: str) -> dict[str, tuple[int, str]]:
    """name -> (replicas, min.insync.replicas) of the topics of this registry and of Faust's app."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(client_config(conn))
    prefix = reg.name("ingest.events").split("cdp.")[0]
    topics = {name: md for name, md in admin.list_topics(timeout=10).topics.items()
              if name.startswith((prefix, app_id))}
    out = {}
    for name, md in topics.items():
        res = ConfigResource("topic", name)
        isr = admin.describe_configs([res])[res].result()["min.insync.replicas"].value
        out[name] = (min(len(p.replicas) for p in md.partitions.values()), isr)
    return out


def _topic_metadata(conn: KafkaConnection, topic: str) -> Any:
    from confluent_kafka.admin import AdminClient

    assert check_cluster(conn, wait_s=30) == 3
    admin = AdminClient(client_config(conn))
    # (a topic created a moment ago may not be in every broker's metadata yet: no partitions listed)
    deadline = time.monotonic() + 30
    while True:
        md = admin.list_topics(topic, timeout=10).topics[topic]
        if md.error is None and md.partitions and all(p.leader >= 0 for p in md.partitions.values()):
            return md
        assert time.monotonic() < deadline, f"topic {topic} has no partitions in the metadata after 30 s"
        time.sleep(0.3)

