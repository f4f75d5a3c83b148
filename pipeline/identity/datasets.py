"""Datasets config: which sources feed profiles, the attribute merge policy and event-history bounds."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol, cast

import yaml

from pipeline.errors import UnknownNameError
from pipeline.model import Scalar
from pipeline.yamlconf import Doc, compose_file, compose_text

SchemaKind = Literal["experience_event", "profile_record"]
SCHEMAS: tuple[SchemaKind, ...] = ("experience_event", "profile_record")

_TYPE_RANK = {type(None): 0, bool: 1, int: 2, float: 3, str: 4}


def value_tiebreak(value: Scalar) -> tuple[int, str]:
    """A total order on scalars, used only when dataset and timestamp tie, so merges stay order-free."""
    return _TYPE_RANK.get(type(value), 5), repr(value)


class MergePolicy(Protocol):
    """Decides which of two attribute candidates (value, dataset, ts) wins; must be a total order."""

    @property
    def name(self) -> str:
        """The registry name of the policy."""
        ...

    def beats(self, value: Scalar, dataset: str, ts_ms: int,
              cur_value: Scalar, cur_dataset: str, cur_ts_ms: int) -> bool:
        """True if the candidate strictly beats the current value."""
        ...


@dataclass(frozen=True)
class TimestampPolicy:
    """Newest timestamp wins; on a tie the alphabetically first dataset wins, then the value order."""

    name: str = "timestamp"

    def beats(self, value: Scalar, dataset: str, ts_ms: int,
              cur_value: Scalar, cur_dataset: str, cur_ts_ms: int) -> bool:
        if ts_ms != cur_ts_ms:
            return ts_ms > cur_ts_ms
        if dataset != cur_dataset:
            return dataset < cur_dataset
        return value_tiebreak(value) > value_tiebreak(cur_value)


@dataclass(frozen=True)
class DatasetPrecedencePolicy:
    """A dataset earlier in `order` wins regardless of time; within one dataset the newest wins.

    Datasets not listed rank below all listed ones and compare among themselves like the timestamp
    policy, so the order stays total.
    """

    order: tuple[str, ...]
    name: str = "dataset_precedence"
    _rank: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rank", {d: i for i, d in enumerate(self.order)})

    def beats(self, value: Scalar, dataset: str, ts_ms: int,
              cur_value: Scalar, cur_dataset: str, cur_ts_ms: int) -> bool:
        if dataset != cur_dataset:
            rank = self._rank
            lowest = len(self.order)
            r, cr = rank.get(dataset, lowest), rank.get(cur_dataset, lowest)
            if r != cr:
                return r < cr
        if ts_ms != cur_ts_ms:
            return ts_ms > cur_ts_ms
        if dataset != cur_dataset:
            return dataset < cur_dataset
        return value_tiebreak(value) > value_tiebreak(cur_value)


@dataclass(frozen=True)
class Dataset:
    """One configured dataset."""

    name: str
    schema: SchemaKind
    enabled_for_profile: bool


@dataclass(frozen=True)
class EventHistory:
    """Bounds of the per-profile event history."""

    max_events: int = 5000
    retention_ms: int = 90 * 86_400_000


@dataclass(frozen=True)
class Limits:
    """Sizes that could otherwise grow without bound, checked before anything is written: a record over a
    limit is dead-lettered with its reason; a profile over its byte budget drops its oldest events (as the
    reference platform drops events over 10 KB and profiles over 100 KB). Each stays well under Kafka's
    default 1 MB message limit, with room for the hops that carry a record."""

    max_record_bytes: int = 64 * 1024
    max_identities_per_record: int = 20
    max_identity_length: int = 256
    max_profile_bytes: int = 256 * 1024


_LIMIT_KEYS = ("max_record_bytes", "max_identities_per_record", "max_identity_length", "max_profile_bytes")


@dataclass(frozen=True)
class DatasetsConfig:
    """All datasets, the merge policy, the event-history bounds and the size limits."""

    datasets: Mapping[str, Dataset]
    merge_policy: MergePolicy
    event_history: EventHistory = EventHistory()
    source: str | None = None
    limits: Limits = Limits()

    def profile_enabled(self, dataset: str) -> bool:
        """True if records of `dataset` may change profiles (unknown datasets may not)."""
        ds = self.datasets.get(dataset)
        return ds is not None and ds.enabled_for_profile


# Each factory gets the document, the merge_policy mapping (minus `type`) and the dataset names.
PolicyFactory = Callable[[Doc, dict[str, tuple[yaml.Node, yaml.Node]], yaml.Node, Mapping[str, Dataset]],
                         MergePolicy]


def _timestamp_factory(doc: Doc, fields: dict[str, tuple[yaml.Node, yaml.Node]], node: yaml.Node,
                       datasets: Mapping[str, Dataset]) -> MergePolicy:
    doc.check_keys(fields, "merge_policy (timestamp)", set(), set(), node)
    return TimestampPolicy()


def _precedence_factory(doc: Doc, fields: dict[str, tuple[yaml.Node, yaml.Node]], node: yaml.Node,
                        datasets: Mapping[str, Dataset]) -> MergePolicy:
    doc.check_keys(fields, "merge_policy (dataset_precedence)", {"order"}, set(), node)
    order: list[str] = []
    for item in doc.sequence(fields["order"][1], "merge_policy.order"):
        name = doc.string(item, "merge_policy.order entry")
        if name not in datasets:
            raise doc.error(f"merge_policy.order: unknown dataset {name!r}; valid: "
                            f"{', '.join(sorted(datasets))}", item)
        if name in order:
            raise doc.error(f"merge_policy.order: dataset {name!r} listed twice", item)
        order.append(name)
    if not order:
        raise doc.error("merge_policy.order must list at least one dataset", fields["order"][1])
    return DatasetPrecedencePolicy(tuple(order))


MERGE_POLICIES: Mapping[str, PolicyFactory] = MappingProxyType({
    "timestamp": _timestamp_factory,
    "dataset_precedence": _precedence_factory,
})


def get_merge_policy_factory(name: str) -> PolicyFactory:
    """The merge policy factory registered under `name`; UnknownNameError lists the valid names."""
    factory = MERGE_POLICIES.get(name)
    if factory is None:
        raise UnknownNameError("merge policy", name, list(MERGE_POLICIES))
    return factory


_DS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def load_datasets_config(path: str | Path) -> DatasetsConfig:
    """Load the datasets YAML file; any problem is a ConfigError naming the file and line."""
    doc, node = compose_file(path)
    return _parse(doc, node)


def parse_datasets_config(text: str, file: str = "<datasets config>") -> DatasetsConfig:
    """Parse datasets YAML text (`file` is only used in error messages)."""
    return _parse(Doc(file), compose_text(text, file))


def _parse(doc: Doc, root: yaml.Node) -> DatasetsConfig:
    top = doc.mapping(root, "datasets config")
    doc.check_keys(top, "datasets config", {"datasets", "merge_policy"}, {"event_history", "limits"}, root)
    datasets: dict[str, Dataset] = {}
    for item in doc.sequence(top["datasets"][1], "datasets"):
        fields = doc.mapping(item, "dataset")
        doc.check_keys(fields, "dataset", {"name", "schema"}, {"enabled_for_profile"}, item)
        name_node = fields["name"][1]
        name = doc.string(name_node, "dataset name")
        if not _DS_NAME.match(name):
            raise doc.error(f"dataset name {name!r} may only hold letters, digits, '_', '-', '.'",
                            name_node)
        if name in datasets:
            raise doc.error(f"duplicate dataset {name!r}", name_node)
        schema_node = fields["schema"][1]
        schema = doc.string(schema_node, f"dataset {name!r}: schema")
        if schema not in SCHEMAS:
            raise doc.error(f"dataset {name!r}: unknown schema {schema!r}; valid: "
                            f"{', '.join(SCHEMAS)}", schema_node)
        enabled = (doc.boolean(fields["enabled_for_profile"][1], f"dataset {name!r}: enabled_for_profile")
                   if "enabled_for_profile" in fields else True)
        datasets[name] = Dataset(name, cast(SchemaKind, schema), enabled)
    if not datasets:
        raise doc.error("datasets must list at least one dataset", top["datasets"][1])

    policy_node = top["merge_policy"][1]
    policy_fields = doc.mapping(policy_node, "merge_policy")
    if "type" not in policy_fields:
        raise doc.error("merge_policy: missing key type", policy_node)
    type_node = policy_fields.pop("type")[1]
    policy_type = doc.string(type_node, "merge_policy.type")
    try:
        factory = get_merge_policy_factory(policy_type)
    except UnknownNameError as exc:
        raise doc.error(str(exc), type_node) from exc
    policy = factory(doc, policy_fields, policy_node, datasets)

    history = EventHistory()
    if "event_history" in top:
        h_node = top["event_history"][1]
        h_fields = doc.mapping(h_node, "event_history")
        doc.check_keys(h_fields, "event_history", set(), {"max_events", "retention"}, h_node)
        history = EventHistory(
            max_events=(doc.integer(h_fields["max_events"][1], "event_history.max_events", minimum=1)
                        if "max_events" in h_fields else history.max_events),
            retention_ms=(doc.duration_ms(h_fields["retention"][1], "event_history.retention")
                          if "retention" in h_fields else history.retention_ms),
        )
    limits = Limits()
    if "limits" in top:
        l_node = top["limits"][1]
        l_fields = doc.mapping(l_node, "limits")
        doc.check_keys(l_fields, "limits", set(), set(_LIMIT_KEYS), l_node)
        limits = Limits(**{k: doc.integer(l_fields[k][1], f"limits.{k}", minimum=1)
                           for k in _LIMIT_KEYS if k in l_fields})
    return DatasetsConfig(MappingProxyType(datasets), policy, history, doc.file, limits)
