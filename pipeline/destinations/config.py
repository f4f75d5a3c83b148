"""Load and validate the destinations YAML file into frozen config objects (errors carry file:line)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast

import yaml

from pipeline.errors import ConfigError, UnknownNameError
from pipeline.yamlconf import Doc, compose_file, compose_text

IdentityTransform = Literal["none", "sha256", "sha256_lower", "lower"]
OnMissing = Literal["deny", "allow"]

TRANSFORMS: tuple[str, ...] = ("lower", "none", "sha256", "sha256_lower")
ON_MISSING: tuple[str, ...] = ("allow", "deny")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
Env = os._Environ[str] | dict[str, str] | None  # None: ${VAR} is left as written
Fields = dict[str, tuple[yaml.Node, yaml.Node]]  # a destination's keys: name -> (key node, value node)
S = TypeVar("S")


def _no_settings(doc: Doc, fields: Fields, env: Env) -> None:
    return None


@dataclass(frozen=True)
class KindSettings:
    """How a destination kind reads its own keys of a destination entry: the keys it requires and allows
    besides the common ones, and `parse`, which turns them into the kind's settings object (errors through
    `doc.error`, so they carry file:line). `base.register_kind` records it with the kind's factory."""

    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    parse: Callable[[Doc, Fields, Env], object] = _no_settings


_KIND_SETTINGS: dict[str, KindSettings] = {}


def register_kind_settings(kind: str, settings: KindSettings) -> None:
    """Record how `kind` reads its settings (called by `base.register_kind`)."""
    _KIND_SETTINGS[kind] = settings


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
class DestinationConfig:
    """One destination: what it activates, which identities/attributes it gets, kind settings."""

    name: str
    kind: str
    audiences: frozenset[str] | None  # None = every audience ("*")
    identities: tuple[IdentityMapping, ...]
    attributes: tuple[str, ...] = ()
    consent: ConsentConfig | None = None
    # The kind's own settings, as its registered `KindSettings.parse` made them (None for a kind without any).
    settings: object = None

    def settings_as(self, cls: type[S]) -> S:
        """The kind's settings, checked to be a `cls` (what the kind's destination expects)."""
        if not isinstance(self.settings, cls):
            raise ConfigError(f"destination {self.name} ({self.kind}): settings {type(self.settings).__name__}, "
                              f"expected {cls.__name__}")
        return self.settings

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
    spec = _KIND_SETTINGS.get(kind)
    if spec is None:
        err = UnknownNameError("destination kind", kind, sorted(_KIND_SETTINGS))
        # Keep the registry's error type but say where: file:line like every other ConfigError.
        located = doc.error(str(err), kind_node)
        err.file, err.line, err.column = located.file, located.line, located.column
        err.args = located.args
        raise err
    doc.check_keys(f, f"{kind} destination", {"name", "kind", "audiences", "identities"} | spec.required,
                   _COMMON | spec.required | spec.optional, node)
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

    return DestinationConfig(name=name, kind=kind, audiences=audiences, identities=tuple(identities),
                             attributes=attributes, consent=consent, settings=spec.parse(doc, f, env))


# -- helpers for the kinds' parsers -------------------------------------------------------------------


def number(doc: Doc, node: yaml.Node, what: str, *, positive: bool = True) -> float:
    """A number (int or float, never a bool), positive unless told otherwise."""
    value = doc.scalar(node, what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise doc.error(f"{what} must be a number", node)
    if positive and value <= 0:
        raise doc.error(f"{what} must be positive", node)
    return float(value)


def resolve_env(doc: Doc, node: yaml.Node, what: str, env: Env) -> str:
    """A string whose ${VAR} references are replaced from `env` (left as written when `env` is None: a
    reader that never sends); a variable not set is an error that names it, never a value."""
    raw = str(doc.scalar(node, what))

    def sub(m: re.Match[str]) -> str:
        if env is None:
            return m.group(0)
        if m.group(1) not in env:
            raise doc.error(f"environment variable {m.group(1)} is not set", node)
        return env[m.group(1)]

    return _ENV_REF.sub(sub, raw)


