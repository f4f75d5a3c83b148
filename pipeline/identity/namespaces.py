"""Identity namespaces: config loading, the normaliser registry and per-event identity normalisation."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Literal, cast

import phonenumbers
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

    # phone_e164: the region (ISO 3166 two-letter code) a number written without its country code is in
    default_region: str = "US"


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
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
# libphonenumber's parse errors, as fixed phrases (its own messages are fixed too, but not ours to promise)
_PHONE_PARSE_REASONS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "a phone number with an unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too few digits for a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too few digits for a phone number",
    phonenumbers.NumberParseException.TOO_LONG: "too many digits for a phone number",
}
INVALID_PHONE = "not a valid phone number (libphonenumber)"
# Parsing and validating with libphonenumber costs about 0.25 ms a number (the hand-written rules cost 6 us):
# the results are cached per (region, text), on top of `IdentityConfig.cache` (which the API and producer
# keying share, and which is cleared whole when full), so a returning customer's number is parsed once.
PHONE_CACHE_SIZE = 65_536


@lru_cache(maxsize=PHONE_CACHE_SIZE)
def _phone_parse(value: str, region: str) -> tuple[str, bool]:
    """(E.164, True) or (fixed reason, False); a tuple rather than an exception, so rejections cache too."""
    v = value.strip()
    if not v:
        return "empty value", False
    if not _PHONE_CHARS.match(v):
        return "a phone number may only hold digits, spaces, ()-./ and a leading +", False
    reason = INVALID_PHONE
    # a leading 00 is the international call prefix in most of the world; libphonenumber only reads it so
    # when the default region dials out with 00 (not the US, 011): tried as "+" when the plain read fails
    tries = (v, "+" + v.lstrip()[2:]) if v.startswith("00") else (v,)
    for text in tries:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException as exc:
            reason = _PHONE_PARSE_REASONS.get(exc.error_type, INVALID_PHONE)
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), True
        reason = INVALID_PHONE
    return reason, False


def _phone_e164(default_region: str) -> Normaliser:
    """Phone numbers through libphonenumber: any national or international notation ("+44 (0)20 7946 0958",
    "020 7946 0958" with default region GB, "0044 20 ...") -> E.164; numbers it does not hold valid for their
    region (unassigned ranges, wrong length, the US 555 range) are rejected."""
    def normalise(value: str) -> str:
        out, ok = _phone_parse(value, default_region)
        if not ok:
            raise InvalidValue(out)
        return out

    return normalise


def phone_region_valid(region: str) -> bool:
    """True if libphonenumber knows the two-letter region code (GB, US, DE...)."""
    return region in phonenumbers.SUPPORTED_REGIONS


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
    "phone_e164": lambda s: _phone_e164(s.default_region),
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
    # options; None = the file-wide setting
    default_region: str | None = None  # phone_e164 only: overrides phone.default_region
    max_length: int | None = None  # overrides datasets.yaml limits.max_identity_length
    blocked_values: tuple[str, ...] | None = None  # replaces hygiene.blocked_values for this namespace


# Placeholders that broken tags, exports and forms send for "no value": as identities they would merge every
# stranger who sent them. Compared whole, after trimming, case-insensitively (`blocked_form`).
DEFAULT_BLOCKED_VALUES: tuple[str, ...] = ("", "null", "undefined", "anonymous", "0", "-1", "n/a", "none", "nan")

ViolationMode = Literal["dead-letter", "drop-identity"]
VIOLATION_MODES: tuple[ViolationMode, ...] = ("dead-letter", "drop-identity")
# rule -> what happens to a record that breaks it, by default
DEFAULT_ON_VIOLATION: Mapping[str, ViolationMode] = MappingProxyType({
    "blocked_value": "drop-identity",  # an identity whose value is on the blocked list
    "too_long": "drop-identity",  # a value over max_length / limits.max_identity_length
    "too_many": "dead-letter",  # more identities than limits.max_identities_per_record (derived ones count)
})


def blocked_form(value: str) -> str:
    """How values are compared with the blocked list: trimmed, case-folded."""
    return value.strip().casefold()


@dataclass(frozen=True)
class Hygiene:
    """Which identity values are refused, and what a record breaking an identity rule causes."""

    blocked_values: tuple[str, ...] = DEFAULT_BLOCKED_VALUES
    on_violation: Mapping[str, ViolationMode] = field(default_factory=lambda: DEFAULT_ON_VIOLATION)


@dataclass(frozen=True)
class Dropped:
    """An identity left out of a record: `namespace` is a configured name or "(unknown)" (a metric label),
    `reason` a short code, `detail` a fixed phrase naming the namespace, never the value (personal data)."""

    namespace: str
    reason: str  # invalid-value | blocked-value | unknown-namespace | too-long | too-many-identities | suppressed
    detail: str


UNKNOWN_NAMESPACE_LABEL = "(unknown)"


@dataclass(frozen=True)
class IdentityConfig:
    """All namespaces plus the identity-graph size limit, with lookups precomputed for the hot path."""

    namespaces: Mapping[str, Namespace]
    max_identities_per_graph: int
    default_region: str = "US"
    source: str | None = None
    hygiene: Hygiene = Hygiene()
    normalisers: Mapping[str, Normaliser] = field(default_factory=dict, compare=False, repr=False)
    unique_namespaces: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # source namespace -> namespaces derived from it (e.g. Email -> (EMAIL_LC_SHA256,))
    derived: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)
    # namespace -> its blocked values in `blocked_form` (plus, for sha256hex namespaces, their digests)
    blocked: Mapping[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)
    # namespace -> its own max_length, for the namespaces that set one
    max_lengths: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    # (namespace, raw value) -> normalised identities or what was dropped: normalising (hashing e-mails...) is pure
    cache: dict[tuple[str, str], tuple[tuple[Identity, ...], Dropped | None]] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, namespaces: Iterable[Namespace], max_identities_per_graph: int, *,
              default_region: str = "US", hygiene: Hygiene = Hygiene(),
              source: str | None = None) -> IdentityConfig:
        """Validate and index namespaces (raises ConfigError without a line; the loader adds lines)."""
        by_name: dict[str, Namespace] = {}
        for ns in namespaces:
            if ns.name in by_name:
                raise ConfigError(f"duplicate namespace {ns.name!r}", file=source)
            by_name[ns.name] = ns
        for region in {default_region, *(ns.default_region for ns in by_name.values() if ns.default_region)}:
            if not phone_region_valid(region):
                raise ConfigError(f"unknown phone region {region!r} (two capital letters: GB, US, DE...)",
                                  file=source)
        normalisers = {ns.name: get_normaliser(ns.normaliser,
                                               NormaliserSettings(ns.default_region or default_region))
                       for ns in by_name.values()}
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
        blocked: dict[str, frozenset[str]] = {}
        for ns in by_name.values():
            values = {blocked_form(v) for v in (hygiene.blocked_values if ns.blocked_values is None
                                                else ns.blocked_values)}
            if ns.normaliser == "sha256hex":  # the same placeholders hashed upstream
                values |= {hashlib.sha256(v.encode("utf-8")).hexdigest() for v in set(values) if v}
            blocked[ns.name] = frozenset(values)
        return cls(
            namespaces=MappingProxyType(by_name),
            max_identities_per_graph=max_identities_per_graph,
            default_region=default_region,
            source=source,
            hygiene=hygiene,
            normalisers=MappingProxyType(normalisers),
            unique_namespaces=frozenset(n for n, ns in by_name.items() if ns.unique),
            derived=MappingProxyType({k: tuple(sorted(v)) for k, v in derived.items()}),
            blocked=MappingProxyType(blocked),
            max_lengths=MappingProxyType({n: ns.max_length for n, ns in by_name.items() if ns.max_length}),
        )

    def priority(self, namespace: str) -> int:
        ns = self.namespaces.get(namespace)
        return ns.priority if ns is not None else 0

    def on_violation(self, rule: str) -> ViolationMode:
        """What breaking `rule` (blocked_value, too_long, too_many) causes: dead-letter or drop-identity."""
        return self.hygiene.on_violation[rule]


_NS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_NS_REQUIRED = {"name", "kind", "priority", "normaliser"}
_NS_OPTIONAL = {"unique", "derived_from", "default_region", "max_length", "blocked_values"}
_TOP_REQUIRED = {"max_identities_per_graph", "namespaces"}
_TOP_OPTIONAL = {"phone", "hygiene", "default_country_code"}
_REGION = re.compile(r"^[A-Z]{2}$")


def load_identity_config(path: str | Path) -> IdentityConfig:
    """Load the namespaces YAML file; any problem is a ConfigError naming the file and line."""
    doc, node = compose_file(path)
    return _parse(doc, node)


def parse_identity_config(text: str, file: str = "<identity config>") -> IdentityConfig:
    """Parse namespaces YAML text (`file` is only used in error messages)."""
    return _parse(Doc(file), compose_text(text, file))


def _region(doc: Doc, node: yaml.Node, what: str) -> str:
    region = doc.string(node, what)
    if not _REGION.match(region) or not phone_region_valid(region):
        raise doc.error(f"{what}: unknown region {region[:16]!r}; a two-letter region code libphonenumber "
                        "knows, e.g. GB, US, DE, FR, IN, JP", node)
    return region


def _blocked_list(doc: Doc, node: yaml.Node, what: str) -> tuple[str, ...]:
    values: list[str] = []
    for item in doc.sequence(node, what):
        value = doc.scalar(item, f"{what} entry")
        # an unquoted null/0/-1/nan in YAML is not a string: say so rather than guess what was meant
        if not isinstance(value, str):
            raise doc.error(f"{what}: entries must be quoted strings (YAML reads {item.value!r} unquoted as "
                            f"{type(value).__name__})", item)
        values.append(value)
    return tuple(values)


def _default_region(doc: Doc, top: dict[str, tuple[yaml.Node, yaml.Node]]) -> str:
    """phone.default_region, or the region of the older top-level default_country_code (still read)."""
    if "default_country_code" in top:
        key_node, cc_node = top["default_country_code"]
        if "phone" in top:
            raise doc.error("default_country_code and phone are both set: keep only phone.default_region "
                            "(default_country_code is the older form of it)", key_node)
        cc = str(doc.scalar(cc_node, "default_country_code")).lstrip("+")
        if not cc.isdigit() or not 1 <= len(cc) <= 3 or cc[0] == "0":
            raise doc.error("default_country_code must be 1-3 digits, e.g. 1 or 44", cc_node)
        region = phonenumbers.region_code_for_country_code(int(cc))
        if region == phonenumbers.UNKNOWN_REGION:
            raise doc.error(f"default_country_code {cc} is no country's calling code; write "
                            "phone: {default_region: XX} instead", cc_node)
        return str(region)
    if "phone" not in top:
        return "US"
    node = top["phone"][1]
    fields = doc.mapping(node, "phone")
    doc.check_keys(fields, "phone", {"default_region"}, set(), node)
    return _region(doc, fields["default_region"][1], "phone.default_region")


def _hygiene(doc: Doc, top: dict[str, tuple[yaml.Node, yaml.Node]]) -> Hygiene:
    if "hygiene" not in top:
        return Hygiene()
    node = top["hygiene"][1]
    fields = doc.mapping(node, "hygiene")
    doc.check_keys(fields, "hygiene", set(), {"blocked_values", "on_violation"}, node)
    blocked = (_blocked_list(doc, fields["blocked_values"][1], "hygiene.blocked_values")
               if "blocked_values" in fields else DEFAULT_BLOCKED_VALUES)
    modes = dict(DEFAULT_ON_VIOLATION)
    if "on_violation" in fields:
        v_node = fields["on_violation"][1]
        v_fields = doc.mapping(v_node, "hygiene.on_violation")
        doc.check_keys(v_fields, "hygiene.on_violation", set(), set(DEFAULT_ON_VIOLATION), v_node)
        for rule, (_, mode_node) in v_fields.items():
            mode = doc.string(mode_node, f"hygiene.on_violation.{rule}")
            if mode not in VIOLATION_MODES:
                raise doc.error(f"hygiene.on_violation.{rule}: unknown mode {mode!r}; valid: "
                                f"{', '.join(VIOLATION_MODES)}", mode_node)
            modes[rule] = cast(ViolationMode, mode)
    return Hygiene(blocked, MappingProxyType(modes))


def _parse(doc: Doc, root: yaml.Node) -> IdentityConfig:
    top = doc.mapping(root, "identity config")
    doc.check_keys(top, "identity config", _TOP_REQUIRED, _TOP_OPTIONAL, root)
    max_ids = doc.integer(top["max_identities_per_graph"][1], "max_identities_per_graph", minimum=1)
    region = _default_region(doc, top)
    hygiene = _hygiene(doc, top)
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
        if ns.default_region is not None and ns.normaliser != "phone_e164":
            raise doc.error(f"namespace {ns.name!r}: default_region only applies to the phone_e164 "
                            f"normaliser, not {ns.normaliser}", fields["default_region"][0])
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
    return IdentityConfig.build(namespaces, max_ids, default_region=region, hygiene=hygiene, source=doc.file)


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
    region = (_region(doc, fields["default_region"][1], f"namespace {name!r}: default_region")
              if "default_region" in fields else None)
    max_length = (doc.integer(fields["max_length"][1], f"namespace {name!r}: max_length", minimum=1)
                  if "max_length" in fields else None)
    blocked = (_blocked_list(doc, fields["blocked_values"][1], f"namespace {name!r}: blocked_values")
               if "blocked_values" in fields else None)
    ns = Namespace(name, cast(NamespaceKind, kind), priority, unique, normaliser, derived_from,
                   region, max_length, blocked)
    return ns, name_node, fields


NORMALISED_CACHE_SIZE = 100_000


def _normalise_one(namespace: str, value: str, config: IdentityConfig) -> tuple[tuple[Identity, ...], Dropped | None]:
    """One raw (namespace, value): its identities (the normalised one and those derived from it), or why none."""
    normalisers = config.normalisers
    fn = normalisers.get(namespace)
    if fn is None:
        # Namespace names are config vocabulary, not personal data; cap length against garbage.
        return (), Dropped(UNKNOWN_NAMESPACE_LABEL, "unknown-namespace", f"unknown namespace {namespace[:64]!r}")
    blocked = config.blocked[namespace]
    if blocked_form(value) in blocked:
        return (), Dropped(namespace, "blocked-value", f"blocked {namespace} value: {BLOCKED_PHRASE}")
    ns = config.namespaces[namespace]
    try:
        if ns.derived_from is not None and not _HEX64.match(value.strip()):
            # A plain value sent in a derived namespace is canonicalised like its source first,
            # so it hashes to the same id as the derivation below.
            value = normalisers[ns.derived_from](value)
        norm = fn(value)
    except InvalidValue as exc:
        return (), Dropped(namespace, "invalid-value", f"invalid {namespace} value: {exc.reason}")
    if blocked_form(norm) in blocked:  # e.g. a phone number normalised onto a blocked one, a hashed "null"
        return (), Dropped(namespace, "blocked-value", f"blocked {namespace} value: {BLOCKED_PHRASE}")
    return (Identity(namespace, norm), *(Identity(target, normalisers[target](norm))
                                         for target in config.derived.get(namespace, ()))), None


BLOCKED_PHRASE = "a placeholder on the blocked_values list"


def normalise_identities_detailed(raw: Iterable[tuple[str, str]], config: IdentityConfig
                                  ) -> tuple[list[Identity], list[Dropped]]:
    """Normalise and de-duplicate (namespace, value) pairs, adding derived identities, leaving out invalid
    and blocked values and unknown namespaces.

    Returns the identities ordered by priority (highest first), then namespace, then id, plus what was left
    out and why (namespace and a fixed reason, never the value: personal data).
    """
    out: set[Identity] = set()
    dropped: list[Dropped] = []
    cache = config.cache
    for namespace, value in raw:
        hit = cache.get((namespace, value))
        if hit is None:
            if len(cache) >= NORMALISED_CACHE_SIZE:
                cache.clear()
            hit = cache[(namespace, value)] = _normalise_one(namespace, value, config)
        identities, drop = hit
        if drop is None:
            out.update(identities)
        else:
            dropped.append(drop)
    priority = config.priority
    return sorted(out, key=lambda i: (-priority(i.namespace), i.namespace, i.id)), dropped


def normalise_identities(raw: Iterable[tuple[str, str]], config: IdentityConfig
                         ) -> tuple[list[Identity], list[str]]:
    """`normalise_identities_detailed`, with what was left out as problem phrases (no values)."""
    identities, dropped = normalise_identities_detailed(raw, config)
    return identities, [d.detail for d in dropped]
