"""Pure, in-place profile updates: apply events and records, absorb a merged profile, guardrails.

Invariants kept on `ProfileState` (and relied on by the codec and the segment engine):

* `events` is sorted by (ts_ms, event_id) and holds each (ts_ms, event_id) once. Ordering by the
  pair, not by arrival, makes the history independent of delivery order; a replay carries the same
  timestamp, so de-duplication is a binary search, not a scan.
* An attribute whose winning value is None is kept as a tombstone `AttributeValue(None, ds, ts)`:
  without it an older value arriving after the deletion would resurrect the attribute, and the
  result would depend on delivery order. Use `live_attributes` for the visible values.
* Every function that changes the profile bumps `profile.seq` by exactly one; callers don't.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter

from pipeline.identity.namespaces import KIND_RANK
from pipeline.model import (
    AttributeValue,
    ExperienceEvent,
    Identity,
    ProfileRecord,
    ProfileState,
    Scalar,
    StoredEvent,
)
from pipeline.profiles.config import ProfileConfig

_EVENT_KEY = attrgetter("ts_ms", "event_id")
_EVENT_TS = attrgetter("ts_ms")

IdentityMap = Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class ChangeSummary:
    """What one update did to a profile, so the caller can decide persistence and re-evaluation."""

    changed: bool = False  # the state differs: persist it (seq was bumped)
    event_types_added: frozenset[str] = frozenset()  # types of events now in the history
    event_types_dropped: frozenset[str] = frozenset()  # types of events evicted by cap/retention
    attributes_changed: frozenset[str] = frozenset()  # paths whose visible value changed
    identities_added: tuple[Identity, ...] = ()  # sorted
    identities_removed: tuple[Identity, ...] = ()  # sorted
    events_added: int = 0
    events_dropped: int = 0
    duplicate: bool = False  # the event was already in the history (at-least-once replay)

    @property
    def needs_evaluation(self) -> bool:
        """True if segment membership may have changed (counts, attributes or identities moved)."""
        return bool(self.event_types_added or self.event_types_dropped or self.attributes_changed
                    or self.identities_added or self.identities_removed)


NO_CHANGE = ChangeSummary()
_NOTHING: frozenset[str] = frozenset()


def live_attributes(profile: ProfileState) -> dict[str, Scalar]:
    """The visible attribute values: tombstones (deleted attributes) left out."""
    return {k: v.value for k, v in profile.attributes.items() if v.value is not None}


def _add_identities(store: dict[str, dict[str, int]], identities: Iterable[Identity], ts: int,
                    added: list[Identity], sources: dict[str, str], dataset: str | None) -> bool:
    """Add identities with first-seen `ts` (an earlier sighting lowers first-seen); True if changed. The
    dataset (when known) of the sighting that sets first-seen goes to `sources`: only for a new or earlier
    identity, so a known identity seen again costs nothing more than before."""
    changed = False
    for ident in identities:
        ids = store.get(ident.namespace)
        if ids is None:
            store[ident.namespace] = {ident.id: ts}
            added.append(ident)
            changed = True
        else:
            seen = ids.get(ident.id)
            if seen is None:
                ids[ident.id] = ts
                added.append(ident)
                changed = True
            elif ts < seen:
                ids[ident.id] = ts
                changed = True
            else:
                continue
        if dataset is not None:
            sources[ident.key] = dataset
    return changed


def add_identity(profile: ProfileState, ident: Identity, ts: int, dataset: str | None = None) -> ChangeSummary:
    """List one identity (first seen at `ts`); a confirmed claim or a new profile's home identity. `dataset`:
    the record's that linked it (None: keep what its claim noted, or unknown)."""
    added: list[Identity] = []
    if not _add_identities(profile.identities, (ident,), ts, added, profile.identity_sources, dataset):
        return NO_CHANGE
    profile.seq += 1
    return ChangeSummary(changed=True, identities_added=tuple(added))


def _trim_events(events: list[StoredEvent], max_events: int, retention_ms: int) -> list[StoredEvent]:
    """Evict events older than retention (relative to the newest) and then the oldest over the cap."""
    if not events:
        return []
    dropped: list[StoredEvent] = []
    cutoff = events[-1].ts_ms - retention_ms
    if events[0].ts_ms < cutoff:
        idx = bisect_left(events, cutoff, key=_EVENT_TS)
        dropped = events[:idx]
        del events[:idx]
    excess = len(events) - max_events
    if excess > 0:
        dropped.extend(events[:excess])
        del events[:excess]
    return dropped


def apply_event(profile: ProfileState, event: ExperienceEvent, config: ProfileConfig) -> ChangeSummary:
    """Add the event's identities and store the event in the bounded, ordered history."""
    ts = event.timestamp_ms
    added: list[Identity] = []
    ids_changed = _add_identities(profile.identities, event.identities, ts, added, profile.identity_sources,
                                  event.dataset)
    history = config.datasets.event_history
    events = profile.events
    n = len(events)
    key = (ts, event.event_id)
    duplicate = False
    store = True
    if n == 0 or _EVENT_KEY(events[-1]) < key:  # the usual case: in order, append
        pos = n
    else:
        pos = bisect_left(events, key, key=_EVENT_KEY)
        if pos < n and events[pos].ts_ms == ts and events[pos].event_id == event.event_id:
            duplicate, store = True, False
    if store:
        newest = events[-1].ts_ms if n and events[-1].ts_ms > ts else ts
        # An event that the bounds would evict at once is not stored (same final state, no churn).
        if ts < newest - history.retention_ms or (pos == 0 and n >= history.max_events):
            store = False
    dropped: list[StoredEvent] = []
    if store:
        events.insert(pos, StoredEvent(event.event_id, event.event_type, ts, event.dataset,
                                       dict(event.fields)))
        if events[0].ts_ms < events[-1].ts_ms - history.retention_ms or n >= history.max_events:
            dropped = _trim_events(events, history.max_events, history.retention_ms)
    if not (store or ids_changed):
        return ChangeSummary(duplicate=True) if duplicate else NO_CHANGE
    profile.seq += 1
    # Empty-case shortcuts matter: this runs once per ingested event.
    return ChangeSummary(
        changed=True,
        event_types_added=frozenset((event.event_type,)) if store else _NOTHING,
        event_types_dropped=frozenset([e.event_type for e in dropped]) if dropped else _NOTHING,
        identities_added=tuple(sorted(added)) if added else (),
        events_added=1 if store else 0,
        events_dropped=len(dropped),
        duplicate=duplicate,
    )


def _visible_change(old: Scalar, new: Scalar) -> bool:
    # 1 == 1.0 == True in Python, but they are different attribute values to a segment query.
    return old != new or type(old) is not type(new)


def apply_record(profile: ProfileState, record: ProfileRecord, config: ProfileConfig) -> ChangeSummary:
    """Add the record's identities and upsert its attributes per the merge policy (None deletes)."""
    ts = record.timestamp_ms
    ds = record.dataset
    added: list[Identity] = []
    changed = _add_identities(profile.identities, record.identities, ts, added, profile.identity_sources, ds)
    beats = config.datasets.merge_policy.beats
    attrs = profile.attributes
    paths: set[str] = set()
    for path, value in record.attributes.items():
        cur = attrs.get(path)
        if cur is None:
            attrs[path] = AttributeValue(value, ds, ts)
            changed = True
            if value is not None:
                paths.add(path)
        elif beats(value, ds, ts, cur.value, cur.dataset, cur.ts_ms):
            attrs[path] = AttributeValue(value, ds, ts)
            changed = True
            if _visible_change(cur.value, value):
                paths.add(path)
    if not changed:
        return NO_CHANGE
    profile.seq += 1
    return ChangeSummary(changed=True, attributes_changed=frozenset(paths),
                         identities_added=tuple(sorted(added)))


def absorb(survivor: ProfileState, merged_away: ProfileState, config: ProfileConfig) -> ChangeSummary:
    """Merge `merged_away` into `survivor`: identities, attributes and events; not memberships.

    Memberships and next_deadline_ms stay the survivor's: the segment engine re-evaluates it.
    `merged_away` must be discarded afterwards (its event objects are shared, not copied).
    """
    changed = False
    added: list[Identity] = []
    store = survivor.identities
    # each identity keeps its earliest (first-seen, dataset); a dataset not known on the earlier side keeps the other's
    theirs, mine_src = merged_away.identity_sources, survivor.identity_sources
    for ns, ids in merged_away.identities.items():
        mine = store.get(ns)
        if mine is None:
            mine = store[ns] = {}
        for i, ts in ids.items():
            seen = mine.get(i)
            if seen is not None and ts >= seen:
                continue
            mine[i] = ts
            changed = True
            if seen is None:
                added.append(Identity(ns, i))
            if (src := theirs.get(key := f"{ns}:{i}")) is not None:
                mine_src[key] = src
        if not mine:
            del store[ns]
    for key in merged_away.claims:  # its pending claims move here too (the caller merges them)
        if key in theirs:
            mine_src.setdefault(key, theirs[key])

    beats = config.datasets.merge_policy.beats
    attrs = survivor.attributes
    paths: set[str] = set()
    for path, av in merged_away.attributes.items():
        cur = attrs.get(path)
        if cur is None:
            attrs[path] = AttributeValue(av.value, av.dataset, av.ts_ms)
            changed = True
            if av.value is not None:
                paths.add(path)
        elif beats(av.value, av.dataset, av.ts_ms, cur.value, cur.dataset, cur.ts_ms):
            attrs[path] = AttributeValue(av.value, av.dataset, av.ts_ms)
            changed = True
            if _visible_change(cur.value, av.value):
                paths.add(path)

    new_events: list[StoredEvent] = []
    dropped: list[StoredEvent] = []
    if merged_away.events:
        merged, new_events = _merge_events(survivor.events, merged_away.events)
        history = config.datasets.event_history
        dropped = _trim_events(merged, history.max_events, history.retention_ms)
        if dropped:
            gone = {id(e) for e in dropped}
            new_events = [e for e in new_events if id(e) not in gone]
            # Only evictions of events the survivor already had matter to its re-evaluation.
            had = {id(e) for e in survivor.events}
            dropped = [e for e in dropped if id(e) in had]
        if new_events or dropped:
            survivor.events = merged
            changed = True

    if merged_away.created_ms < survivor.created_ms:
        survivor.created_ms = merged_away.created_ms
        changed = True
    if not changed:
        return NO_CHANGE
    survivor.seq += 1
    return ChangeSummary(
        changed=True,
        event_types_added=frozenset(e.event_type for e in new_events),
        event_types_dropped=frozenset(e.event_type for e in dropped),
        attributes_changed=frozenset(paths),
        identities_added=tuple(sorted(added)),
        events_added=len(new_events),
        events_dropped=len(dropped),
    )


def _merge_events(a: list[StoredEvent], b: list[StoredEvent]) -> tuple[list[StoredEvent], list[StoredEvent]]:
    """Merge two (ts, id)-sorted histories without duplicates; also return b's events new to a."""
    out: list[StoredEvent] = []
    new: list[StoredEvent] = []
    i = j = 0
    na, nb = len(a), len(b)
    while i < na and j < nb:
        ka, kb = _EVENT_KEY(a[i]), _EVENT_KEY(b[j])
        if ka < kb:
            out.append(a[i])
            i += 1
        elif kb < ka:
            out.append(b[j])
            new.append(b[j])
            j += 1
        else:
            out.append(a[i])
            i += 1
            j += 1
    out.extend(a[i:])
    if j < nb:
        out.extend(b[j:])
        new.extend(b[j:])
    return out, new


def _identity_map(side: ProfileState | IdentityMap | Iterable[Identity]) -> IdentityMap:
    if isinstance(side, ProfileState):
        return side.identities
    if isinstance(side, Mapping):
        return side
    out: dict[str, dict[str, int]] = {}
    for ident in side:
        out.setdefault(ident.namespace, {})[ident.id] = 0
    return out


def unique_conflicts(a: ProfileState | IdentityMap,
                     b_identities: ProfileState | IdentityMap | Iterable[Identity],
                     config: ProfileConfig) -> list[str]:
    """Unique namespaces (e.g. CRMID) in which both sides hold ids and the ids differ, sorted.

    A non-empty answer means a merge would collapse two different customers into one.
    """
    unique = config.identity.unique_namespaces
    if not unique:
        return []
    a_map = _identity_map(a)
    b_map = _identity_map(b_identities)
    out: list[str] = []
    for ns in sorted(unique):
        x = a_map.get(ns)
        y = b_map.get(ns)
        if x and y and x.keys() != y.keys():
            out.append(ns)
    return out


def enforce_identity_limit(profile: ProfileState, config: ProfileConfig) -> list[Identity]:
    """Remove identities beyond max_identities_per_graph; returns the removed ones, sorted.

    Order of removal: namespace kind (cookie, then device, then person), then namespace priority
    (lowest first), then first-seen (oldest first). Namespaces no longer configured go first.
    """
    limit = config.identity.max_identities_per_graph
    store = profile.identities
    total = sum(len(ids) for ids in store.values())
    if total <= limit:
        return []
    namespaces = config.identity.namespaces
    candidates: list[tuple[int, int, int, str, str]] = []
    for ns, ids in store.items():
        conf = namespaces.get(ns)
        rank, prio = (KIND_RANK[conf.kind], conf.priority) if conf is not None else (-1, -(2**62))
        candidates.extend((rank, prio, ts, ns, i) for i, ts in ids.items())
    candidates.sort()
    removed: list[Identity] = []
    sources = profile.identity_sources
    for _rank, _prio, _ts, ns, i in candidates[: total - limit]:
        ids = store[ns]
        del ids[i]
        if not ids:
            del store[ns]
        ident = Identity(ns, i)
        if ident.key not in profile.claims:  # (a claim of it pending again keeps its dataset)
            sources.pop(ident.key, None)
        removed.append(ident)
    profile.seq += 1
    removed.sort()
    return removed
