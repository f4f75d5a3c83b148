"""The one Schema Registry connection configuration (URL, basic auth, CA, subject naming), read from the environment.

Settings come from the environment, over an optional YAML file (`PIPELINE_SCHEMA_REGISTRY_CONFIG`), the way
`pipeline.connection` reads Kafka's; secrets are never printed (`describe`, `repr`). Without a URL there is no
registry and the embedded catalog is used.

Environment (file key in brackets):
  SCHEMA_REGISTRY_URL [url]                        http(s)://host:port[,http(s)://host:port...] (mock:// in tests)
  SCHEMA_REGISTRY_USERNAME [username], SCHEMA_REGISTRY_PASSWORD [password]
      (or SCHEMA_REGISTRY_PASSWORD_FILE [password_file]): HTTP basic auth (a Confluent Cloud API key and secret)
  SCHEMA_REGISTRY_CA_FILE [ca_file]                PEM of the CA that signed the registry's certificate
  SCHEMA_REGISTRY_SUBJECT_STRATEGY [subject_strategy]
      topic-name (default: `<topic>-value`), record-name (`<namespace>.<Record>`),
      topic-record-name (`<topic>-<namespace>.<Record>`), as Confluent's serializers name subjects (their Java
      class names, TopicNameStrategy ..., are taken too)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.yamlconf import compose_file

REGISTRY_TIMEOUT_S = 5  # one request to the Schema Registry (ingest asks again with backoff)
STRATEGIES = ("topic-name", "record-name", "topic-record-name")
# the Java serializers' class names (io.confluent.kafka.serializers.subject.*), as a Java producer is configured
_STRATEGY_CLASSES = {"topicnamestrategy": "topic-name", "recordnamestrategy": "record-name",
                     "topicrecordnamestrategy": "topic-record-name"}
CONFIG_FILE_ENV = "PIPELINE_SCHEMA_REGISTRY_CONFIG"
_FIELDS = ("url", "username", "password", "password_file", "ca_file", "subject_strategy")
_SCHEMES = ("http://", "https://", "mock://")


@dataclass(frozen=True)
class SchemaRegistryConnection:
    """Where the Schema Registry is, how to authenticate to it, and how subjects are named."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    subject_strategy: str = "topic-name"
    # what each setting was read from (an environment variable or `file: key`), for error messages
    origins: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        urls = [u.strip() for u in self.url.split(",")]
        bad = [u for u in urls if not u.startswith(_SCHEMES) or len(u) <= len(u.split("//")[0]) + 2]
        if bad or not urls:
            raise ConfigError(f"{self._origin('url')} {self.url!r} is not a URL list; each one starts with "
                              f"{', '.join(_SCHEMES)}")
        if any("@" in u.split("//", 1)[1].split("/")[0] for u in urls):
            # the client would take them, but they would then show in every log line that prints the URL
            raise ConfigError(f"{self._origin('url')} carries credentials: set {self._origin('username')} and "
                              f"{self._origin('password')} instead")
        if self.subject_strategy not in STRATEGIES:
            raise ConfigError(f"{self._origin('subject_strategy')} {self.subject_strategy!r} is not one of "
                              f"{', '.join(STRATEGIES)}")
        if (self.username is None) != (self.password is None):
            raise ConfigError(f"{self._origin('username')} and {self._origin('password')} go together "
                              "(HTTP basic auth)")
        if self.username is not None and ":" in self.username:
            raise ConfigError(f"{self._origin('username')} must not contain ':' (HTTP basic auth)")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"{self._origin('ca_file')} {self.ca_file} is not a readable file")

    def _origin(self, key: str) -> str:
        return self.origins.get(key) or f"SCHEMA_REGISTRY_{key.upper()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SchemaRegistryConnection | None:
        """The connection from the environment `env` (pipeline.settings passes os.environ), over the file named
        by PIPELINE_SCHEMA_REGISTRY_CONFIG if any; None when neither gives a URL (no registry: the embedded
        schemas)."""
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        path = env.get(CONFIG_FILE_ENV)
        if path:
            for key, value in _read_file(path).items():
                values[key], origins[key] = value, f"{path}: {key}"
        for key in _FIELDS:
            var = f"SCHEMA_REGISTRY_{key.upper()}"
            if env.get(var):
                values[key], origins[key] = env[var], var
        if not values.get("url"):
            if len(values) > 0:  # credentials for no registry: a URL forgotten, not a registry unwanted
                raise ConfigError(f"{', '.join(origins[k] for k in values)} set without SCHEMA_REGISTRY_URL")
            return None
        password_file = values.pop("password_file", None)
        if password_file and values.get("password") is None:
            try:
                values["password"] = Path(str(password_file)).read_text().rstrip("\n")
            except OSError as exc:
                raise ConfigError(f"{origins['password_file']} {password_file} cannot be read: "
                                  f"{exc.strerror}") from exc
            origins["password"] = origins["password_file"]
        strategy = str(values.get("subject_strategy") or "topic-name").strip()
        key = strategy.lower().rsplit(".", 1)[-1]
        strategy = key if key in STRATEGIES else _STRATEGY_CLASSES.get(key, strategy)
        return cls(url=str(values["url"]).strip(), username=_opt(values.get("username")),
                   password=_opt(values.get("password")),
                   ca_file=Path(str(values["ca_file"])).expanduser() if values.get("ca_file") else None,
                   subject_strategy=strategy, origins=origins)

    def client_config(self) -> dict[str, Any]:
        """confluent-kafka SchemaRegistryClient configuration. No retries inside the client: they would sleep on
        the caller's thread (the worker's event loop); ingest retries with backoff itself. A short timeout for the
        same reason."""
        conf: dict[str, Any] = {"url": self.url, "max.retries": 0, "timeout": REGISTRY_TIMEOUT_S}
        if self.username is not None:
            conf["basic.auth.user.info"] = f"{self.username}:{self.password}"
        if self.ca_file is not None:
            conf["ssl.ca.location"] = str(self.ca_file)
        return conf

    def describe(self) -> str:
        """For logs and errors: where and how, never a secret."""
        how = [f"basic auth as {self.username}" if self.username else "no auth"]
        if self.ca_file is not None:
            how.append(f"CA {self.ca_file}")
        how.append(f"{self.subject_strategy} subjects")
        return f"{self.url} ({', '.join(how)})"

    def subject(self, topic: str | None, record_fullname: str) -> str:
        """The subject a record's value schema is registered under, as Confluent's serializers name it. A codec
        attached to no topic (tools, tests) uses the record name whatever the strategy: it has no other."""
        if topic is None or self.subject_strategy == "record-name":
            return record_fullname
        if self.subject_strategy == "topic-record-name":
            return f"{topic}-{record_fullname}"
        return f"{topic}-value"


def record_fullname(schema: Mapping[str, Any]) -> str:
    """`namespace.Name` of a record schema as declared (a dotted name is already full)."""
    name = str(schema["name"])
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _read_file(path: str) -> dict[str, Any]:
    """The file's keys (a located ConfigError for bad YAML, an unknown key or a nested value)."""
    doc, root = compose_file(path)
    fields = doc.mapping(root, "Schema Registry connection")
    doc.check_keys(fields, "Schema Registry connection", set(), set(_FIELDS), root)
    return {key: doc.scalar(node, key) for key, (_, node) in fields.items()}


def _opt(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)
