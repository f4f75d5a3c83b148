"""A deliberately plain reference model of identity stitching, for property tests of the real one (an oracle
only the tests use, so it lives with them).

`reference_components` is the connected components of the link graph in which every record links
all of its identities. It does NOT model:

* unique-namespace conflicts: the real pipeline refuses (or splits) a merge that would put two ids
  of a unique namespace (e.g. two CRMIDs) into one profile; here such inputs raise
  `ReferenceConflict`, so tests should generate conflict-free inputs (see `has_unique_conflict`);
* the identity-graph size guardrail (`enforce_identity_limit` drops identities, which can stop later
  records from linking through them);
* normalisation, derived namespaces and unknown namespaces: inputs are already normalised;
* profile ids, which profile survives a merge, first-seen times, attributes and events;
* arrival order and concurrency: the components of a set of records do not depend on them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.identity.namespaces import IdentityConfig
from pipeline.model import Identity


class ReferenceConflict(ValueError):  # noqa: N818 - named after what the model refuses
    """The records would put two ids of one unique namespace into one component."""


def _components(records: Sequence[Sequence[Identity]]) -> list[frozenset[Identity]]:
    parent: dict[Identity, Identity] = {}

    def find(x: Identity) -> Identity:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for record in records:
        for ident in record:
            parent.setdefault(ident, ident)
        for other in record[1:]:
            ra, rb = find(record[0]), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[Identity, set[Identity]] = {}
    for ident in parent:
        groups.setdefault(find(ident), set()).add(ident)
    return sorted((frozenset(g) for g in groups.values()), key=lambda c: min(c))


def _conflicts(component: frozenset[Identity], config: IdentityConfig) -> list[str]:
    seen: dict[str, str] = {}
    bad: set[str] = set()
    for ident in component:
        if (ident.namespace in config.unique_namespaces
                and seen.setdefault(ident.namespace, ident.id) != ident.id):
            bad.add(ident.namespace)
    return sorted(bad)


def has_unique_conflict(records: Sequence[Sequence[Identity]], config: IdentityConfig) -> bool:
    """True if some component would hold two ids of a unique namespace."""
    return any(_conflicts(c, config) for c in _components(records))


def reference_components(records: Sequence[Sequence[Identity]], config: IdentityConfig
                         ) -> list[frozenset[Identity]]:
    """Connected components of the link graph, ordered by their smallest identity.

    Raises ReferenceConflict if a component holds two ids of a unique namespace (not modelled).
    """
    components = _components(records)
    for component in components:
        bad = _conflicts(component, config)
        if bad:
            raise ReferenceConflict(f"component would hold several ids in unique namespace(s) "
                                    f"{', '.join(bad)}")
    return components
