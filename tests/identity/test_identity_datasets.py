"""Tests of the datasets config loader and the merge-policy registry."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, UnknownNameError
from pipeline.identity.datasets import (
    DatasetPrecedencePolicy,
    EventHistory,
    TimestampPolicy,
    get_merge_policy_factory,
    load_datasets_config,
    parse_datasets_config,
)
from pipeline.resources import EXAMPLE_CONFIG_DIR

EXAMPLE = EXAMPLE_CONFIG_DIR / "datasets.yaml"

GOOD = """\
datasets:
  - {name: crm, schema: profile_record, enabled_for_profile: true}
  - {name: web-events, schema: experience_event}
  - {name: raw, schema: experience_event, enabled_for_profile: false}
merge_policy: {type: dataset_precedence, order: [crm, web-events]}
event_history: {max_events: 100, retention: 12h}
"""


def test_example_file_loads() -> None:
    # Given the shipped example / When loaded / Then all datasets, the policy and bounds are read
    config = load_datasets_config(EXAMPLE)
    assert {n: (d.schema, d.enabled_for_profile) for n, d in config.datasets.items()} == {
        "web-events": ("experience_event", True),
        "app-events": ("experience_event", True),
        "crm": ("profile_record", True),
        "loyalty": ("profile_record", True),
        "orders": ("experience_event", True),
        "marketing-raw": ("experience_event", False),
    }
    assert config.merge_policy == DatasetPrecedencePolicy(("crm", "loyalty", "orders", "app-events", "web-events"))
    assert config.event_history == EventHistory(max_events=5000, retention_ms=90 * 86_400_000)
    assert config.profile_enabled("crm") and not config.profile_enabled("marketing-raw")
    assert not config.profile_enabled("unknown")


def test_timestamp_policy_and_defaults() -> None:
    config = parse_datasets_config("datasets: [{name: a, schema: profile_record}]\nmerge_policy: {type: timestamp}\n")
    assert config.merge_policy == TimestampPolicy()
    assert config.event_history == EventHistory(5000, 90 * 86_400_000)
    assert config.datasets["a"].enabled_for_profile is True


@pytest.mark.parametrize(("text", "line", "fragment"), [
    (GOOD.replace("dataset_precedence", "newest"), 5,
     "unknown merge policy 'newest'; valid: dataset_precedence, timestamp"),
    (GOOD.replace("order: [crm, web-events]", "order: [crm, erp]"), 5, "unknown dataset 'erp'"),
    (GOOD.replace("order: [crm, web-events]", "order: [crm, crm]"), 5, "dataset 'crm' listed twice"),
    (GOOD.replace("schema: experience_event}", "schema: event}"), 3, "unknown schema 'event'"),
    (GOOD.replace("name: raw", "name: crm"), 4, "duplicate dataset 'crm'"),
    (GOOD.replace("retention: 12h", "retention: 12 hours"), 6, "must be a duration"),
    (GOOD.replace("max_events: 100", "max_events: -1"), 6, "must be >= 1"),
    (GOOD.replace("enabled_for_profile: false", "enabled_for_profile: no way"), 4, "true or false"),
    (GOOD.replace("{type: dataset_precedence, order: [crm, web-events]}", "{type: timestamp, order: [crm]}"), 5,
     "unknown key 'order'"),
    (GOOD.replace("{type: dataset_precedence, order: [crm, web-events]}", "{order: [crm]}"), 5,
     "missing key type"),
    (GOOD + "event_history: {}\n", 7, "duplicate key 'event_history'"),
])
def test_bad_config_names_file_line_and_problem(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_datasets_config(text, "datasets.yaml")
    assert (info.value.file, info.value.line) == ("datasets.yaml", line)
    assert fragment in info.value.problem


def test_merge_policy_registry_rejects_unknown_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_merge_policy_factory("random")
    assert info.value.valid == ["dataset_precedence", "timestamp"]
