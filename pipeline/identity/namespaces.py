"""Identity namespaces: config loading, the normaliser registry and per-event identity normalisation."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, cast

import yaml

from pipeline.errors import ConfigError, UnknownNameError
from pipeline.model import Identity
from pipeline.yamlconf import Doc, compose_file, compose_text

NamespaceKind = Literal["cookie", "device", "person"]
# Lower rank = dropped first by the identity-graph size guardrail.
KIND_RANK: Mapping[str, int] = MappingProxyType({"cookie": 0, "device": 1, "person": 2})


class InvalidValue(ValueError):  # noqa: N818 - it is a verdict about a value, not a program error
    """A normaliser rejected a value; `reason` is a fixed phrase that never contains the value."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


Normaliser = Callable[[str], str]


@dataclass(frozen=True)
class NormaliserSettings:
    """Settings some normalisers need (kept apart so normalisers stay plain str -> str functions)."""

    default_country_code: str = "1"


def _trim(value: str) -> str:
    v = value.strip()
    if not v:
        raise InvalidValue("empty value")
    return v


def _lower(value: str) -> str:
    return _trim(value).lower()


def _upper(value: str) -> str:
    return _trim(value).upper()


_WS = re.compile(r"\s")


def _email(value: str) -> str:
    v = _trim(value).lower()
    local, at, domain = v.partition("@")
    if not at or "@" in domain:
        raise InvalidValue("an e-mail needs exactly one '@'")
    if not local or not domain:
        raise InvalidValue("an e-mail needs text on both sides of '@'")
    if _WS.search(v):
        raise InvalidValue("an e-mail cannot contain whitespace")
    return v


_PHONE_CHARS = re.compile(r"^\+?[0-9 ().\-/]+$")
_NON_DIGIT = re.compile(r"\D")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _phone_e164(default_country_code: str) -> Normaliser:
    def normalise(value: str) -> str:
        v = _trim(value)
        if not _PHONE_CHARS.match(v):
            raise InvalidValue("a phone number may only hold digits, spaces, ()-./ and a leading +")
        digits = _NON_DIGIT.sub("", v)
        if v.startswith("+"):
            full = digits
        elif digits.startswith("00"):  # international call prefix
            full = digits[2:]
        elif digits.startswith("0"):  # national trunk prefix: drop it, add the default country
            full = default_country_code + digits[1:]
        elif len(digits) <= 10:  # a national number without trunk prefix
            full = default_country_code + digits
        else:  # long enough to already carry its country code
            full = digits
        # E.164 allows at most 15 digits; fewer than 8 cannot be a country code plus a subscriber number.
        if len(full) < 8:
            raise InvalidValue("too few digits for a phone number")
        if len(full) > 15:
            raise InvalidValue("too many digits for a phone number")
        if full[0] == "0":
            raise InvalidValue("a country code cannot start with 0")
        return "+" + full

    return normalise


def _sha256hex(value: str) -> str:
    v = value.strip()
    if _HEX64.match(v):  # already hashed upstream: only canonicalise the case
        return v.lower()
    if not v:
        raise InvalidValue("empty value")
    return hashlib.sha256(v.encode("utf-8")).hexdigest()


NormaliserFactory = Callable[[NormaliserSettings], Normaliser]

NORMALISERS: Mapping[str, NormaliserFactory] = MappingProxyType({
    "trim": lambda _s: _trim,
    "lower": lambda _s: _lower,
    "upper": lambda _s: _upper,
    "email": lambda _s: _email,
    "phone_e164": lambda s: _phone_e164(s.default_country_code),
    "sha256hex": lambda _s: _sha256hex,
})


def get_normaliser(name: str, settings: NormaliserSettings | None = None) -> Normaliser:
    """The normaliser registered under `name`; UnknownNameError lists the valid names."""
    factory = NORMALISERS.get(name)
    if factory is None:
        raise UnknownNameError("normaliser", name, list(NORMALISERS))
    return factory(settings or NormaliserSettings())


@dataclass(frozen=True)
class Namespace:
    """One identity namespace as configured."""

    name: str
    kind: NamespaceKind
    priority: int
    unique: bool
    normaliser: str
    derived_from: str | None = None


@dataclass(frozen=True)
class IdentityConfig:
    """All namespaces plus the identity-graph size limit, with lookups precomputed for the hot path."""

    namespaces: Mapping[str, Namespace]
    max_identities_per_graph: int
    default_country_code: str = "1"
    source: str | None = None
    normalisers: Mapping[str, Normaliser] = field(default_factory=dict, compare=False, repr=False)
    unique_namespaces: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # source namespace -> namespaces derived from it (e.g. Email -> (EMAIL_LC_SHA256,))
    derived: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)
    # (namespace, raw value) -> normalised identities or problem: normalising (hashing e-mails...) is pure
    cache: dict[tuple[str, str], tuple[tuple[Identity, ...], str | None]] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, namespaces: Iterable[Namespace], max_identities_per_graph: int, *,
              default_country_code: str = "1", source: str | None = None) -> IdentityConfig:
        """Validate and index namespaces (raises ConfigError without a line; the loader adds lines)."""
        by_name: dict[str, Namespace] = {}
        for ns in namespaces:
            if ns.name in by_name:
                raise ConfigError(f"duplicate namespace {ns.name!r}", file=source)
            by_name[ns.name] = ns
        settings = NormaliserSettings(default_country_code)
        normalisers = {ns.name: get_normaliser(ns.normaliser, settings) for ns in by_name.values()}
        derived: dict[str, list[str]] = {}
        for ns in by_name.values():
            if ns.derived_from is None:
                continue
            src = by_name.get(ns.derived_from)
            if src is None:
                raise UnknownNameError("namespace (derived_from)", ns.derived_from, list(by_name))
            if src.name == ns.name or src.derived_from is not None:
                raise ConfigError(f"namespace {ns.name!r} must derive from a non-derived namespace",
                                  file=source)
            derived.setdefault(src.name, []).append(ns.name)
        return cls(
            namespaces=MappingProxyType(by_name),
            max_identities_per_graph=max_identities_per_graph,
            default_country_code=default_country_code,
            source=source,
            normalisers=MappingProxyType(normalisers),
            unique_namespaces=frozenset(n for n, ns in by_name.items() if ns.unique),
            derived=MappingProxyType({k: tuple(sorted(v)) for k, v in derived.items()}),
        )

    def priority(self, namespace: str) -> int:
        ns = self.namespaces.get(namespace)
        return ns.priority if ns is not None else 0


_NS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_NS_REQUIRED = {"name", "kind", "priority", "normaliser"}
_NS_OPTIONAL = {"unique", "derived_from"}
_TOP_REQUIRED = {"max_identities_per_graph", "namespaces"}
_TOP_OPTIONAL = {"default_country_code"}


def load_identity_config(path: str | Path) -> IdentityConfig:
    """Load the namespaces YAML file; any problem is a ConfigError naming the file and line."""
    doc, node = compose_file(path)
    return _parse(doc, node)


def parse_identity_config(text: str, file: str = "<identity config>") -> IdentityConfig:
    """Parse namespaces YAML text (`file` is only used in error messages)."""
    return _parse(Doc(file), compose_text(text, file))


def _parse(doc: Doc, root: yaml.Node) -> IdentityConfig:
    top = doc.mapping(root, "identity config")
    doc.check_keys(top, "identity config", _TOP_REQUIRED, _TOP_OPTIONAL, root)
    max_ids = doc.integer(top["max_identities_per_graph"][1], "max_identities_per_graph", minimum=1)
    cc = "1"
    if "default_country_code" in top:
        cc_node = top["default_country_code"][1]
        cc = str(doc.scalar(cc_node, "default_country_code")).lstrip("+")
        if not cc.isdigit() or not 1 <= len(cc) <= 3 or cc[0] == "0":
            raise doc.error("default_country_code must be 1-3 digits, e.g. 1 or 44", cc_node)
    namespaces: list[Namespace] = []
    nodes: dict[str, yaml.Node] = {}
    for item in doc.sequence(top["namespaces"][1], "namespaces"):
        ns, name_node, fields = _parse_namespace(doc, item)
        if ns.name in nodes:
            raise doc.error(f"duplicate namespace {ns.name!r} (first at line "
                            f"{nodes[ns.name].start_mark.line + 1})", name_node)
        nodes[ns.name] = item
        try:
            get_normaliser(ns.normaliser)
        except UnknownNameError as exc:
            raise doc.error(str(exc), fields["normaliser"][1]) from exc
        namespaces.append(ns)
    if not namespaces:
        raise doc.error("namespaces must list at least one namespace", top["namespaces"][1])
    for ns in namespaces:
        if ns.derived_from is None:
            continue
        where = doc.mapping(nodes[ns.name], "namespace")["derived_from"][1]
        if ns.derived_from not in nodes:
            raise doc.error(f"namespace {ns.name!r}: derived_from names unknown namespace "
                            f"{ns.derived_from!r}; valid: {', '.join(sorted(nodes))}", where)
        src = next(n for n in namespaces if n.name == ns.derived_from)
        if src.name == ns.name or src.derived_from is not None:
            raise doc.error(f"namespace {ns.name!r}: derived_from must name a namespace that is "
                            "not itself derived", where)
    return IdentityConfig.build(namespaces, max_ids, default_country_code=cc, source=doc.file)


def _parse_namespace(doc: Doc, node: yaml.Node
                     ) -> tuple[Namespace, yaml.Node, dict[str, tuple[yaml.Node, yaml.Node]]]:
    fields = doc.mapping(node, "namespace")
    doc.check_keys(fields, "namespace", _NS_REQUIRED, _NS_OPTIONAL, node)
    name_node = fields["name"][1]
    name = doc.string(name_node, "namespace name")
    if not _NS_NAME.match(name):
        # ':' would make identity keys ("ns:id") ambiguous.
        raise doc.error(f"namespace name {name!r} must be letters, digits and '_' (starting "
                        "with a letter)", name_node)
    kind_node = fields["kind"][1]
    kind = doc.string(kind_node, f"namespace {name!r}: kind")
    if kind not in KIND_RANK:
        raise doc.error(f"namespace {name!r}: unknown kind {kind!r}; valid: "
                        f"{', '.join(sorted(KIND_RANK))}", kind_node)
    priority = doc.integer(fields["priority"][1], f"namespace {name!r}: priority")
    unique = doc.boolean(fields["unique"][1], f"namespace {name!r}: unique") if "unique" in fields else False
    normaliser = doc.string(fields["normaliser"][1], f"namespace {name!r}: normaliser")
    derived_from = (doc.string(fields["derived_from"][1], f"namespace {name!r}: derived_from")
                    if "derived_from" in fields else None)
    ns = Namespace(name, cast(NamespaceKind, kind), priority, unique, normaliser, derived_from)
    return ns, name_node, fields


NORMALISED_CACHE_SIZE = 100_000


def _normalise_one(namespace: str, value: str, config: IdentityConfig) -> tuple[tuple[Identity, ...], str | None]:
    """One raw (namespace, value): its identities (the normalised one and those derived from it), or a problem."""
    normalisers = config.normalisers
    fn = normalisers.get(namespace)
    if fn is None:
        # Namespace names are config vocabulary, not personal data; cap length against garbage.
        return (), f"unknown namespace {namespace[:64]!r}"
    ns = config.namespaces[namespace]
    try:
        if ns.derived_from is not None and not _HEX64.match(value.strip()):
            # A plain value sent in a derived namespace is canonicalised like its source first,
            # so it hashes to the same id as the derivation below.
            value = normalisers[ns.derived_from](value)
        norm = fn(value)
    except InvalidValue as exc:
        return (), f"invalid {namespace} value: {exc.reason}"
    return (Identity(namespace, norm), *(Identity(target, normalisers[target](norm))
                                         for target in config.derived.get(namespace, ()))), None


def normalise_identities(raw: Iterable[tuple[str, str]], config: IdentityConfig
                         ) -> tuple[list[Identity], list[str]]:
    """Normalise and de-duplicate (namespace, value) pairs, adding derived identities.

    Returns the identities ordered by priority (highest first), then namespace, then id, plus
    problems. Problems name the namespace and a fixed reason, never the value (personal data).
    """
    out: set[Identity] = set()
    problems: list[str] = []
    cache = config.cache
    for namespace, value in raw:
        hit = cache.get((namespace, value))
        if hit is None:
            if len(cache) >= NORMALISED_CACHE_SIZE:
                cache.clear()
            hit = cache[(namespace, value)] = _normalise_one(namespace, value, config)
        identities, problem = hit
        if problem is None:
            out.update(identities)
        else:
            problems.append(problem)
    priority = config.priority
    return sorted(out, key=lambda i: (-priority(i.namespace), i.namespace, i.id)), problems
