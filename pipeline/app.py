"""Builds the Faust worker app: topics from the registry, RocksDB tables with declared changelogs, agents."""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

from pipeline.profiles.ops import ProfileProcessor
from pipeline.runtime import ROCKSDB_OPTIONS, TABLE_CACHE, OutputProducer, Runtime
from pipeline.segments import SegmentEngine
from pipeline.settings import PipelineConfig, Settings
from pipeline.state.faust_compat import close_revoked_partitions
from pipeline.state.tables import ChangelogRouter, PartitionedTable
from pipeline.topics import TopicRegistry


def build_app(settings: Settings, config: PipelineConfig | None = None,
              registry: TopicRegistry | None = None) -> Runtime:
    """1. load config and topics; 2. create the app; 3. declare tables; 4. register each area's agents."""
    config = config or PipelineConfig.load(settings.config_dir)
    registry = registry or TopicRegistry.load(prefix=settings.topic_prefix)
    ops_partitions = registry["internal.profile-ops"].partitions
    (settings.data_dir / settings.worker_name).mkdir(parents=True, exist_ok=True)
    shorten_fetch_wait()
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        store="rocksdb://",
        datadir=str(settings.data_dir / settings.worker_name),
        topic_partitions=ops_partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,  # only for faust's own leader topic; ours come from topics.yaml (internal=False)
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
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
        web_bind="127.0.0.1",
        web_port=settings.web_port,
        web_in_thread=False,
        logging_config=None,
    )
    history_ms = config.profile.datasets.event_history.retention_ms
    engine = SegmentEngine(config.audiences, history_retention_ms=history_ms)
    processor = ProfileProcessor(config.profile, engine, time.time)
    rt = Runtime(settings, config, registry, app, engine, processor, OutputProducer(settings.bootstrap))

    @app.task
    async def drop_monitor() -> None:
        """Faust's Monitor keeps per-message statistics we export through Prometheus instead."""
        if any(s is app.monitor for s in app.sensors):
            app.sensors.remove(app.monitor)

    changelogs = ChangelogRouter(rt.output.produce)
    rt.output.on_flushed.append(changelogs.persist_offsets)
    _flush_output_before_commit(app, rt.output)
    for logical, table in (("state.identity-changelog", "identity"), ("state.profiles-changelog", "profiles")):
        spec = registry[logical]
        rt.tables[table] = app.Table(
            table, partitions=spec.partitions, key_type=bytes, value_type=bytes,  # bytes => raw serde
            options=dict(ROCKSDB_OPTIONS),
            changelog_topic=app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                                      value_serializer="raw", partitions=spec.partitions, internal=False))
        changelogs.route(rt.tables[table])
        rt.ptables[table] = PartitionedTable(rt.tables[table], spec.partitions, cache_size=TABLE_CACHE[table])
        close_revoked_partitions(rt.tables[table], rt.ptables[table].release)  # reopened when reassigned

    from pipeline.api import routes as api_routes
    from pipeline.identity import agents as identity_agents
    from pipeline.ingest import agents as ingest_agents
    from pipeline.profiles import agents as profile_agents

    ingest_agents.register(rt)
    identity_agents.register(rt)
    profile_agents.register(rt)
    api_routes.register(rt)
    return rt


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


# The topics the worker's consumer group reads (changelogs are read by Faust's recovery, not the group).
GROUP_TOPICS = ("internal.identity", "internal.profile-ops")  # ingest topics: their own librdkafka group


def init_group_offsets(settings: Settings, registry: TopicRegistry) -> int:
    """A brand-new consumer group gets offset 0 committed for every partition without a commit.

    Positions then always come from committed offsets, so a rebalance while the first workers start can never
    leave a partition positioned past records produced in the meantime. Only done while the group has no
    members (Kafka refuses to alter an active group's offsets; its members commit as they go).
    Returns the number of partitions initialised."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    group = settings.app_id
    try:
        if admin.describe_consumer_groups([group])[group].result().members:
            return 0
        wanted = [TopicPartition(registry.name(t), p) for t in GROUP_TOPICS for p in range(registry[t].partitions)]
        current = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, wanted)])[group].result()
        missing = [TopicPartition(tp.topic, tp.partition, 0) for tp in current.topic_partitions if tp.offset < 0]
        if missing:
            admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, missing)])[group].result()
        return len(missing)
    except KafkaException as exc:  # another worker joined first: the group's members own the offsets now
        logging.getLogger(__name__).info("consumer group offsets not initialised: %s", exc)
        return 0
