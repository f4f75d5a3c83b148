"""Outages waited out, without a broker: the log throttle, the backoff, the Kafka watch's states and lines,
the Schema Registry's errors sorted (unavailable vs no such schema), and ingest holding records while the
registry is away (issue 14, item 3)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition
from confluent_kafka.schema_registry.error import SchemaRegistryError

from pipeline.backoff import Backoff, full_jitter_s
from pipeline.errors import SchemaRegistryUnavailable, SerdeError
from pipeline.ingest import agents
from pipeline.local.broker import free_port
from pipeline.observability.logs import Throttle
from pipeline.observability.readiness import Readiness
from pipeline.outage import STALL_AFTER_S, KafkaWatch
from pipeline.serde.avro import RegistryCatalog
from pipeline.stages.backlog import StageBacklog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: Any, name: str = "aiokafka.client", level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_backoff_doubles_to_its_cap_and_starts_over() -> None:
    b = Backoff(1, 10)
    assert [b.next() for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    b.reset()
    assert b.next() == 1
    jittered = Backoff(4, 4, jitter=True)
    assert all(2 <= jittered.next() <= 4 for _ in range(100))
    assert all(0 <= full_jitter_s(a, 100, 1000) <= min(1.0, 0.1 * 2 ** (a - 1)) for a in range(1, 10))


def test_a_repeated_line_passes_once_per_growing_window_and_says_how_many_were_dropped() -> None:
    clock = Clock()
    throttle = Throttle(first_s=10, max_s=40, clock=clock)
    passed = []
    # Given a connection error logged 10 times a second for 100 s, with another line among them
    for tick in range(1000):
        clock.now = 1000 + tick / 10
        r = record("Unable connect to node with id %s: %s", 1, "refused")
        if throttle.filter(r):
            passed.append((clock.now - 1000, r.getMessage()))
    assert throttle.filter(record("Failed fetch messages from %s: %s", 1, "x"))  # another template: its own window
    assert not throttle.filter(record("Unable connect to node with id %s: %s", 2, "y"))
    assert throttle.filter(record("(Re-)joining group %s", "g", level=logging.INFO))  # below WARNING: never dropped
    # Then it passed at 0 s, 10 s, 30 s, 70 s (windows of 10, 20, 40, 40 s), each later one with the count
    assert [t for t, _ in passed] == pytest.approx([0, 10, 30, 70])
    assert passed[0][1] == "Unable connect to node with id 1: refused"
    assert passed[1][1] == "Unable connect to node with id 1: refused [99 more like this in 10 s not logged]"
    assert passed[2][1].endswith("[199 more like this in 20 s not logged]")
    # And after a quiet window it starts over (the one dropped since is still counted)
    clock.now += 200
    again = record("Unable connect to node with id %s: %s", 1, "refused")
    assert throttle.filter(again) and again.getMessage().endswith("[300 more like this in 230 s not logged]")
    assert not throttle.filter(record("Unable connect to node with id %s: %s", 1, "refused"))
    clock.now += 10.1
    assert throttle.filter(record("Unable connect to node with id %s: %s", 1, "refused"))


def test_librdkafka_lines_are_told_apart_by_their_facility() -> None:
    throttle = Throttle(clock=Clock())
    fail = "%s [%s] %s", "FAIL", "rdkafka#producer-1", "Connect to ipv4#127.0.0.1:9092 failed"
    assert throttle.filter(record(*fail, name="pipeline.librdkafka"))
    assert not throttle.filter(record(*fail, name="pipeline.librdkafka"))
    assert throttle.filter(record("%s [%s] %s", "SESSTMOUT", "rdkafka#consumer-2", "timed out",
                                  name="pipeline.librdkafka"))


class Watched:
    """A KafkaWatch over a fake output and probe."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.readiness = Readiness()
        self.unacked = 0
        self.waiting = 0.0
        self.reachable = True
        self.probes = 0
        self.watch = KafkaWatch(self.readiness, lambda: self.unacked, lambda: self.waiting, self.probe, self.clock)

    def probe(self) -> None:
        self.probes += 1
        if not self.reachable:
            raise RuntimeError("KafkaException(_TRANSPORT)")

    def run(self, seconds: int) -> None:
        for _ in range(seconds):
            self.clock.now += 1
            if self.waiting:
                self.waiting += 1
            asyncio.run(self.watch.tick())


def test_all_brokers_down_is_confirmed_by_a_probe_reported_with_backoff_and_ended_by_one(
        caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    caplog.set_level(logging.INFO, logger="pipeline.outage")
    # Given a client reporting all brokers down (once), and thousands of failed connections
    w.reachable = False
    w.watch.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    for _ in range(3000):
        w.watch.error_cb(KafkaError(KafkaError._TRANSPORT, "Connect failed"))
    w.unacked = 44
    # When the outage lasts 10 minutes
    w.run(1)
    assert not w.readiness.ready and w.readiness.reasons()["kafka"].startswith("unreachable for")
    w.run(599)
    assert "44 output messages unacknowledged" in w.readiness.reasons()["kafka"]
    # Then: one line when it began, then at 15 s, 30 s, 60 s ... at most every 5 min; probes backed off
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Kafka unreachable (every broker is down)")
    still = [line for line in lines if line.startswith("Kafka still unreachable")]
    assert len(still) == 5, still  # 15, 30, 60, 120, 240 s; then 540 s
    assert "3001 connection errors" in still[0]
    assert w.probes < 130  # 1 s, 2 s, 4 s, then every 5 s
    # And when the broker answers again: ready, one line
    w.reachable = True
    w.run(11)
    assert w.readiness.ready
    assert caplog.records[-1].getMessage().startswith("Kafka reachable again after 6")
    assert len(caplog.records) == 7


def test_a_short_all_brokers_down_that_a_probe_disproves_is_not_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    caplog.set_level(logging.INFO, logger="pipeline.outage")
    w.watch.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))  # an idle disconnect
    w.run(5)
    assert w.readiness.ready and not caplog.records and w.probes == 1


def test_a_flush_waiting_too_long_is_an_outage_until_it_completes(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    caplog.set_level(logging.INFO, logger="pipeline.outage")
    w.waiting, w.unacked = 1.0, 10
    w.run(int(STALL_AFTER_S) - 2)
    assert w.readiness.ready
    w.run(5)
    assert not w.readiness.ready and caplog.records[0].getMessage().startswith(
        "Kafka unreachable (the output has waited")
    w.waiting, w.unacked = 0.0, 0
    w.run(1)
    assert w.readiness.ready and caplog.records[-1].getMessage().startswith("Kafka reachable again")


def test_a_fatal_client_error_is_always_logged(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    w.watch.error_cb(KafkaError(KafkaError._FENCED, "fenced by a newer producer", fatal=True))
    assert [r.levelno for r in caplog.records] == [logging.ERROR]


def test_the_registry_being_away_is_not_a_missing_schema() -> None:
    # Given a registry nobody listens on: no answer is "unavailable", not a reason to dead-letter
    catalog = RegistryCatalog(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SchemaRegistryUnavailable) as exc:
        catalog.parsed_by_id(42)
    assert exc.value.schema_id == 42 and exc.value.cause == "ConnectError"

    class Answers:
        def __init__(self, status: int) -> None:
            self.status = status

        def get_schema(self, schema_id: int) -> Any:
            raise SchemaRegistryError(self.status, self.status * 100 + 3, "...")

    # And an error status says so too (5xx, 429, 401), except "no such schema" (404): the record's fault
    for status in (500, 503, 429, 401):
        with pytest.raises(SchemaRegistryUnavailable):
            RegistryCatalog("mock://x", client=Answers(status)).parsed_by_id(1)
    with pytest.raises(SerdeError) as missing:
        RegistryCatalog("mock://x", client=Answers(404)).parsed_by_id(1)
    assert missing.value.reason == "unknown-schema-id"


class FakeMsg:
    def __init__(self, topic: str, offset: int, value: bytes) -> None:
        self._topic, self._offset, self._value = topic, offset, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"k"


class FakeConsumer:
    """One partition of one topic; pause/resume as librdkafka's (a paused partition returns nothing)."""

    instances: list[FakeConsumer] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.queue: list[FakeMsg] = []
        self.paused: set[tuple[str, int]] = set()
        self.ever_paused = False
        self.commits: list[int] = []
        self.sync_commits = 0
        self.closed = False
        FakeConsumer.instances.append(self)

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self.topic = topics[0]
        self.on_assign, self.on_lost = on_assign, on_lost

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, 0)]

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}
        self.ever_paused = True

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def consume(self, n: int, timeout: float) -> list[FakeMsg]:
        if self.paused:
            return []
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.extend(tp.offset for tp in offsets)
        if not asynchronous:
            self.sync_commits += 1

    def close(self) -> None:
        self.closed = True


class Output:
    async def flush(self) -> None:
        return None

    def flush_blocking(self) -> None:
        return None


def fake_runtime(kafka: Any = None) -> Any:
    settings = SimpleNamespace(kafka="127.0.0.1:1", app_id="a", worker_name="w", kafka_stats_interval_ms=5000,
                               group_instance_id=lambda _consumer: None)
    return SimpleNamespace(settings=settings, output=Output(), readiness=Readiness(), kafka=kafka,
                           local_delivery=contextlib.nullcontext, stage_backlog=StageBacklog(0))


async def until(check: Any) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.005)


async def test_a_worker_stopped_while_kafka_is_unreachable_does_not_block_on_a_commit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    # Given the ingest loop with records handled but not committed, and Kafka unreachable
    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    monkeypatch.setattr(agents, "COMMIT_INTERVAL_S", 3600)
    FakeConsumer.instances.clear()
    handled: list[int] = []
    rt = fake_runtime(kafka=SimpleNamespace(unreachable=True, error_cb=None))
    task = asyncio.create_task(agents._ingest_loop(rt, {"t": ("ingest.events", None)},  # type: ignore[arg-type]
                                                   lambda _l, _d, msg: handled.append(msg.offset())))
    await until(lambda: FakeConsumer.instances)
    consumer = FakeConsumer.instances[0]
    consumer.queue = [FakeMsg("t", 0, b"x")]
    await until(lambda: handled == [0])
    # When it stops: no synchronous commit (librdkafka's would block the event loop for a session timeout)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert consumer.sync_commits == 0 and consumer.commits == []


async def test_ingest_holds_records_while_the_registry_is_away_and_handles_each_once_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    monkeypatch.setattr(agents, "REGISTRY_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(agents, "REGISTRY_RETRY_MAX_S", 0.05)
    monkeypatch.setattr(agents, "COMMIT_INTERVAL_S", 0.01)
    registry = {"up": False, "asked": 0}

    def parsed_by_id(schema_id: int) -> dict[str, Any]:
        registry["asked"] += 1
        if not registry["up"]:
            raise SchemaRegistryUnavailable(schema_id, "ConnectError")
        return {}

    handled: list[int] = []

    def handle(logical: str, decoder: Any, msg: FakeMsg) -> None:
        if msg.value() == b"new schema":
            parsed_by_id(7)
        handled.append(msg.offset())

    rt = fake_runtime()
    decoder = SimpleNamespace(codec=SimpleNamespace(catalog=SimpleNamespace(parsed_by_id=parsed_by_id)))
    FakeConsumer.instances.clear()
    task = asyncio.create_task(agents._ingest_loop(rt, {"t": ("ingest.events", decoder)}, handle))  # type: ignore[arg-type]
    try:
        await until(lambda: FakeConsumer.instances)
        consumer = FakeConsumer.instances[0]
        # Given a record with a schema the worker has not seen between two others, the registry away
        consumer.queue = [FakeMsg("t", 0, b"known"), FakeMsg("t", 1, b"new schema"), FakeMsg("t", 2, b"known")]
        # Then the one before it is handled, the rest held: not dead-lettered, not ready, consumer paused
        await until(lambda: registry["asked"] >= 3)
        assert handled == [0]
        assert "schema-registry" in rt.readiness.reasons() and consumer.paused
        consumer.queue.append(FakeMsg("t", 3, b"known"))  # arrives meanwhile: not taken while paused
        # When the registry is back: each record handled once, in order, and ingest goes on
        registry["up"] = True
        await until(lambda: handled == [0, 1, 2, 3])
        assert rt.readiness.ready and not consumer.paused and consumer.ever_paused
        await until(lambda: consumer.commits and consumer.commits[-1] == 4)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_flush_waits_for_the_broker_however_long_unless_the_worker_is_stopping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import runtime

    # Given an output producer whose broker is not there, with a message to deliver
    producer = runtime.OutputProducer(f"127.0.0.1:{free_port()}")
    producer.produce("t", b"k", b"v")
    # Then a flush waits, past the 60 s it used to give up after (its deadline is gone, scaled down here)
    monkeypatch.setattr(runtime, "STOPPING_FLUSH_S", 0.3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(producer.flush(), 1.0)
    assert producer.waiting_s() == 0  # (the cancelled flush is no longer counted as waiting)
    # And once the worker is stopping it gives up (nothing is committed: handled again after a restart)
    producer.stopping = lambda: True
    with pytest.raises(Exception, match="not acknowledged in 0.3s"):
        await producer.flush()


async def test_a_registry_back_without_the_schema_lets_the_record_be_dead_lettered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    monkeypatch.setattr(agents, "REGISTRY_RETRY_FIRST_S", 0.01)
    state = {"registry": "away"}

    def parsed_by_id(schema_id: int) -> dict[str, Any]:
        if state["registry"] == "away":
            raise SchemaRegistryUnavailable(schema_id, "ConnectError")
        raise SerdeError("unknown-schema-id", f"registry has no schema {schema_id}")

    outcomes: list[tuple[str, int]] = []

    def handle(logical: str, decoder: Any, msg: FakeMsg) -> None:  # as the real one: a SerdeError dead-letters
        try:
            parsed_by_id(7)
        except SerdeError:
            outcomes.append(("dead-lettered", msg.offset()))

    decoder = SimpleNamespace(codec=SimpleNamespace(catalog=SimpleNamespace(parsed_by_id=parsed_by_id)))
    FakeConsumer.instances.clear()
    task = asyncio.create_task(agents._ingest_loop(fake_runtime(), {"t": ("ingest.events", decoder)}, handle))  # type: ignore[arg-type]
    try:
        await until(lambda: FakeConsumer.instances)
        FakeConsumer.instances[0].queue = [FakeMsg("t", 0, b"new schema")]
        await asyncio.sleep(0.1)
        # When the registry answers again, but has no such schema: the record is dead-lettered, ingest goes on
        state["registry"] = "back"
        await until(lambda: outcomes == [("dead-lettered", 0)])
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_ingest_consumer_that_does_not_rejoin_after_its_session_expired_is_replaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    monkeypatch.setattr(agents, "REJOIN_GRACE_S", 0.2)
    FakeConsumer.instances.clear()
    kafka = SimpleNamespace(unreachable=True, error_cb=None)
    task = asyncio.create_task(agents._ingest_loop(fake_runtime(kafka), {"t": ("ingest.events", None)},  # type: ignore[arg-type]
                                                   lambda *_: None))
    try:
        await until(lambda: FakeConsumer.instances)
        first = FakeConsumer.instances[0]
        # Given a consumer whose session expired during an outage (its partitions lost)
        first.on_lost(first, [TopicPartition("t", 0)])
        await asyncio.sleep(0.4)
        assert len(FakeConsumer.instances) == 1  # Kafka still unreachable: nothing to rejoin yet
        # When Kafka is back and a new assignment comes in time: the same consumer goes on
        kafka.unreachable = False
        first.on_assign(first, [TopicPartition("t", 0)])
        await asyncio.sleep(0.4)
        assert len(FakeConsumer.instances) == 1 and not first.closed
        # And when it loses them again and no assignment comes within the grace: a new consumer replaces it
        first.on_lost(first, [TopicPartition("t", 0)])
        await until(lambda: len(FakeConsumer.instances) == 2)
        assert first.closed and not FakeConsumer.instances[1].closed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
