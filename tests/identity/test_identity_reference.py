"""Tests of the reference stitching model, and of the real merge logic against it (hypothesis)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.identity.datasets import parse_datasets_config
from pipeline.identity.namespaces import parse_identity_config
from pipeline.model import ExperienceEvent, Identity, ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import absorb, apply_event, unique_conflicts

from .reference import ReferenceConflict, has_unique_conflict, reference_components

IDENTITY = parse_identity_config("""\
max_identities_per_graph: 1000
namespaces:
  - {name: ECID, kind: cookie, priority: 10, normaliser: trim}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}
""")
CONFIG = ProfileConfig(IDENTITY, parse_datasets_config(
    "datasets: [{name: web, schema: experience_event}]\nmerge_policy: {type: timestamp}\n"))

E1, E2, E3 = Identity("ECID", "1"), Identity("ECID", "2"), Identity("ECID", "3")
M, C1, C2 = Identity("Email", "m@x"), Identity("CRMID", "1"), Identity("CRMID", "2")


def test_components_join_transitively_and_keep_singletons() -> None:
    # Given records linking 1-m and m-2, and a lone 3
    records = [[E1, M], [M, E2], [E3]]
    # Then 1, 2 and m form one component, 3 another
    assert reference_components(records, IDENTITY) == [frozenset({E1, E2, M}), frozenset({E3})]


def test_unique_conflicts_are_refused_not_modelled() -> None:
    records = [[E1, C1], [E1, C2]]
    assert has_unique_conflict(records, IDENTITY)
    with pytest.raises(ReferenceConflict):
        reference_components(records, IDENTITY)


def _stitch(records: Sequence[Sequence[Identity]]) -> list[frozenset[Identity]]:
    """A tiny single-process stitcher built from the real merge functions, as the agents use them."""
    table: dict[Identity, str] = {}
    profiles: dict[str, ProfileState] = {}
    for n, record in enumerate(records):
        owners = sorted({table[i] for i in record if i in table})
        if not owners:
            pid = f"p{n:05d}"
            profiles[pid] = ProfileState(pid, n)
        else:
            pid = owners[0]  # the oldest profile survives
            for other in owners[1:]:
                assert unique_conflicts(profiles[pid], profiles[other], CONFIG) == []
                absorb(profiles[pid], profiles.pop(other), CONFIG)
        apply_event(profiles[pid], ExperienceEvent(f"e{n}", n, "t", "web", tuple(record), None), CONFIG)
        for ident in profiles[pid].identity_list():
            table[ident] = pid
    return sorted((frozenset(p.identity_list()) for p in profiles.values()), key=lambda c: min(c))


identities = st.sampled_from([E1, E2, E3, M, Identity("Email", "n@x"), C1, C2])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(identities, min_size=1, max_size=3), max_size=10))
def test_real_merges_match_the_reference_components(records: list[list[Identity]]) -> None:
    assume(not has_unique_conflict(records, IDENTITY))
    assert _stitch(records) == reference_components(records, IDENTITY)
