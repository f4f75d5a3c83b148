"""Runtime settings from the environment (and CLI flags), plus the worker's configuration folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.connection import KafkaConnection
from pipeline.errors import ConfigError
from pipeline.identity.datasets import load_datasets_config
from pipeline.identity.namespaces import load_identity_config
from pipeline.profiles.config import ProfileConfig
from pipeline.resources import EXAMPLE_CONFIG_DIR, TOPICS_FILE
from pipeline.segments import AudienceDef, load_segments
from pipeline.serde.registry import SchemaRegistryConnection
from pipeline.topics import MIN_INSYNC_ENV, REPLICATION_ENV, TopicRegistry

DEFAULT_CONFIG = EXAMPLE_CONFIG_DIR  # without --config or PIPELINE_CONFIG; `pipeline init DIR` copies it


def default_data_dir(app_id: str) -> Path:
    """Where a worker keeps its state without PIPELINE_DATA_DIR: per user (XDG), one folder per app id."""
    # Per user rather than the working directory: a worker's RocksDB tables stay where it left them whichever
    # folder it is started from. Per app id: two deployments on one machine both run a "worker-1".
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"  # the spec ignores relative
    return base / "cdp-pipeline" / app_id


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/0 (true/false, yes/no, on/off), not {value!r}")


def _port(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ConfigError(f"{name} must be a TCP port (0-65535), not {value!r}")
    return int(value)


def _path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def _positive(name: str, default: Any) -> Any:
    """A positive number of the default's type (int or float)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = type(default)(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise ConfigError(f"{name} must be a positive {type(default).__name__}, not {value!r}")
    return number


def _whole(name: str, default: int) -> int:
    """A whole number >= 0."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ConfigError(f"{name} must be a whole number (0 or more), not {value!r}")
    return int(value)


def _at_least_one(name: str) -> int | None:
    """A whole number >= 1, or None when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


def _cron(name: str, default: str) -> str:
    """A crontab expression (five fields, UTC), checked now rather than when the scheduler first reads it."""
    from croniter import croniter  # faust's crontab timers use it

    value = os.environ.get(name, "").strip() or default
    if not croniter.is_valid(value):
        raise ConfigError(f"{name} must be a crontab expression (minute hour day month weekday), not {value!r}")
    return value


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _tracemalloc_frames(name: str) -> int:
    """Frames kept per allocation, 0 for off: 1/on/true/yes means 1, a number that many."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return 0
    if value in ("1", "true", "yes", "on"):
        return 1
    if not value.isdigit():
        raise ConfigError(f"{name} must be on/off or a number of frames, not {value!r}")
    return int(value)


@dataclass(frozen=True)
class Settings:
    """Environment (flag default in brackets): the Kafka connection (pipeline.connection: KAFKA_*),
    PIPELINE_APP_ID, PIPELINE_CONFIG, PIPELINE_DATA_DIR, PIPELINE_TOPIC_PREFIX, PIPELINE_WORKER_NAME,
    PIPELINE_WEB_HOST [127.0.0.1] and PIPELINE_WEB_PORT [6066] (the worker's API and /metrics),
    PIPELINE_DEST_METRICS_HOST [127.0.0.1] and PIPELINE_DEST_METRICS_PORT [off] (the destination runner),
    PIPELINE_STATIC_MEMBERSHIP, PIPELINE_LEAVE_GROUP_ON_STOP, PIPELINE_KAFKA_STATS_INTERVAL_MS [5000] (how often
    consumer lag, broker round trips and queue depths are measured), PIPELINE_REPLICATION_FACTOR and
    PIPELINE_MIN_INSYNC_REPLICAS [topics.yaml's] (every topic's, pipeline.topics), the Schema Registry
    (pipeline.serde.registry: SCHEMA_REGISTRY_*) [none: the embedded schemas]. The API (pipeline/api/server.py): PIPELINE_API_KEYS_FILE (the API keys; without it the
    worker does not start unless PIPELINE_API_AUTH=off [on]), PIPELINE_API_FAILED_AUTH_BURST [20] (failed
    authentications an address may make before 429, one more a second), PIPELINE_WEB_READ_TIMEOUT_S [10]
    (a client's request line and headers, and its body, must arrive within it), PIPELINE_WEB_TLS_CERT and
    PIPELINE_WEB_TLS_KEY (PEM files: the listener speaks HTTPS). Batch runs: PIPELINE_BATCH_CRON
    [0 2 * * *] (UTC), PIPELINE_WALK_PROCESSES [one per core, at most 4; 0: in the event loop]. Memory
    diagnosis (pipeline.observability.memory): PIPELINE_TRACEMALLOC [off; on or a number of frames],
    PIPELINE_TRACEMALLOC_INTERVAL_S [60], PIPELINE_TRACEMALLOC_DUMP (a folder). The CLI's API client:
    PIPELINE_API_KEY. Logs (pipeline.observability.logformat): PIPELINE_LOG_FORMAT [text; json: one object a
    line with the worker's name and the handled message's ids]. Routing a lookup to the worker that holds
    the key (pipeline/api/routing.py): PIPELINE_WEB_ADVERTISED_URL [http(s)://web host:web port; the machine's
    host name when the web host is 0.0.0.0 or ::] (the URL the other workers reach this one at),
    PIPELINE_API_ROUTE_TIMEOUT_S [5] (a routed request's whole time). Erasure (pipeline.privacy): PIPELINE_ERASURE_SALT [the app id] (the key of the hashes
    that stand for an identity on control.erasure; the same on every worker and CLI, secret, never changed).
    The console (pipeline/api/console.py): PIPELINE_AUDIENCES_WRITABLE [off] (saving an audience writes
    segments.yaml in the configuration folder; off where that file is managed elsewhere, e.g. a ConfigMap).
    Backpressure (pipeline.stages.backlog): PIPELINE_STAGE_BACKLOG_MAX [2000; 0: off] (ingest takes no new
    records while this worker's identity and profile-op partitions are more than this many messages behind)."""

    kafka: KafkaConnection
    app_id: str
    config_dir: Path
    data_dir: Path
    web_port: int
    topic_prefix: str
    worker_name: str  # unique per worker of an app id, and the same when that worker restarts
    # Local by default (`make run` on a laptop); 0.0.0.0 or a pod IP in a deployment.
    web_host: str = "127.0.0.1"
    dest_metrics_host: str = "127.0.0.1"
    dest_metrics_port: int = 0  # 0: the destination runner serves no metrics
    # Static group membership (KIP-345): both consumers (Faust's and the ingest one) join their groups with a
    # `group.instance.id` made of the app id and worker name, so a worker restarted after a crash gets its
    # partitions back at once instead of after the dead member's session timeout (Faust 60 s, ingest 45 s).
    static_membership: bool = True
    # A static member does not leave its group when it stops; with this the worker leaves both groups on a
    # graceful stop anyway (SIGTERM), so its partitions move to the others at once (see pipeline/app.py).
    leave_group_on_stop: bool = True
    # Fault injection, for tests only: output to these logical topics is never produced and never
    # acknowledged, as if a crash lost it in flight (PIPELINE_FAULT_LOSE_OUTPUT, comma-separated).
    fault_lose_output: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    api_auth: bool = True  # False only with PIPELINE_API_AUTH=off (and no keys file)
    api_failed_auth_burst: int = 20
    web_read_timeout_s: float = 10.0
    web_tls_cert: Path | None = None
    web_tls_key: Path | None = None
    batch_cron: str = "0 2 * * *"
    walk_processes: int = 4
    tracemalloc_frames: int = 0  # 0: off
    tracemalloc_interval_s: float = 60.0
    tracemalloc_dump_dir: Path | None = None
    api_key: str = ""  # what the CLI presents to a worker's API (`pipeline lookup`)
    web_advertised_url: str | None = None  # None: derived (`advertised_url`)
    api_route_timeout_s: float = 5.0
    erasure_salt: str = ""  # "": the app id (pipeline.privacy.erasure.salt_of)
    kafka_stats_interval_ms: int = 5000
    log_format: str = "text"  # or "json"
    audiences_writable: bool = False  # PUT /audiences/{id} (the console's save) may write config_dir/segments.yaml
    # about a second of a worker's work: the delay a record of a new person can gain behind the stage topics
    stage_backlog_max: int = 2000
    replication_factor: int | None = None  # None: topics.yaml's, per topic
    min_insync_replicas: int | None = None
    schema_registry: SchemaRegistryConnection | None = None  # None: the embedded schemas

    @classmethod
    def from_env(cls, config_dir: str | Path | None = None) -> Settings:
        app_id = os.environ.get("PIPELINE_APP_ID", "cdp-pipeline")
        return cls(
            kafka=KafkaConnection.from_env(os.environ),
            app_id=app_id,
            config_dir=Path(config_dir or os.environ.get("PIPELINE_CONFIG") or DEFAULT_CONFIG),
            data_dir=Path(os.environ.get("PIPELINE_DATA_DIR") or default_data_dir(app_id)),
            web_port=_port("PIPELINE_WEB_PORT", 6066),
            web_host=os.environ.get("PIPELINE_WEB_HOST", "").strip() or "127.0.0.1",
            dest_metrics_host=os.environ.get("PIPELINE_DEST_METRICS_HOST", "").strip() or "127.0.0.1",
            dest_metrics_port=_port("PIPELINE_DEST_METRICS_PORT", 0),
            topic_prefix=os.environ.get("PIPELINE_TOPIC_PREFIX", ""),
            worker_name=os.environ.get("PIPELINE_WORKER_NAME", "worker-1"),
            static_membership=_flag("PIPELINE_STATIC_MEMBERSHIP", True),
            leave_group_on_stop=_flag("PIPELINE_LEAVE_GROUP_ON_STOP", True),
            fault_lose_output=tuple(t.strip() for t in os.environ.get("PIPELINE_FAULT_LOSE_OUTPUT", "").split(",")
                                    if t.strip()),
            api_keys_file=_path("PIPELINE_API_KEYS_FILE"),
            api_auth=_flag("PIPELINE_API_AUTH", True),
            api_failed_auth_burst=_positive("PIPELINE_API_FAILED_AUTH_BURST", 20),
            web_read_timeout_s=_positive("PIPELINE_WEB_READ_TIMEOUT_S", 10.0),
            web_tls_cert=_path("PIPELINE_WEB_TLS_CERT"),
            web_tls_key=_path("PIPELINE_WEB_TLS_KEY"),
            batch_cron=_cron("PIPELINE_BATCH_CRON", "0 2 * * *"),
            # one per core, at most 4: several workers may share a machine (set it higher on one of its own)
            walk_processes=_whole("PIPELINE_WALK_PROCESSES", min(os.cpu_count() or 1, 4)),
            tracemalloc_frames=_tracemalloc_frames("PIPELINE_TRACEMALLOC"),
            tracemalloc_interval_s=_positive("PIPELINE_TRACEMALLOC_INTERVAL_S", 60.0),
            tracemalloc_dump_dir=_path("PIPELINE_TRACEMALLOC_DUMP"),
            api_key=os.environ.get("PIPELINE_API_KEY", "").strip(),
            web_advertised_url=os.environ.get("PIPELINE_WEB_ADVERTISED_URL", "").strip().rstrip("/") or None,
            api_route_timeout_s=_positive("PIPELINE_API_ROUTE_TIMEOUT_S", 5.0),
            erasure_salt=os.environ.get("PIPELINE_ERASURE_SALT", "").strip(),
            kafka_stats_interval_ms=_positive("PIPELINE_KAFKA_STATS_INTERVAL_MS", 5000),
            log_format=_choice("PIPELINE_LOG_FORMAT", ("text", "json"), "text"),
            audiences_writable=_flag("PIPELINE_AUDIENCES_WRITABLE", False),
            stage_backlog_max=_whole("PIPELINE_STAGE_BACKLOG_MAX", 2000),
            replication_factor=_at_least_one(REPLICATION_ENV),
            min_insync_replicas=_at_least_one(MIN_INSYNC_ENV),
            schema_registry=SchemaRegistryConnection.from_env(os.environ),
        )

    def topic_registry(self, path: Path = TOPICS_FILE) -> TopicRegistry:
        """topics.yaml with this worker's prefix and replication overrides, its Avro codecs on the Schema
        Registry when one is configured."""
        return _topics(path, self.topic_prefix, self.replication_factor, self.min_insync_replicas,
                       self.schema_registry)

    @property
    def advertised_url(self) -> str:
        """Where the other workers reach this worker's API (Faust's `canonical_url`, shared with the group in
        the partition assignment): PIPELINE_WEB_ADVERTISED_URL, else the web host and port (a wildcard bind
        address is no address to reach: the host name instead)."""
        if self.web_advertised_url:
            return self.web_advertised_url
        import socket

        host = self.web_host if self.web_host not in ("0.0.0.0", "::", "") else socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.web_tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.web_port}"

    @property
    def bootstrap(self) -> str:
        """The brokers, for messages (clients are configured from `kafka`)."""
        return self.kafka.bootstrap

    def group_instance_id(self, consumer: str = "") -> str | None:
        """The `group.instance.id` of this worker's consumer (`consumer`: "" for Faust's, "ingest" for the
        ingest one), or None without static membership. Stable across restarts of the same worker name,
        unique per worker: two live processes with the same worker name would fence each other out."""
        if not self.static_membership:
            return None
        return "-".join(part for part in (self.app_id, self.worker_name, consumer) if part)


def load_topics(prefix: str | None = None, path: Path = TOPICS_FILE) -> TopicRegistry:
    """The topic registry as the environment configures it (PIPELINE_TOPIC_PREFIX unless `prefix` is given,
    the replication overrides, the Schema Registry), for code that has no Settings (tests, benchmarks, tools)."""
    return _topics(path, os.environ.get("PIPELINE_TOPIC_PREFIX", "") if prefix is None else prefix,
                   _at_least_one(REPLICATION_ENV), _at_least_one(MIN_INSYNC_ENV),
                   SchemaRegistryConnection.from_env(os.environ))


def _topics(path: Path, prefix: str, replication_factor: int | None, min_insync_replicas: int | None,
            schema_registry: SchemaRegistryConnection | None) -> TopicRegistry:
    from pipeline.serde.avro import RegistryCatalog  # fastavro: only for a process that builds a registry

    return TopicRegistry.load(path, prefix, replication_factor=replication_factor,
                              min_insync_replicas=min_insync_replicas,
                              catalog=RegistryCatalog(schema_registry) if schema_registry is not None else None)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything in the configuration folder: identity namespaces, datasets, audiences."""

    directory: Path
    profile: ProfileConfig
    audiences: list[AudienceDef]

    @classmethod
    def load(cls, directory: Path) -> PipelineConfig:
        """Load identity.yaml, datasets.yaml and segments.yaml; ConfigError names file and line."""
        if not directory.is_dir():
            raise ConfigError("configuration folder does not exist", file=str(directory))
        for name in ("identity.yaml", "datasets.yaml", "segments.yaml"):
            if not (directory / name).exists():
                raise ConfigError(f"missing {name} in the configuration folder", file=str(directory / name))
        profile = ProfileConfig(load_identity_config(directory / "identity.yaml"),
                                load_datasets_config(directory / "datasets.yaml"))
        return cls(directory, profile, load_segments(directory / "segments.yaml"))
