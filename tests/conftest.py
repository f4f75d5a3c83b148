"""Shared fixtures: one real Kafka broker per test run, unique topics and groups per test, worker processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import WorkerProc, stop_all

from pipeline.local.broker import SINGLE_BROKER_ENV, LocalBroker, free_port
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.settings import load_topics
from pipeline.topics import TopicRegistry, apply

# The session broker is one node: one replica per topic, here and in every worker the tests start (tests of
# the 3-node cluster set their own).
for _key, _value in SINGLE_BROKER_ENV.items():
    os.environ.setdefault(_key, _value)


# Workers heartbeat their consumer groups every second instead of every 3 s (Faust's and librdkafka's
# defaults): a member learns of a rebalance at its next heartbeat, and a worker joining takes three such
# waits (Faust's group, then the ingest group's two cooperative rounds), so two workers started together were
# ready after ~10 s instead of ~4 s. Sessions, timeouts and the protocol are the defaults. (librdkafka's
# producers and admin clients in the worker log once that the consumer property does not apply to them.)
HEARTBEAT_S = "1"
HEARTBEATS_KAFKA_CONFIG = "librdkafka:\n  heartbeat.interval.ms: 1000\n"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running broker: $KAFKA_BOOTSTRAP if set (reuse), else our own on free ports, stopped afterwards."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    port = free_port()
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), port, free_port())
    broker.start(timeout_s=90)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """Unique per test, so tests never see each other's data."""
    return f"t{uuid.uuid4().hex[:8]}-"


@pytest.fixture
def registry(kafka_bootstrap: str, topic_prefix: str) -> TopicRegistry:
    """The topic registry with this test's prefix, topics created on the broker."""
    reg = load_topics(topic_prefix)
    apply(reg, kafka_bootstrap, out=lambda *_: None)
    return reg


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a worker configuration folder with the example identity and datasets and these audiences."""

    def make(segments: str, name: str = "config") -> Path:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        for f in ("identity.yaml", "datasets.yaml"):
            (d / f).write_text((EXAMPLE_CONFIG_DIR / f).read_text())
        (d / "segments.yaml").write_text(segments)
        return d

    return make


@pytest.fixture
def start_worker(kafka_bootstrap: str, topic_prefix: str, registry: TopicRegistry, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProc]]:
    """Factory: start `pipeline worker` processes on this test's topics; all are stopped afterwards,
    and their logs are printed when the test failed."""
    workers: list[WorkerProc] = []
    app_id = f"cdp-{topic_prefix.rstrip('-')}"
    kafka_config = tmp_path / "kafka-heartbeats.yaml"
    kafka_config.write_text(HEARTBEATS_KAFKA_CONFIG)

    def start(name: str = "w1", config_dir: Path | None = None, wait: bool = True,
              data_dir: Path | None = None, extra_env: dict[str, str] | None = None) -> WorkerProc:
        port = free_port()
        env = {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": topic_prefix,
               "PIPELINE_APP_ID": app_id, "PIPELINE_DATA_DIR": str(data_dir or tmp_path / "data"),
               "PIPELINE_WEB_PORT": str(port), "PIPELINE_WORKER_NAME": name,
               "PIPELINE_CONFIG": str(config_dir or EXAMPLE_CONFIG_DIR),
               "BROKER_HEARTBEAT_INTERVAL": HEARTBEAT_S, "PIPELINE_KAFKA_CONFIG": str(kafka_config),
               **(extra_env or {})}
        # (a worker restarted on its old port, from extra_env, is reached there)
        w = WorkerProc(name, env, tmp_path / f"{name}-{len(workers)}.log", int(env["PIPELINE_WEB_PORT"]))
        workers.append(w)
        if wait:
            w.wait_ready()
        return w

    yield start
    stop_all(workers, request)
