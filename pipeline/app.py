"""Builds the Faust worker app: topics from the registry, RocksDB tables with declared changelogs, agents."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import faust

from pipeline.api.server import Authenticator, faust_web_settings, load_authenticator
from pipeline.connection import KafkaConnection, client_config
from pipeline.observability import memory, metrics
from pipeline.observability.kafka_stats import LibrdkafkaStats
from pipeline.observability.logs import throttle_library_loggers
from pipeline.observability.readiness import Assignment, Readiness
from pipeline.outage import KafkaWatch
from pipeline.privacy.erasure import salt_of
from pipeline.privacy.log import ErasureLog
from pipeline.profiles.ops import ProfileProcessor
from pipeline.runtime import (
    ROCKSDB_CACHE_BYTES,
    ROCKSDB_MEMTABLE_BYTES,
    ROCKSDB_OPTIONS,
    TABLE_CACHE,
    OutputProducer,
    Runtime,
)
from pipeline.segments import SegmentEngine
from pipeline.segments.follow import DefinitionsSync
from pipeline.settings import PipelineConfig, Settings
from pipeline.stages.agents import StageConsumer
from pipeline.stages.backlog import StageBacklog
from pipeline.state.faust_compat import (
    PromptTableManager,
    SharedRocksDBMemory,
    close_revoked_partitions,
    set_web_timeouts,
    static_membership_supported,
    tolerate_stale_url_on_static_rejoin,
)
from pipeline.state.tables import ChangelogRouter, PartitionedTable
from pipeline.topics import (
    IDENTITY_CHANGELOG,
    IDENTITY_TOPIC,
    PROFILE_TOPIC,
    PROFILES_CHANGELOG,
    TopicRegistry,
)


def build_app(settings: Settings, config: PipelineConfig | None = None,
              registry: TopicRegistry | None = None, auth: Authenticator | None = None) -> Runtime:
    """1. load config, topics and API keys; 2. create the app; 3. declare tables; 4. register each area's
    agents and the API."""
    config = config or PipelineConfig.load(settings.config_dir)
    auth = auth or load_authenticator(settings)
    registry = registry or settings.topic_registry()
    ops_partitions = registry[PROFILE_TOPIC].partitions
    (settings.data_dir / settings.worker_name).mkdir(parents=True, exist_ok=True)
    shorten_fetch_wait()
    faust_instance_id = settings.group_instance_id()
    if faust_instance_id and not static_membership_supported():
        logging.getLogger(__name__).warning("this faust-streaming/aiokafka cannot join as a static member: "
                                            "Faust's consumer group stays dynamic")
        faust_instance_id = None
    if faust_instance_id:
        tolerate_stale_url_on_static_rejoin()
    app = faust.App(
        settings.app_id,
        broker=settings.kafka.faust_brokers(),
        broker_credentials=settings.kafka.faust_credentials(),
        store="rocksdb://",
        datadir=str(settings.data_dir / settings.worker_name),
        topic_partitions=ops_partitions,
        topic_replication_factor=registry.replication_factor,  # Faust's own (leader) topic
        topic_allow_declare=True,  # only for faust's own leader topic; ours come from topics.yaml (internal=False)
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        # static membership (KIP-345, see Settings.static_membership): a worker restarted after a crash gets
        # its partitions back at once, not after the dead member's session timeout (broker_session_timeout)
        consumer_group_instance_id=faust_instance_id,
        producer_acks=-1,
        producer_linger_ms=2,
        # commit on the interval only: Faust's every-N commit runs inside its fetch loop and would stall
        # fetching while the output producer is flushed
        broker_commit_every=1_000_000,
        broker_commit_interval=1.0,
        stream_wait_empty=True,  # finish buffered events before a rebalance: no zombie table writes
        broker_max_poll_records=2000,
        stream_buffer_maxsize=16384,
        web_enabled=True,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        canonical_url=settings.advertised_url,  # the URL other workers route lookups to (pipeline.api.routing)
        web_in_thread=False,
        **faust_web_settings(settings, auth),  # Faust's own pages off, the API's guard, limits, TLS
        logging_config=None,
        TableManager=PromptTableManager,  # ready 1 s sooner: no grace for tables declared after the start
    )
    set_web_timeouts(app, settings.web_read_timeout_s)
    history_ms = config.profile.datasets.event_history.retention_ms
    engine = SegmentEngine(config.audiences, history_retention_ms=history_ms)
    processor = ProfileProcessor(config.profile, engine, time.time)
    readiness = Readiness(STARTING)
    output = OutputProducer(settings.kafka, frozenset(registry.name(t) for t in settings.fault_lose_output),
                            error_cb=lambda err: kafka.error_cb(err),
                            extra=LibrdkafkaStats("output").config(settings.kafka_stats_interval_ms))
    kafka = KafkaWatch(readiness, lambda: output.produced - output.acknowledged, output.waiting_s, output.probe)
    output.stopping = lambda: bool(app.should_stop)
    metrics.OUTPUT_UNACKNOWLEDGED.set_function(lambda: output.produced - output.acknowledged)
    salt = salt_of(settings.erasure_salt, settings.app_id)
    processor.erasure_salt = salt
    rt = Runtime(settings, config, registry, app, engine, processor, output, readiness=readiness, kafka=kafka,
                 erasure_log=ErasureLog(salt), stage_backlog=StageBacklog(settings.stage_backlog_max),
                 definitions=DefinitionsSync(settings.config_dir / "segments.yaml", settings.worker_name,
                                             settings.audiences_writable))
    metrics.STAGE_BACKLOG.set_function(rt.stage_backlog.behind)

    @app.task
    async def drop_monitor() -> None:
        """Faust's Monitor keeps per-message statistics we export through Prometheus instead."""
        if any(s is app.monitor for s in app.sensors):
            app.sensors.remove(app.monitor)

    @app.task
    async def watch_kafka() -> None:
        """The outage watch's probes and reports (pipeline.outage), every second; by now every client library
        has created its loggers, so their repeated lines are throttled from here on."""
        throttle_library_loggers()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            await kafka.tick()

    @app.task
    async def follow_definitions() -> None:
        """A console save on any worker reaches this worker's segments.yaml (when writable here); the hot
        reload (pipeline/profiles/timers.py) applies it."""
        assert rt.definitions is not None
        rt.definitions.follow(registry, settings.kafka, error_cb=kafka.error_cb)

    app.on_before_shutdown.connect(lambda *_a, **_k: rt.definitions.stop() if rt.definitions else None)
    ready_after_recovery(app, readiness, lambda: stage_assignment(rt))

    @app.task
    async def watch_group() -> None:
        await watch_recovery(rt)

    changelogs = ChangelogRouter(rt.output.produce)
    rt.output.on_flushed.append(changelogs.persist_offsets)
    _flush_output_before_commit(app, rt.output)
    if settings.leave_group_on_stop:
        leave_groups_on_stop(app, settings.kafka, static_members(settings, faust_instance_id))
    rocksdb_memory = SharedRocksDBMemory(ROCKSDB_CACHE_BYTES, ROCKSDB_MEMTABLE_BYTES)
    for logical, table in ((IDENTITY_CHANGELOG, "identity"), (PROFILES_CHANGELOG, "profiles")):
        spec = registry[logical]
        rt.tables[table] = app.Table(
            table, partitions=spec.partitions, key_type=bytes, value_type=bytes,  # bytes => raw serde
            options=dict(ROCKSDB_OPTIONS),
            changelog_topic=app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                                      value_serializer="raw", partitions=spec.partitions, internal=False))
        changelogs.route(rt.tables[table])
        rocksdb_memory.share(rt.tables[table].data)
        rt.ptables[table] = PartitionedTable(rt.tables[table], spec.partitions, *TABLE_CACHE[table])
        rt.caches[f"{table}-table"] = rt.ptables[table].cache
        release: Callable[[int], None] = rt.ptables[table].release
        if table == "profiles":  # its next owner counts the partition's audience members
            release = _also(release, rt.audience_sizes.drop)
        close_revoked_partitions(rt.tables[table], release)  # reopened when reassigned

    from pipeline.api import console as api_console
    from pipeline.api import destinations as api_destinations
    from pipeline.api import privacy as api_privacy
    from pipeline.api import routes as api_routes
    from pipeline.identity import agents as identity_agents
    from pipeline.ingest import agents as ingest_agents
    from pipeline.privacy import agents as privacy_agents
    from pipeline.profiles import agents as profile_agents

    privacy_agents.register(rt)
    ingest_agents.register(rt)
    stages = StageConsumer(rt, [identity_agents.register(rt), *profile_agents.register(rt)])

    @app.task
    async def consume_stages() -> None:
        await stages.run()

    async def release_stages(*_a: Any, **_k: Any) -> None:
        """Faust awaits this in its revocation: the stage offsets are committed before the group moves on."""
        await stages.on_revoked()

    app.on_partitions_revoked.connect(release_stages)
    api_console.register(rt, api_routes.register(rt))
    api_privacy.register(rt)
    api_destinations.register(rt)
    memory.register(rt)
    throttle_library_loggers()
    return rt


WATCH_INTERVAL_S = 1.0

# Not ready until Faust has assigned partitions and recovered the tables, and the ingest consumer is in its group.
STARTING = {"partitions": "waiting for partitions and table recovery",
            "ingest": "the ingest consumer has not joined its group yet"}
REBALANCING = "partitions being reassigned, tables recovering"


def ready_after_recovery(app: faust.App, readiness: Readiness,
                         assignment: Callable[[], Assignment] | None = None) -> None:
    """`partitions` keeps the worker not ready from a rebalance's start until Faust has recovered the tables of
    its new partitions and resumed its streams (`on_rebalance_end`); then `assignment()` is what it recovered
    (GET /readyz shows it)."""
    start, end = app.on_rebalance_start, app.on_rebalance_end

    def on_rebalance_start() -> None:
        readiness.set("partitions", REBALANCING)
        metrics.REBALANCES.labels(app.conf.id).inc()
        start()

    def on_rebalance_end() -> None:
        end()
        if assignment is not None:
            readiness.assignment = assignment()
        readiness.clear("partitions")

    app.on_rebalance_start = on_rebalance_start  # type: ignore[method-assign]
    app.on_rebalance_end = on_rebalance_end  # type: ignore[method-assign]


def stage_assignment(rt: Runtime) -> Assignment:
    """Faust's current generation and this worker's stage partitions in it (those of its recovered tables), by
    logical topic."""
    partitions = {IDENTITY_TOPIC: sorted(rt.ptables["identity"].active()),
                  PROFILE_TOPIC: sorted(rt.ptables["profiles"].active())}
    return Assignment(int(rt.app.consumer_generation_id or 0), partitions)


async def watch_recovery(rt: Runtime) -> None:
    """Every statistics interval, `cdp_table_recovery_remaining`: the changelog records recovery has left to
    replay. (The stage partitions' lag is the stage consumer's, from its librdkafka statistics.)"""
    while True:
        await asyncio.sleep(rt.settings.kafka_stats_interval_ms / 1000)
        recovery = rt.app.tables.recovery  # type: ignore[attr-defined]
        metrics.TABLE_RECOVERY_REMAINING.set(recovery.active_remaining_total() if recovery.in_recovery else 0)


def _also(first: Callable[[int], None], then: Callable[[int], None]) -> Callable[[int], None]:
    def both(partition: int) -> None:
        first(partition)
        then(partition)

    return both


FETCH_MAX_WAIT_MS = 50


def shorten_fetch_wait(ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Faust hard-codes the consumer's fetch.max.wait at 1.5 s. aiokafka sends one fetch per broker at a
    time, so a fetch that only covers quiet partitions holds back the busy ones for that long: measured as
    ~1 s stalls with a backlog waiting. A short wait costs a few empty fetches per second when idle."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_cdp_fetch_wait", None) == ms:
        return
    create = getattr(cls, "_cdp_create_worker_consumer", cls._create_worker_consumer)

    def _create_worker_consumer(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumer = create(self, *args, **kwargs)
        consumer._fetch_max_wait_ms = ms
        return consumer

    cls._cdp_create_worker_consumer = create  # type: ignore[attr-defined]
    cls._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
    cls._cdp_fetch_wait = ms  # type: ignore[attr-defined]


def static_members(settings: Settings, faust_instance_id: str | None) -> list[tuple[str, str]]:
    """(group, group.instance.id) of this worker's static consumers: Faust's and the ingest one."""
    from pipeline.ingest.agents import ingest_group

    members = [(settings.app_id, faust_instance_id),
               (ingest_group(settings.app_id), settings.group_instance_id("ingest"))]
    return [(group, instance) for group, instance in members if instance]


LEAVE_TIMEOUT_S = 10.0


def leave_groups_on_stop(app: faust.App, kafka: KafkaConnection, members: list[tuple[str, str]]) -> None:
    """On a graceful stop, the worker's static members leave their groups once its consumers are closed.

    The trade-off of static membership (KIP-345): a static member never sends a LeaveGroup when it closes
    (librdkafka skips it on close, aiokafka on stop, whatever the protocol version), so after a SIGTERM its
    partitions would wait for its session to expire (45 s ingest, 60 s Faust) unless the same worker comes
    back. Kafka's answer (KIP-1092, the Java client's `CloseOptions`) is not in librdkafka or aiokafka, so:
    1. a SIGKILL (crash, OOM): nobody leaves, and the worker restarted under the same name takes its member
       over at once, with its partitions, without a rebalance: the fast restart;
    2. a graceful stop (SIGTERM: scale-down, deploy): after the consumers are closed (Faust stops the app's
       consumer, then its tasks, among them the ingest loop, then calls `on_shutdown`), each static member is
       removed from its group as a dynamic one leaves: the others take its partitions over at once (fast
       scale-down), and the same worker starting again joins as a new member (a rebalance, no wait).
    Off with PIPELINE_LEAVE_GROUP_ON_STOP=0 (a rolling restart then moves no partition, but a worker that
    does not come back holds its partitions for the session timeout)."""
    if not members:
        return
    on_shutdown = app.on_shutdown

    async def shutdown_and_leave() -> None:
        await on_shutdown()
        try:
            await asyncio.wait_for(leave_groups(kafka, members), LEAVE_TIMEOUT_S)
        except Exception as exc:  # the session timeout removes them anyway
            logging.getLogger(__name__).warning("static members not removed from their groups: %r", exc)

    app.on_shutdown = shutdown_and_leave  # type: ignore[method-assign]


async def leave_groups(kafka: KafkaConnection, members: Iterable[tuple[str, str]]) -> list[str]:
    """Remove each (group, group.instance.id) member from its group: what a dynamic member's LeaveGroup on
    close does. Finds the member id the instance joined with (DescribeGroups), then sends a LeaveGroup for
    that member id (the broker removes a static member that way too). Returns the groups left."""
    from aiokafka.client import AIOKafkaClient, CoordinationType
    from aiokafka.errors import for_code
    from aiokafka.protocol.group import LeaveGroupRequest
    from confluent_kafka.admin import AdminClient

    log = logging.getLogger(__name__)
    wanted = dict(members)

    def describe() -> dict[str, str]:
        admin = AdminClient(client_config(kafka))
        found = {}
        for group, future in admin.describe_consumer_groups(list(wanted), request_timeout=5).items():
            for m in future.result().members:
                if m.group_instance_id == wanted[group]:
                    found[group] = m.member_id
        return found

    found = await asyncio.to_thread(describe)
    if not found:
        return []
    client = AIOKafkaClient(**kafka.aiokafka(), request_timeout_ms=5000)
    left = []
    try:
        await client.bootstrap()
        for group, member_id in found.items():
            node = await client.coordinator_lookup(CoordinationType.GROUP, group)
            response = await client.send(node, LeaveGroupRequest(group, member_id))
            error = for_code(response.error_code)
            if error.errno == 0:
                left.append(group)
                log.info("left consumer group %s (static member %s)", group, wanted[group])
            else:  # e.g. UnknownMemberId: a worker with the same name replaced it meanwhile
                log.warning("static member %s not removed from %s: %s", wanted[group], group, error.__name__)
    finally:
        await client.close()
    return left


def _flush_output_before_commit(app: faust.App, output: OutputProducer) -> None:
    """Faust awaits `app.producer.flush()` before committing consumed offsets; chain ours into it:
    1. Faust's own producer; 2. the output producer (agent output and table changelogs; its `on_flushed`
    records the acknowledged changelog offsets in the stores)."""
    producer = app.producer
    faust_flush = producer.flush

    async def flush() -> None:
        await faust_flush()
        await output.flush()

    producer.flush = flush  # type: ignore[method-assign]
