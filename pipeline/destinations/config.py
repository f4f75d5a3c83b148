"""Load and validate the destinations YAML file into frozen config objects (errors carry file:line)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from croniter import croniter
from yaml.constructor import SafeConstructor

from pipeline.errors import UnknownNameError
from pipeline.yamlconf import Doc, compose_file, compose_text

IdentityTransform = Literal["none", "sha256", "sha256_lower", "lower"]
OnMissing = Literal["deny", "allow"]
FileFormat = Literal["csv", "jsonl", "parquet"]
ExportMode = Literal["full", "incremental"]

KINDS: tuple[str, ...] = ("file", "http", "kafka")
TRANSFORMS: tuple[str, ...] = ("lower", "none", "sha256", "sha256_lower")
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
MODES: tuple[str, ...] = ("full", "incremental")
ON_MISSING: tuple[str, ...] = ("allow", "deny")
METHODS: tuple[str, ...] = ("PATCH", "POST", "PUT")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_INTERVAL = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_INTERVAL_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
Env = os._Environ[str] | dict[str, str] | None  # None: ${VAR} is left as written


@dataclass(frozen=True)
class IdentityMapping:
    """One identity namespace a destination receives, and how its values are transformed."""

    namespace: str
    transform: IdentityTransform = "none"


@dataclass(frozen=True)
class ConsentConfig:
    """Which profile attribute holds consent, which of its values deny activation, and what a message
    without a value means (`on_missing`; pipeline.consent decides with it)."""

    attribute: str
    deny_values: tuple[str, ...] = ("no",)
    on_missing: OnMissing = "deny"

    def denies(self, value: object) -> bool:
        """The value is one of the deny values (an absent value is not: see `on_missing`)."""
        if value is None:
            return False
        return str(value).strip().lower() in {v.lower() for v in self.deny_values}


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching: send when `max_records` are queued or the oldest waited `max_age_ms`."""

    max_records: int = 100
    max_age_ms: int = 1000


@dataclass(frozen=True)
class RetryConfig:
    """Exponential backoff with full jitter: delay = uniform(0, min(max, base * 2**attempt)). A batch whose
    retryable failures go on is dead-lettered once it has had `max_attempts` *and* has been failing for
    `max_elapsed_s` (-1: never): an outage of the receiver shorter than that is waited out."""

    max_attempts: int = 5
    base_delay_ms: int = 200
    max_delay_ms: int = 10_000
    max_elapsed_s: float = 3600.0

    def exhausted(self, attempt: int, failing_since: float, now: float) -> bool:
        return attempt >= self.max_attempts and 0 <= self.max_elapsed_s <= now - failing_since


@dataclass(frozen=True)
class BreakerConfig:
    """Open after `failure_threshold` consecutive failures; try again after `reset_timeout_s`."""

    failure_threshold: int = 5
    reset_timeout_s: float = 30.0


@dataclass(frozen=True)
class HttpSettings:
    """Settings of an `http` destination (a webhook receiving JSON batches)."""

    url: str
    method: str = "POST"
    # Values may hold secrets (resolved from ${ENV}); keep them out of reprs and logs.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    batch: BatchConfig = BatchConfig()
    timeout_s: float = 10.0
    retry: RetryConfig = RetryConfig()
    rate_limit_per_s: float | None = None  # requests per second; None = unlimited
    circuit_breaker: BreakerConfig = BreakerConfig()
    queue_max_records: int = 10_000  # bound of the in-memory queue: beyond it deliver() blocks
    # `erasure: {method: DELETE, url: ...}`: exits of erased people go in requests of their own, with this method
    # (and URL, default `url`); None: they go with the rest, marked `"reason": "erasure"`
    erasure_method: str | None = None
    erasure_url: str | None = None


@dataclass(frozen=True)
class KafkaSettings:
    """Settings of a `kafka` destination: the logical topic the lead's registry resolves."""

    topic: str


@dataclass(frozen=True)
class FileSettings:
    """Settings of a `file` destination (scheduled exports to a folder or an s3:// URL)."""

    path: str
    format: FileFormat = "csv"
    mode: ExportMode = "incremental"
    schedule: str | None = None  # "15m"-style interval or a cron expression; None = on demand only
    max_rows_per_file: int | None = None
    max_bytes_per_file: int | None = None
    # fsspec options (e.g. {client_kwargs: {endpoint_url: ...}} for s3fs); may hold secrets.
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    @property
    def interval_s(self) -> int | None:
        """The schedule as seconds if it is an interval, None if it is a cron expression or absent."""
        if self.schedule is None:
            return None
        m = _INTERVAL.match(self.schedule)
        return int(m.group(1)) * _INTERVAL_S[m.group(2)] if m else None


@dataclass(frozen=True)
class DestinationConfig:
    """One destination: what it activates, which identities/attributes it gets, kind settings."""

    name: str
    kind: str
    audiences: frozenset[str] | None  # None = every audience ("*")
    identities: tuple[IdentityMapping, ...]
    attributes: tuple[str, ...] = ()
    consent: ConsentConfig | None = None
    http: HttpSettings | None = None
    kafka: KafkaSettings | None = None
    file: FileSettings | None = None

    def activates(self, audience_id: str) -> bool:
        return self.audiences is None or audience_id in self.audiences

    @property
    def identity_namespaces(self) -> frozenset[str]:
        return frozenset(m.namespace for m in self.identities)


@dataclass(frozen=True)
class DestinationsConfig:
    """All destinations of one file, by name."""

    destinations: tuple[DestinationConfig, ...]
    file: str | None = None

    def __iter__(self) -> Iterator[DestinationConfig]:
        return iter(self.destinations)

    def names(self) -> list[str]:
        return [d.name for d in self.destinations]

    def get(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise UnknownNameError("destination", name, self.names())


_COMMON = {"name", "kind", "audiences", "identities", "attributes", "consent"}
_KIND_KEYS: dict[str, set[str]] = {
    "http": {"url", "method", "headers", "batch", "timeout_s", "retry", "rate_limit_per_s",
             "circuit_breaker", "queue_max_records", "erasure"},
    "kafka": {"topic"},
    "file": {"path", "format", "mode", "schedule", "max_rows_per_file", "max_bytes_per_file",
             "storage_options"},
}
_REQUIRED_KIND_KEYS = {"http": {"url"}, "kafka": {"topic"}, "file": {"path"}}


def load_destinations(path: str | Path, env: dict[str, str] | None = None, *,
                      resolve_env: bool = True) -> DestinationsConfig:
    """Load a destinations YAML file; `env` (default os.environ) resolves ${VAR} in header values.
    `resolve_env=False` leaves ${VAR} as written: for readers that never send (the worker reads the
    consent rules only, and holds none of the runner's secrets)."""
    doc, root = compose_file(path)
    return _parse(doc, root, (os.environ if env is None else env) if resolve_env else None)


def parse_destinations(text: str, file: str = "<string>", env: dict[str, str] | None = None
                       ) -> DestinationsConfig:
    """Like `load_destinations` for YAML text (tests, API)."""
    return _parse(Doc(file), compose_text(text, file), os.environ if env is None else env)


def _parse(doc: Doc, root: yaml.Node, env: Env) -> DestinationsConfig:
    top = doc.mapping(root, "destinations file")
    doc.check_keys(top, "destinations file", {"destinations"}, set(), root)
    out: list[DestinationConfig] = []
    seen: set[str] = set()
    for item in doc.sequence(top["destinations"][1], "destinations"):
        dest = _destination(doc, item, env)
        if dest.name in seen:
            raise doc.error(f"destination {dest.name!r} is defined twice", item)
        seen.add(dest.name)
        out.append(dest)
    return DestinationsConfig(tuple(out), doc.file)


def _destination(doc: Doc, node: yaml.Node, env: Env) -> DestinationConfig:
    f = doc.mapping(node, "destination")
    if "kind" not in f:
        raise doc.error("destination: missing key kind", node)
    kind_node = f["kind"][1]
    kind = doc.string(kind_node, "kind")
    if kind not in KINDS:
        err = UnknownNameError("destination kind", kind, KINDS)
        # Keep the registry's error type but say where: file:line like every other ConfigError.
        located = doc.error(str(err), kind_node)
        err.file, err.line, err.column = located.file, located.line, located.column
        err.args = located.args
        raise err
    doc.check_keys(f, f"{kind} destination", {"name", "kind", "audiences", "identities"}
                   | _REQUIRED_KIND_KEYS[kind], (_COMMON | _KIND_KEYS[kind]), node)
    name = doc.string(f["name"][1], "name")
    if not _NAME.match(name):
        raise doc.error("name may hold letters, digits, '.', '_' and '-' only", f["name"][1])

    aud_node = f["audiences"][1]
    audiences: frozenset[str] | None
    if isinstance(aud_node, yaml.ScalarNode):
        if doc.scalar(aud_node, "audiences") != "*":
            raise doc.error("audiences must be a list of audience ids or \"*\"", aud_node)
        audiences = None
    else:
        audiences = frozenset(doc.string(n, "audience id") for n in doc.sequence(aud_node, "audiences"))
        if not audiences:
            raise doc.error("audiences must not be empty (use \"*\" for all)", aud_node)

    identities: list[IdentityMapping] = []
    for n in doc.sequence(f["identities"][1], "identities"):
        m = doc.mapping(n, "identity")
        doc.check_keys(m, "identity", {"namespace"}, {"transform"}, n)
        transform = "none"
        if "transform" in m:
            transform = doc.string(m["transform"][1], "transform")
            if transform not in TRANSFORMS:
                raise doc.error(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}",
                                m["transform"][1])
        identities.append(IdentityMapping(doc.string(m["namespace"][1], "namespace"),
                                          cast(IdentityTransform, transform)))
    if not identities:
        raise doc.error("identities must list at least one namespace", f["identities"][1])

    attributes: tuple[str, ...] = ()
    if "attributes" in f:
        attributes = tuple(doc.string(n, "attribute path") for n in doc.sequence(f["attributes"][1], "attributes"))

    consent = None
    if "consent" in f:
        cnode = f["consent"][1]
        c = doc.mapping(cnode, "consent")
        doc.check_keys(c, "consent", {"attribute"}, {"deny_values", "on_missing"}, cnode)
        deny: tuple[str, ...] = ("no",)
        if "deny_values" in c:
            deny = tuple(str(doc.scalar(n, "deny value")) for n in doc.sequence(c["deny_values"][1], "deny_values"))
        on_missing = "deny"
        if "on_missing" in c:
            on_missing = doc.string(c["on_missing"][1], "on_missing")
            if on_missing not in ON_MISSING:
                raise doc.error(f"on_missing must be one of {', '.join(ON_MISSING)}", c["on_missing"][1])
        consent = ConsentConfig(doc.string(c["attribute"][1], "consent attribute"), deny,
                                cast(OnMissing, on_missing))

    cfg = DestinationConfig(name=name, kind=kind, audiences=audiences, identities=tuple(identities),
                            attributes=attributes, consent=consent)
    if kind == "http":
        return replace(cfg, http=_http(doc, f, env))
    if kind == "kafka":
        return replace(cfg, kafka=KafkaSettings(doc.string(f["topic"][1], "topic")))
    return replace(cfg, file=_file(doc, f))


def _number(doc: Doc, node: yaml.Node, what: str, *, positive: bool = True) -> float:
    value = doc.scalar(node, what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise doc.error(f"{what} must be a number", node)
    if positive and value <= 0:
        raise doc.error(f"{what} must be positive", node)
    return float(value)


def _http(doc: Doc, f: dict[str, tuple[yaml.Node, yaml.Node]], env: Env) -> HttpSettings:
    url = doc.string(f["url"][1], "url")
    if not url.startswith(("http://", "https://")):
        raise doc.error("url must start with http:// or https://", f["url"][1])
    method = "POST"
    if "method" in f:
        method = doc.string(f["method"][1], "method").upper()
        if method not in METHODS:
            raise doc.error(f"method must be one of {', '.join(METHODS)}", f["method"][1])
    headers: list[tuple[str, str]] = []
    if "headers" in f:
        for key, (_, vnode) in doc.mapping(f["headers"][1], "headers").items():
            raw = str(doc.scalar(vnode, f"header {key}"))

            def sub(m: re.Match[str], vnode: yaml.Node = vnode) -> str:
                if env is None:
                    return m.group(0)
                if m.group(1) not in env:
                    # Name the variable, never the value: headers usually carry tokens.
                    raise doc.error(f"environment variable {m.group(1)} is not set", vnode)
                return env[m.group(1)]

            headers.append((key, _ENV_REF.sub(sub, raw)))
    batch = BatchConfig()
    if "batch" in f:
        bnode = f["batch"][1]
        b = doc.mapping(bnode, "batch")
        doc.check_keys(b, "batch", set(), {"max_records", "max_age_ms"}, bnode)
        batch = BatchConfig(
            doc.integer(b["max_records"][1], "max_records", minimum=1) if "max_records" in b else 100,
            doc.integer(b["max_age_ms"][1], "max_age_ms", minimum=0) if "max_age_ms" in b else 1000)
    retry = RetryConfig()
    if "retry" in f:
        rnode = f["retry"][1]
        r = doc.mapping(rnode, "retry")
        doc.check_keys(r, "retry", set(), {"max_attempts", "base_delay_ms", "max_delay_ms", "max_elapsed_s"},
                       rnode)
        retry = RetryConfig(
            doc.integer(r["max_attempts"][1], "max_attempts", minimum=1) if "max_attempts" in r else 5,
            doc.integer(r["base_delay_ms"][1], "base_delay_ms", minimum=0) if "base_delay_ms" in r else 200,
            doc.integer(r["max_delay_ms"][1], "max_delay_ms", minimum=0) if "max_delay_ms" in r else 10_000,
            _number(doc, r["max_elapsed_s"][1], "max_elapsed_s", positive=False) if "max_elapsed_s" in r else 3600.0)
    breaker = BreakerConfig()
    if "circuit_breaker" in f:
        cnode = f["circuit_breaker"][1]
        c = doc.mapping(cnode, "circuit_breaker")
        doc.check_keys(c, "circuit_breaker", set(), {"failure_threshold", "reset_timeout_s"}, cnode)
        breaker = BreakerConfig(
            doc.integer(c["failure_threshold"][1], "failure_threshold", minimum=1)
            if "failure_threshold" in c else 5,
            _number(doc, c["reset_timeout_s"][1], "reset_timeout_s") if "reset_timeout_s" in c else 30.0)
    erasure_method: str | None = None
    erasure_url: str | None = None
    if "erasure" in f:
        enode = f["erasure"][1]
        e = doc.mapping(enode, "erasure")
        doc.check_keys(e, "erasure", {"method"}, {"url"}, enode)
        erasure_method = doc.string(e["method"][1], "erasure method").upper()
        if erasure_method not in (*METHODS, "DELETE"):
            raise doc.error(f"erasure method must be one of {', '.join((*METHODS, 'DELETE'))}", e["method"][1])
        if "url" in e:
            erasure_url = doc.string(e["url"][1], "erasure url")
            if not erasure_url.startswith(("http://", "https://")):
                raise doc.error("erasure url must start with http:// or https://", e["url"][1])
    return HttpSettings(
        erasure_method=erasure_method, erasure_url=erasure_url,
        url=url, method=method, headers=tuple(headers), batch=batch,
        timeout_s=_number(doc, f["timeout_s"][1], "timeout_s") if "timeout_s" in f else 10.0,
        retry=retry,
        rate_limit_per_s=_number(doc, f["rate_limit_per_s"][1], "rate_limit_per_s")
        if "rate_limit_per_s" in f else None,
        circuit_breaker=breaker,
        queue_max_records=doc.integer(f["queue_max_records"][1], "queue_max_records", minimum=1)
        if "queue_max_records" in f else 10_000,
    )


def _file(doc: Doc, f: dict[str, tuple[yaml.Node, yaml.Node]]) -> FileSettings:
    path = doc.string(f["path"][1], "path").rstrip("/")
    fmt = "csv"
    if "format" in f:
        fmt = doc.string(f["format"][1], "format")
        if fmt not in FORMATS:
            raise doc.error(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}", f["format"][1])
    mode = "incremental"
    if "mode" in f:
        mode = doc.string(f["mode"][1], "mode")
        if mode not in MODES:
            raise doc.error(f"unknown mode {mode!r}; valid: {', '.join(MODES)}", f["mode"][1])
    schedule = None
    if "schedule" in f:
        schedule = doc.string(f["schedule"][1], "schedule")
        if not _INTERVAL.match(schedule) and not croniter.is_valid(schedule):
            raise doc.error("schedule must be an interval like 15m, 1h, 30s, 1d or a cron expression",
                            f["schedule"][1])
        m = _INTERVAL.match(schedule)
        if m and int(m.group(1)) <= 0:
            raise doc.error("schedule interval must be positive", f["schedule"][1])
    storage: list[tuple[str, Any]] = []
    if "storage_options" in f:
        for key, (_, vnode) in doc.mapping(f["storage_options"][1], "storage_options").items():
            storage.append((key, SafeConstructor().construct_object(vnode, deep=True)))
    return FileSettings(
        path=path, format=cast(FileFormat, fmt), mode=cast(ExportMode, mode), schedule=schedule,
        max_rows_per_file=doc.integer(f["max_rows_per_file"][1], "max_rows_per_file", minimum=1)
        if "max_rows_per_file" in f else None,
        max_bytes_per_file=doc.integer(f["max_bytes_per_file"][1], "max_bytes_per_file", minimum=1)
        if "max_bytes_per_file" in f else None,
        storage_options=tuple(storage),
    )
