"""Factory fixtures for profile tests: configs, events, records and profiles."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.identity.datasets import parse_datasets_config
from pipeline.identity.namespaces import parse_identity_config
from pipeline.model import ExperienceEvent, Identity, ProfileRecord, ProfileState, Scalar
from pipeline.profiles.config import ProfileConfig

IDENTITY_YAML = """\
max_identities_per_graph: {max_ids}
namespaces:
  - {{name: ECID, kind: cookie, priority: 10, normaliser: trim}}
  - {{name: GAID, kind: device, priority: 20, normaliser: lower}}
  - {{name: IDFA, kind: device, priority: 20, normaliser: upper}}
  - {{name: Email, kind: person, priority: 60, normaliser: email}}
  - {{name: Phone, kind: person, priority: 50, normaliser: phone_e164}}
  - {{name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}}
"""

DATASETS_YAML = """\
datasets:
  - {{name: crm, schema: profile_record}}
  - {{name: loyalty, schema: profile_record}}
  - {{name: orders, schema: experience_event}}
  - {{name: web-events, schema: experience_event}}
merge_policy: {policy}
event_history: {{max_events: {max_events}, retention: {retention}}}
"""

POLICIES = {
    "timestamp": "{type: timestamp}",
    "precedence": "{type: dataset_precedence, order: [crm, loyalty, orders]}",
}


@functools.lru_cache(maxsize=64)  # configs are frozen; parsing YAML per hypothesis example is slow
def build_config(policy: str = "timestamp", max_events: int = 5000, retention: str = "90d",
                 max_ids: int = 50) -> ProfileConfig:
    return ProfileConfig(
        parse_identity_config(IDENTITY_YAML.format(max_ids=max_ids)),
        parse_datasets_config(DATASETS_YAML.format(policy=POLICIES[policy], max_events=max_events,
                                                   retention=retention)),
    )


@pytest.fixture
def make_config() -> Callable[..., ProfileConfig]:
    """Factory: a ProfileConfig with the given policy ('timestamp'/'precedence') and bounds."""
    return build_config


def new_event(event_id: str = "e1", ts: int = 1_000, event_type: str = "web.pageview",
              dataset: str = "web-events", identities: tuple[Identity, ...] = (Identity("ECID", "c1"),),
              fields: dict[str, Scalar] | None = None) -> ExperienceEvent:
    return ExperienceEvent(event_id, ts, event_type, dataset, identities,
                           identities[0] if identities else None, fields or {})


@pytest.fixture
def make_event() -> Callable[..., ExperienceEvent]:
    """Factory: an ExperienceEvent with defaults for everything not given."""
    return new_event


def new_record(ts: int = 1_000, dataset: str = "crm", attributes: dict[str, Scalar] | None = None,
               identities: tuple[Identity, ...] = (Identity("CRMID", "42"),),
               record_id: str = "r1") -> ProfileRecord:
    return ProfileRecord(record_id, ts, dataset, identities, identities[0] if identities else None,
                         attributes or {})


@pytest.fixture
def make_record() -> Callable[..., ProfileRecord]:
    """Factory: a ProfileRecord with defaults for everything not given."""
    return new_record


def new_profile(profile_id: str = "p1", created_ms: int = 0, **kwargs: Any) -> ProfileState:
    return ProfileState(profile_id, created_ms, **kwargs)


@pytest.fixture
def make_profile() -> Callable[..., ProfileState]:
    """Factory: an empty ProfileState."""
    return new_profile
