"""The one Kafka connection configuration: read once, turned into librdkafka and Faust/aiokafka client settings.

Every Kafka client of the package (the worker's producers and consumers, Faust, admin clients, the CLI,
the destination runner, backfills, snapshots) is configured from a `KafkaConnection`; no other module sets
`bootstrap.servers` or security properties. Settings come from the environment, over an optional YAML file
(`PIPELINE_KAFKA_CONFIG`); secrets are never taken from the command line and never printed (`describe`).

Environment (file key in brackets):
  KAFKA_BOOTSTRAP [bootstrap]                 host:port[,host:port...]
  KAFKA_SECURITY_PROTOCOL [security_protocol] PLAINTEXT (default), SSL, SASL_PLAINTEXT, SASL_SSL
  KAFKA_SASL_MECHANISM [sasl_mechanism]       PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (default with SASL)
  KAFKA_USERNAME [username], KAFKA_PASSWORD [password] (or KAFKA_PASSWORD_FILE [password_file])
  KAFKA_CA_FILE [ca_file]                     PEM of the CA that signed the brokers' certificates
  KAFKA_CERT_FILE [cert_file], KAFKA_KEY_FILE [key_file], KAFKA_KEY_PASSWORD [key_password]: mutual TLS
  [librdkafka]                                a mapping of any other librdkafka properties (file only)
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from pipeline.errors import ConfigError
from pipeline.yamlconf import compose_file

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_FIELDS = ("bootstrap", "security_protocol", "sasl_mechanism", "username", "password", "password_file",
           "ca_file", "cert_file", "key_file", "key_password", "librdkafka")
# properties only this module may set: a `librdkafka` mapping that sets them would bypass validation
_OWNED = ("bootstrap.servers", "security.protocol", "sasl.mechanisms", "sasl.mechanism", "sasl.username",
          "sasl.password", "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password")


@dataclass(frozen=True)
class KafkaConnection:
    """Where the cluster is and how to authenticate to it."""

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = field(default=None, repr=False)
    extra: Mapping[str, str] = field(default_factory=dict)  # other librdkafka properties
    source: str = "environment"  # where it was read from, for error messages

    def __post_init__(self) -> None:
        where = self.source
        if not self.bootstrap.strip():
            raise ConfigError("bootstrap servers are empty", file=where)
        if self.security_protocol not in PROTOCOLS:
            raise ConfigError(f"security_protocol {self.security_protocol!r} is not one of {', '.join(PROTOCOLS)}",
                              file=where)
        if self.sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise ConfigError(f"sasl_mechanism {self.sasl_mechanism!r} is not one of {', '.join(MECHANISMS)}",
                                  file=where)
            if not self.username or self.password is None:
                raise ConfigError(f"{self.security_protocol} needs a username and a password", file=where)
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name} {path} is not a readable file", file=where)
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together (mutual TLS)", file=where)
        owned = sorted(set(self.extra) & set(_OWNED))
        if owned:
            raise ConfigError(f"librdkafka properties {', '.join(owned)} are set by their own keys", file=where)

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaConnection:
        """The connection from the environment `env` (pipeline.settings passes os.environ), over the file
        named by PIPELINE_KAFKA_CONFIG if any."""
        values: dict[str, Any] = {}
        source = "environment"
        path = env.get("PIPELINE_KAFKA_CONFIG")
        if path:
            source = path
            values.update(_read_file(path))
        for key in _FIELDS[:-1]:
            if env.get(f"KAFKA_{key.upper()}"):
                values[key] = env[f"KAFKA_{key.upper()}"]
        password_file = values.pop("password_file", None)
        if password_file and values.get("password") is None:
            try:
                values["password"] = Path(password_file).read_text().rstrip("\n")
            except OSError as exc:
                raise ConfigError(f"password_file {password_file} cannot be read: {exc.strerror}",
                                  file=source) from exc
        protocol = str(values.get("security_protocol") or "PLAINTEXT").upper()
        mechanism = values.get("sasl_mechanism")
        return cls(
            bootstrap=str(values.get("bootstrap") or "127.0.0.1:9092"),
            security_protocol=protocol,
            sasl_mechanism=str(mechanism).upper() if mechanism else ("SCRAM-SHA-512" if protocol.startswith("SASL_")
                                                                    else None),
            username=_opt(values.get("username")), password=_opt(values.get("password")),
            ca_file=_path(values.get("ca_file")), cert_file=_path(values.get("cert_file")),
            key_file=_path(values.get("key_file")), key_password=_opt(values.get("key_password")),
            extra={str(k): str(v) for k, v in dict(values.get("librdkafka") or {}).items()},
            source=source,
        )

    def with_bootstrap(self, bootstrap: str) -> KafkaConnection:
        """The same security settings towards other brokers (tests, a second cluster)."""
        return KafkaConnection(bootstrap, self.security_protocol, self.sasl_mechanism, self.username,
                               self.password, self.ca_file, self.cert_file, self.key_file, self.key_password,
                               self.extra, self.source)

    def describe(self) -> str:
        """For logs and errors: where and how, never a secret."""
        who = f" as {self.username}" if self.sasl else ""
        how = f"{self.security_protocol}/{self.sasl_mechanism}" if self.sasl else self.security_protocol
        return f"{self.bootstrap} ({how}{who})"

    def librdkafka(self, **props: Any) -> dict[str, Any]:
        """librdkafka configuration for a client: the connection, then the client's own properties."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol,
                                **self.extra}
        if self.sasl:
            conf.update({"sasl.mechanisms": self.sasl_mechanism, "sasl.username": self.username,
                         "sasl.password": self.password})
        if self.tls:
            if self.ca_file is not None:
                conf["ssl.ca.location"] = str(self.ca_file)
            if self.cert_file is not None and self.key_file is not None:
                conf["ssl.certificate.location"] = str(self.cert_file)
                conf["ssl.key.location"] = str(self.key_file)
                if self.key_password is not None:
                    conf["ssl.key.password"] = self.key_password
        conf.update(props)
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of Python clients (Faust's aiokafka), from the same files; None without TLS."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file is not None and self.key_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file), self.key_password)
        return ctx

    def faust_brokers(self) -> list[str]:
        """Faust's `broker` setting: one URL per bootstrap server."""
        return [f"kafka://{server.strip()}" for server in self.bootstrap.split(",") if server.strip()]

    def faust_credentials(self) -> Any:
        """Faust's `broker_credentials` (None for PLAINTEXT)."""
        import faust

        context = self.ssl_context()
        if self.sasl:
            return faust.SASLCredentials(username=self.username, password=self.password, ssl_context=context,
                                         mechanism=self.sasl_mechanism)
        if context is not None:
            return faust.SSLCredentials(context)
        return None

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments of a bare aiokafka client (as Faust's own are built)."""
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.sasl:
            out.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                       sasl_plain_password=self.password)
        if self.tls:
            out["ssl_context"] = self.ssl_context()
        return out


Kafka: TypeAlias = "KafkaConnection | str"  # a bare string is a PLAINTEXT bootstrap (local brokers, tests)


def connection(kafka: Kafka) -> KafkaConnection:
    """The connection itself; a bare bootstrap string is a PLAINTEXT connection to it."""
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(bootstrap=kafka)


def client_config(kafka: Kafka, props: Mapping[str, Any] | None = None, *,
                  error_cb: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """The one builder of confluent-kafka client settings: the connection (servers and security), the client's
    own properties, and logging through the throttled LIBRDKAFKA logger (librdkafka otherwise prints each failed
    connection attempt to stderr: thousands of lines in a few minutes of outage; idle connections closed by
    the broker are not logged at all)."""
    from pipeline.observability.logs import LIBRDKAFKA, log_client_error

    quiet = {"logger": LIBRDKAFKA, "log.connection.close": False, "error_cb": error_cb or log_client_error}
    return {**quiet, **connection(kafka).librdkafka(**dict(props or {}))}


# librdkafka errors that waiting cannot fix: the cluster answered and refused us, or we speak the wrong protocol
_REFUSED = ("_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "_SSL", "TOPIC_AUTHORIZATION_FAILED",
            "CLUSTER_AUTHORIZATION_FAILED", "_UNSUPPORTED_FEATURE")
# librdkafka's hints, in an error or a log line, that client and listener speak different protocols
_WRONG_PROTOCOL = ("incorrect security.protocol", "connecting to a PLAINTEXT broker listener",
                   "connecting to a SSL listener")
CHECK_REPORT_EVERY_S = 30.0


def check_cluster(kafka: Kafka, *, wait_s: float | None = None, log: logging.Logger | None = None) -> int:
    """Called once when a long-running command starts (worker, destination runner) and by `topics apply`:
    connect to the cluster before anything else does, so a misconfiguration is one clear error.

    1. Ask for the cluster's metadata with an admin client, collecting the client's errors.
    2. An authentication, TLS or protocol error raises KafkaAuthError at once, naming the listener
       (`describe()`, never a secret) and librdkafka's reason.
    3. An unreachable cluster is waited for, with a log line every 30 s: for as long as it takes when
       `wait_s` is None (like any other outage), else up to `wait_s` seconds, then a PipelineError.
    Returns the number of brokers in the cluster."""
    import time

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from pipeline.errors import KafkaAuthError, PipelineError

    conn = connection(kafka)
    log = log or logging.getLogger("pipeline.connection")
    errors: list[Any] = []
    hints: list[str] = []  # librdkafka log lines naming a protocol mismatch (not all reach error_cb)
    admin = AdminClient(client_config(conn, {"socket.connection.setup.timeout.ms": 10_000,
                                             "logger": _Hints(hints)}, error_cb=errors.append))
    start = time.monotonic()
    next_report = start + CHECK_REPORT_EVERY_S
    while True:
        try:
            brokers = len(admin.list_topics(timeout=5).brokers)
        except KafkaException as exc:
            errors.append(exc.args[0])
            brokers = 0
        admin.poll(0)  # serves error_cb
        refused = [e.str() for e in errors if e.name() in _REFUSED or _wrong_protocol(e.str())] + hints
        if refused:
            raise KafkaAuthError(f"the Kafka cluster at {conn.describe()} refused the connection: {refused[0]}",
                                 file=None if conn.source == "environment" else conn.source)
        if brokers:
            return brokers
        waited = time.monotonic() - start
        last = errors[-1].str() if errors else "no answer"
        listening = _accepting(conn.bootstrap)
        if listening:  # librdkafka keeps its protocol-mismatch hint to itself on a PLAINTEXT client
            last += (f"; {listening[0]} accepts connections but no Kafka handshake succeeds: is "
                     f"{conn.security_protocol} the protocol of that listener?")
        if wait_s is not None and waited >= wait_s:
            raise PipelineError(f"the Kafka cluster at {conn.describe()} is not reachable: {last}")
        if time.monotonic() >= next_report:
            log.warning("the Kafka cluster at %s is not reachable after %.0f s (%s); waiting",
                        conn.describe(), waited, last)
            next_report += CHECK_REPORT_EVERY_S
        errors.clear()
        time.sleep(1.0)


def _accepting(bootstrap: str) -> list[str]:
    """The bootstrap servers that accept a TCP connection (for a diagnosis, after the Kafka client failed)."""
    import socket

    out = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                out.append(server.strip())
        except (OSError, ValueError):
            continue
    return out


def _wrong_protocol(text: str) -> bool:
    return any(hint in text for hint in _WRONG_PROTOCOL)


class _Hints:
    """A librdkafka logger that keeps the lines naming a protocol mismatch and passes every line on."""

    def __init__(self, into: list[str]) -> None:
        self._into = into

    def log(self, level: int, msg: str, *args: Any) -> None:
        from pipeline.observability.logs import LIBRDKAFKA

        text = msg % args if args else msg
        if _wrong_protocol(text):
            self._into.append(text)
        LIBRDKAFKA.log(level, msg, *args)


def _read_file(path: str) -> dict[str, Any]:
    """The connection file's keys (a located ConfigError for bad YAML, an unknown key or a nested value)."""
    doc, root = compose_file(path)
    fields = doc.mapping(root, "Kafka connection")
    doc.check_keys(fields, "Kafka connection", set(), set(_FIELDS), root)
    out: dict[str, Any] = {}
    for key, (_, node) in fields.items():
        if key == "librdkafka":
            out[key] = {k: doc.scalar(v, f"librdkafka.{k}") for k, (_, v) in doc.mapping(node, key).items()}
        else:
            out[key] = doc.scalar(node, key)
    return out


def _opt(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _path(value: Any) -> Path | None:
    return None if not value else Path(str(value)).expanduser()
