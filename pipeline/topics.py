"""The topic registry: topics.yaml loaded once, with each topic's codec; `apply` provisions them safely.

Code names topics by their logical name (e.g. "ingest.events"); the physical name is the prefix
(PIPELINE_TOPIC_PREFIX, so tests and tenants get their own topics) plus the declared name.

Durability comes from topics.yaml (`replication_factor`, `min_insync_replicas`, per topic or in `defaults`),
overridable for every topic by the environment: PIPELINE_REPLICATION_FACTOR and PIPELINE_MIN_INSYNC_REPLICAS
(e.g. 1 and 1 on a single development broker). Faust's own topics and the runner's dead-letter topic take
the same values. The environment is read by `pipeline.settings` (`Settings.topic_registry`, `load_topics`),
which passes prefix, overrides and Schema Registry catalog to `TopicRegistry.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.connection import Kafka, check_cluster, client_config, connection
from pipeline.errors import TopicPlanError, UnknownNameError
from pipeline.resources import TOPICS_FILE
from pipeline.serde.codecs import Codec, codec_from_spec
from pipeline.yamlconf import compose_file

if TYPE_CHECKING:
    from pipeline.serde.avro import SchemaCatalog

_REQUIRED = {"name", "partitions", "codec"}
_KEYS = {"name", "partitions", "replication_factor", "min_insync_replicas", "cleanup_policy", "retention_ms",
         "max_compaction_lag_ms", "codec", "description"}
_DEFAULT_KEYS = {"replication_factor", "min_insync_replicas", "cleanup_policy", "retention_ms", "max_compaction_lag_ms"}
# On a compacted topic, how long a superseded record or a tombstone's predecessor may stay before the cleaner
# must compact it (Kafka's default is unbounded): erasure (pipeline.privacy) must be complete within 30 days.
DEFAULT_MAX_COMPACTION_LAG_MS = 7 * 24 * 3600 * 1000
REPLICATION_ENV, MIN_INSYNC_ENV = "PIPELINE_REPLICATION_FACTOR", "PIPELINE_MIN_INSYNC_REPLICAS"
# A topics file that declares neither, per topic nor in `defaults`, gets Kafka's own broker defaults.
KAFKA_DEFAULT_REPLICATION = KAFKA_DEFAULT_MIN_INSYNC = 1
_CLEANUP = ("delete", "compact", "compact,delete")


@dataclass(frozen=True)
class TopicSpec:
    logical: str
    name: str  # physical, prefix included
    partitions: int
    replication_factor: int
    min_insync_replicas: int
    cleanup_policy: str
    retention_ms: int
    codec_spec: str
    description: str
    max_compaction_lag_ms: int = DEFAULT_MAX_COMPACTION_LAG_MS
    catalog: SchemaCatalog | None = field(default=None, compare=False, repr=False)  # None: the embedded one

    @cached_property
    def codec(self) -> Codec:
        return codec_from_spec(self.codec_spec, topic=self.name, catalog=self.catalog)

    def config(self) -> dict[str, str]:
        config = {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms),
                  "min.insync.replicas": str(self.min_insync_replicas)}
        if "compact" in self.cleanup_policy:  # the active segment rolls then too, so the bound holds for it
            config["max.compaction.lag.ms"] = str(self.max_compaction_lag_ms)
        return config


class TopicRegistry:
    """Every topic of the pipeline by logical name."""

    def __init__(self, specs: dict[str, TopicSpec], replication_factor: int = KAFKA_DEFAULT_REPLICATION,
                 min_insync_replicas: int = KAFKA_DEFAULT_MIN_INSYNC) -> None:
        self._specs = specs
        # the defaults (after the environment's overrides), for topics declared elsewhere (Faust's own)
        self.replication_factor = replication_factor
        self.min_insync_replicas = min_insync_replicas

    @classmethod
    def load(cls, path: Path = TOPICS_FILE, prefix: str = "", *, replication_factor: int | None = None,
             min_insync_replicas: int | None = None, catalog: SchemaCatalog | None = None) -> TopicRegistry:
        """Parse topics.yaml; ConfigError names the file, line and problem. `replication_factor` and
        `min_insync_replicas` override every topic's (PIPELINE_REPLICATION_FACTOR / PIPELINE_MIN_INSYNC_REPLICAS,
        read by pipeline.settings); `catalog` resolves the Avro codecs' schemas (None: the embedded one)."""
        rf_env, isr_env = replication_factor, min_insync_replicas
        doc, root = compose_file(path)
        top = doc.mapping(root, "topics.yaml")
        doc.check_keys(top, "topics.yaml", {"topics"}, {"defaults"}, root)
        defaults: dict[str, Any] = {}
        if "defaults" in top:
            dnode = top["defaults"][1]
            for key, (_, vnode) in doc.mapping(dnode, "defaults").items():
                if key not in _DEFAULT_KEYS:
                    raise doc.error(f"defaults: unknown key {key!r}; valid: {', '.join(sorted(_DEFAULT_KEYS))}",
                                    vnode)
                defaults[key] = vnode
        specs: dict[str, TopicSpec] = {}
        partition_nodes: dict[str, Any] = {}
        for logical, (knode, body) in doc.mapping(top["topics"][1], "topics").items():
            what = f"topic {logical!r}"
            fields = doc.mapping(body, what)
            doc.check_keys(fields, what, _REQUIRED, _KEYS - _REQUIRED, knode)
            merged = {**defaults, **{k: v for k, (_, v) in fields.items()}}
            cleanup = doc.string(merged["cleanup_policy"], f"{what}: cleanup_policy") \
                if "cleanup_policy" in merged else "delete"
            if cleanup not in _CLEANUP:
                raise doc.error(f"{what}: cleanup_policy must be one of {', '.join(_CLEANUP)}",
                                merged["cleanup_policy"])
            retention = merged.get("retention_ms")
            rf = rf_env or (doc.integer(merged["replication_factor"], f"{what}: replication_factor", minimum=1)
                            if "replication_factor" in merged else KAFKA_DEFAULT_REPLICATION)
            isr = isr_env or (doc.integer(merged["min_insync_replicas"], f"{what}: min_insync_replicas",
                                          minimum=1) if "min_insync_replicas" in merged else KAFKA_DEFAULT_MIN_INSYNC)
            if isr > rf:  # every produce with acks=all would fail: NOT_ENOUGH_REPLICAS
                where = merged.get("min_insync_replicas") if isr_env is None else None
                message = (f"{what}: min_insync_replicas {isr} is more than its replication_factor {rf}"
                           + (f" ({REPLICATION_ENV}/{MIN_INSYNC_ENV} from the environment)"
                              if rf_env or isr_env else ""))
                raise doc.error(message, where)
            partition_nodes[logical] = fields["partitions"][1]
            specs[logical] = TopicSpec(
                logical=logical,
                name=prefix + doc.string(fields["name"][1], f"{what}: name"),
                partitions=doc.integer(fields["partitions"][1], f"{what}: partitions", minimum=1),
                replication_factor=rf,
                min_insync_replicas=isr,
                cleanup_policy=cleanup,
                retention_ms=doc.integer(retention, f"{what}: retention_ms", minimum=-1)
                if retention is not None else 604800000,
                codec_spec=doc.string(fields["codec"][1], f"{what}: codec"),
                description=doc.string(fields["description"][1], f"{what}: description")
                if "description" in fields else "",
                max_compaction_lag_ms=doc.integer(merged["max_compaction_lag_ms"], f"{what}: max_compaction_lag_ms",
                                                  minimum=1) if "max_compaction_lag_ms" in merged
                else DEFAULT_MAX_COMPACTION_LAG_MS,
                catalog=catalog,
            )
        rf_default = rf_env or (doc.integer(defaults["replication_factor"], "defaults: replication_factor", minimum=1)
                                if "replication_factor" in defaults else KAFKA_DEFAULT_REPLICATION)
        isr_default = isr_env or (doc.integer(defaults["min_insync_replicas"], "defaults: min_insync_replicas",
                                              minimum=1) if "min_insync_replicas" in defaults
                                  else KAFKA_DEFAULT_MIN_INSYNC)
        for group in COPARTITIONED:  # a stage topic's partition p is consumed where its table's partition p is held
            present = [t for t in group if t in specs]
            if len({specs[t].partitions for t in present}) > 1:
                first, odd = present[0], next(t for t in present if specs[t].partitions != specs[present[0]].partitions)
                raise doc.error(f"topic {odd!r}: partitions must equal {first!r}'s ({specs[first].partitions}): "
                                f"{', '.join(present)} are co-partitioned", partition_nodes[odd])
        return cls(specs, rf_default, min(isr_default, rf_default))

    def __getitem__(self, logical: str) -> TopicSpec:
        try:
            return self._specs[logical]
        except KeyError:
            raise UnknownNameError("topic", logical, self._specs) from None

    def name(self, logical: str) -> str:
        return self[logical].name

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._specs.values())

    def by_physical(self, name: str) -> TopicSpec:
        for spec in self._specs.values():
            if spec.name == name or spec.logical == name:
                return spec
        raise UnknownNameError("topic", name, [s.logical for s in self._specs.values()])


# Every logical topic name, once (tests/test_topics.py checks each is declared in topics.yaml): code names a
# topic through these constants, never by spelling it.
INGEST_EVENTS = "ingest.events"
INGEST_PROFILES = "ingest.profiles"
INGEST_DLQ = "ingest.dlq"
IDENTITY_TOPIC = "internal.identity"  # identity-stage messages (pipeline.stages.messages), keyed by identity
PROFILE_TOPIC = "internal.profile-ops"  # profile-stage messages, keyed by profile id
INTERNAL_DLQ = "internal.dlq"
IDENTITY_CHANGELOG = "state.identity-changelog"
PROFILES_CHANGELOG = "state.profiles-changelog"
CONTROL_SEGMENTS = "control.segments"
ERASURE_TOPIC = "control.erasure"
AUDIENCES_TOPIC = "control.audiences"  # the console's saved segments.yaml, followed by every worker
MEMBERSHIP_TOPIC = "activation.memberships"
MEMBERSHIP_STATE_TOPIC = "activation.membership-state"
PROFILE_CHANGES_TOPIC = "activation.profile-changes"
DEST_DLQ = "activation.dest-dlq"
RECEIPTS_TOPIC = "activation.receipts"  # destinations' acknowledgements of membership changes, keyed by profile id
DEST_STATE = "activation.dest-state"
DLQ_REPLAYS = "control.dlq-replays"
LOGICAL_TOPICS = (INGEST_EVENTS, INGEST_PROFILES, INGEST_DLQ, DLQ_REPLAYS, IDENTITY_TOPIC, PROFILE_TOPIC, INTERNAL_DLQ,
                  IDENTITY_CHANGELOG, PROFILES_CHANGELOG, CONTROL_SEGMENTS, ERASURE_TOPIC, AUDIENCES_TOPIC,
                  MEMBERSHIP_TOPIC, MEMBERSHIP_STATE_TOPIC, PROFILE_CHANGES_TOPIC, DEST_DLQ, DEST_STATE, RECEIPTS_TOPIC)
# Topics whose partition p is read where a table's partition p is held (pipeline.stages.agents): as many
# partitions each.
COPARTITIONED = ((IDENTITY_TOPIC, IDENTITY_CHANGELOG), (PROFILE_TOPIC, PROFILES_CHANGELOG, RECEIPTS_TOPIC))
STAGE_TOPICS = frozenset({IDENTITY_TOPIC, PROFILE_TOPIC})  # the stitching stages' own topics

STRIMZI_API_VERSION = "kafka.strimzi.io/v1beta2"


def strimzi_topics(reg: TopicRegistry, cluster: str) -> list[dict[str, Any]]:
    """Every declared topic as a Strimzi `KafkaTopic` of the Kafka cluster `cluster` (the Topic Operator then
    creates it with its partitions, replicas and config): topics.yaml stays the one source of topics."""
    out: list[dict[str, Any]] = []
    for spec in sorted(reg, key=lambda s: s.logical):
        # a Kubernetes name: lowercase letters, digits, '-' and '.'; `topicName` keeps the real one
        name = "".join(c if c.isalnum() or c in "-." else "-" for c in spec.name.lower()).strip("-.")
        out.append({"apiVersion": STRIMZI_API_VERSION, "kind": "KafkaTopic",
                    "metadata": {"name": name, "labels": {"strimzi.io/cluster": cluster},
                                 "annotations": {"cdp-pipeline/description": spec.description}},
                    "spec": {"topicName": spec.name, "partitions": spec.partitions,
                             "replicas": spec.replication_factor, "config": spec.config()}})
    return out


@dataclass(frozen=True)
class PlanItem:
    action: str  # create | update-config | add-partitions | replication (reported, not applied) | ok
    topic: TopicSpec
    detail: str


def plan(reg: TopicRegistry, admin: Any) -> list[PlanItem]:
    """Compare the declared topics with the cluster; raise TopicPlanError for unsafe or impossible changes."""
    from confluent_kafka.admin import ConfigResource

    md = admin.list_topics(timeout=5)  # a reachable cluster answers in well under a second
    brokers = len(md.brokers)
    too_wide = [s for s in reg if s.replication_factor > brokers]
    if too_wide:
        spec = too_wide[0]
        raise TopicPlanError(
            f"topic {spec.logical} asks for replication factor {spec.replication_factor} and the cluster has "
            f"{brokers} broker(s). On a development cluster set {REPLICATION_ENV}={brokers} and "
            f"{MIN_INSYNC_ENV}=1; in production add brokers.")
    items: list[PlanItem] = []
    for spec in reg:
        existing = md.topics.get(spec.name)
        if existing is None or existing.error is not None:
            items.append(PlanItem("create", spec, f"{spec.partitions} partitions, {spec.cleanup_policy}, "
                                                  f"replication {spec.replication_factor}, "
                                                  f"min.insync {spec.min_insync_replicas}"))
            continue
        replicas = min(len(pm.replicas) for pm in existing.partitions.values())
        if replicas != spec.replication_factor:  # Kafka changes it only by reassigning replicas
            items.append(PlanItem("replication", spec, f"{replicas} replicas, topics.yaml asks for "
                                  f"{spec.replication_factor}: not changed here; reassign the partitions "
                                  "(kafka-reassign-partitions.sh)"))
        have = len(existing.partitions)
        if have > spec.partitions:
            raise TopicPlanError(
                f"topic {spec.logical} ({spec.name}) has {have} partitions and topics.yaml asks for "
                f"{spec.partitions}: Kafka cannot shrink partitions (and re-keying would break per-key order). "
                "Raise it back in topics.yaml, or create a new topic and migrate.")
        if have < spec.partitions:
            items.append(PlanItem("add-partitions", spec, f"{have} -> {spec.partitions} (keys will re-hash)"))
        res = ConfigResource("topic", spec.name)
        current = admin.describe_configs([res])[res].result()
        diffs = {k: v for k, v in spec.config().items() if current.get(k) is None or current[k].value != v}
        if diffs:
            items.append(PlanItem("update-config", spec, ", ".join(f"{k}={v}" for k, v in diffs.items())))
        elif have == spec.partitions:
            items.append(PlanItem("ok", spec, "up to date"))
    return items


def apply(reg: TopicRegistry, kafka: Kafka, *, dry_run: bool = False, out: Any = print) -> list[PlanItem]:
    """Create or update every declared topic idempotently; print the plan; refuse unsafe changes.

    0. check the connection (refused credentials, or no cluster within 5 s, raise);
    1. plan (raises on shrinking); 2. print it; 3. create missing topics; 4. add partitions;
    5. alter configs (incremental, so unrelated settings stay).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        NewPartitions,
        NewTopic,
    )

    check_cluster(kafka, wait_s=5)
    admin = AdminClient(client_config(kafka))
    try:
        items = plan(reg, admin)
    except KafkaException as exc:  # the plan compares with the cluster: without one there is no plan
        raise TopicPlanError(f"cannot read the topics of the Kafka cluster at {connection(kafka).describe()}: "
                             f"{exc.args[0].str()}") from exc
    for it in items:
        out(f"{it.action:15} {it.topic.name:45} {it.detail}")
    if dry_run:
        return items
    creates = [NewTopic(i.topic.name, i.topic.partitions, i.topic.replication_factor, config=i.topic.config())
               for i in items if i.action == "create"]
    if creates:
        for name, fut in admin.create_topics(creates, operation_timeout=30).items():
            try:
                fut.result()
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise TopicPlanError(f"creating {name} failed: {exc}") from exc
    adds = [NewPartitions(i.topic.name, i.topic.partitions) for i in items if i.action == "add-partitions"]
    if adds:
        for name, fut in admin.create_partitions(adds).items():
            try:
                fut.result()
            except Exception as exc:
                raise TopicPlanError(f"adding partitions to {name} failed: {exc}") from exc
    for it in items:
        if it.action != "update-config":
            continue
        res = ConfigResource("topic", it.topic.name, incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in it.topic.config().items()])
        for _, fut in admin.incremental_alter_configs([res]).items():
            fut.result()
    return items
