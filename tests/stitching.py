"""Generated customers for stitching tests, and the plain reference their stitched graph is checked against.

A world is people with their own identities (a CRM id for most, an e-mail, devices, cookies), households of
people with CRM ids who share a browser cookie, and records that reveal the links late and in shuffled
order: each person's identities are linked through their own records (a chain plus extras), every household
member logs in on the shared cookie with their CRM id, cookies are also seen alone (anonymous browsing), and
a few hostile records carry two people's CRM ids. Used at the handler level (tests/identity/stitch_sim.py)
and through the broker (tests/integration/), with the same checks.

The reference, plainly: one profile per person holding exactly that person's own identities, plus each shared
cookie with exactly one of its household (the first to link it: any one is right); no profile holds two ids
of a unique namespace; each record's event is stored once, in the profile holding its home identity (its CRM
id when it has one: a household login is that person's event, whatever profile has the cookie).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

from pipeline.identity.datasets import parse_datasets_config
from pipeline.identity.namespaces import parse_identity_config
from pipeline.identity.stitch import home_key
from pipeline.model import Identity
from pipeline.profiles.config import ProfileConfig
from pipeline.state.snapshot import GraphSnapshot

UNIQUE = frozenset({"CRMID"})
# the namespaces the generated customers use (CRMID unique), for the protocol tests' handlers
CONFIG = ProfileConfig(parse_identity_config("""\
max_identities_per_graph: 1000
namespaces:
  - {name: ECID, kind: cookie, priority: 10, normaliser: trim}
  - {name: GAID, kind: device, priority: 20, normaliser: lower}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}
"""), parse_datasets_config("""\
datasets: [{name: web-events, schema: experience_event}, {name: crm, schema: profile_record}]
merge_policy: {type: timestamp}
"""))


@dataclass(frozen=True)
class Person:
    name: str
    own: tuple[Identity, ...]  # identities no one else has

    @property
    def crmid(self) -> Identity | None:
        return next((i for i in self.own if i.namespace == "CRMID"), None)


@dataclass(frozen=True)
class Rec:
    rid: str
    ids: tuple[Identity, ...]  # ordered by priority, as ingest orders them
    kind: str = "e"  # e: event, p: profile record
    hostile: bool = False  # two people's CRM ids: ingest dead-letters it

    def home(self, unique: Collection[str] = UNIQUE) -> Identity:
        return Identity.from_key(home_key([i.key for i in self.ids], unique))


@dataclass(frozen=True)
class World:
    persons: tuple[Person, ...]
    shared: dict[Identity, tuple[str, ...]]  # household cookie -> the people sharing it
    records: tuple[Rec, ...]  # in arrival order

    @property
    def identities(self) -> set[Identity]:
        return {i for p in self.persons for i in p.own} | set(self.shared)


_PRIORITY = {"CRMID": 100, "Email": 60, "GAID": 20, "ECID": 10}


def _ordered(ids: Collection[Identity]) -> tuple[Identity, ...]:
    return tuple(sorted(set(ids), key=lambda i: (-_PRIORITY[i.namespace], i.namespace, i.id)))


def generate_world(rng: random.Random, people: int, *, tag: str = "", households: float = 0.3,
                   hostile: float = 0.02, anonymous: float = 0.5) -> World:
    """`people` people; about `households` of those with a CRM id share a cookie with another one."""
    persons: list[Person] = []
    records: list[Rec] = []
    n = 0

    def rec(ids: Collection[Identity], kind: str = "e", bad: bool = False) -> None:
        nonlocal n
        records.append(Rec(f"{tag}r{n}", _ordered(ids), kind, bad))
        n += 1

    for i in range(people):
        own: list[Identity] = []
        if rng.random() < 0.8:
            own.append(Identity("CRMID", f"{tag}C{i}"))
        if rng.random() < 0.7:
            own.append(Identity("Email", f"{tag}p{i}@x.io"))
        if rng.random() < 0.3:
            own.append(Identity("GAID", f"{tag}g{i}"))
        own.extend(Identity("ECID", f"{tag}c{i}-{j}") for j in range(rng.randint(1, 3)))
        persons.append(Person(f"p{i}", tuple(own)))
        order = rng.sample(own, len(own))
        for a, b in zip(order, order[1:], strict=False):  # a chain links them all
            extra = [rng.choice(own)] if rng.random() < 0.3 else []
            rec([a, b, *extra], "p" if "CRMID" in (a.namespace, b.namespace) and rng.random() < 0.3 else "e")
        for _ in range(rng.randint(0 if len(own) > 1 else 1, 2)):  # late links and lone sightings
            rec(rng.sample(own, min(len(own), rng.randint(1, 2))))
    with_crm = [p for p in persons if p.crmid is not None]
    rng.shuffle(with_crm)
    shared: dict[Identity, tuple[str, ...]] = {}
    pairs = int(len(with_crm) * households / 2)
    for h in range(pairs):
        members = with_crm[2 * h:2 * h + 2 + (1 if rng.random() < 0.2 and 2 * h + 2 < len(with_crm) else 0)]
        cookie = Identity("ECID", f"{tag}h{h}")
        shared[cookie] = tuple(m.name for m in members)
        for m in members:  # each member logs in on the shared browser
            assert m.crmid is not None
            extra = [rng.choice(m.own)] if rng.random() < 0.3 else []
            rec([m.crmid, cookie, *extra])
        for _ in range(rng.randint(0, 2) if rng.random() < anonymous else 0):
            rec([cookie])
    for _ in range(int(len(with_crm) * hostile)):
        a, b = rng.sample(with_crm, 2)
        assert a.crmid is not None and b.crmid is not None
        rec([a.crmid, b.crmid], bad=True)
    rng.shuffle(records)
    return World(tuple(persons), shared, tuple(records))


@dataclass
class Report:
    """What the checks found; `problems` is empty when the graph is right."""

    identities: int = 0
    right: int = 0  # identities in the profile of the person they belong to (or of a household member)
    wrong_merges: int = 0  # profiles holding two people's own identities
    splits: int = 0  # people whose own identities are in more than one profile
    on_two_profiles: int = 0  # identities listed on more than one live profile
    unique_conflicts: int = 0  # profiles holding two ids of a unique namespace
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"identities {self.right}/{self.identities} in the right profile, wrong merges {self.wrong_merges}, "
                f"splits {self.splits}, identities on two profiles {self.on_two_profiles}, "
                f"unique conflicts {self.unique_conflicts}")


def check_world(world: World, snap: GraphSnapshot, *, include_hostile_events: bool = True) -> Report:
    """Compare the stitched graph (whole-graph snapshot after quiescence) with the reference above."""
    rep = Report()
    problems = rep.problems
    owner_of_person: dict[str, set[str]] = {}
    person_of: dict[Identity, str] = {i: p.name for p in world.persons for i in p.own}
    listed: dict[Identity, list[str]] = {}
    for pid, prof in snap.profiles.items():
        for ident in prof.identity_list():
            listed.setdefault(ident, []).append(pid)
        for ns, ids in prof.identities.items():
            if ns in UNIQUE and len(ids) > 1:
                rep.unique_conflicts += 1
                problems.append(f"profile {pid} holds {len(ids)} {ns} ids")
        if prof.claims or prof.merging or prof.held:
            problems.append(f"profile {pid} not settled: claims {prof.claim_list()}, merging {prof.merging}, "
                            f"{len(prof.held)} held")
    for ident in sorted(world.identities):
        rep.identities += 1
        owner = snap.owner(ident.key)
        holders = listed.get(ident, [])
        if len(holders) > 1:
            rep.on_two_profiles += 1
            problems.append(f"{ident.key} listed on {holders}")
        if owner is None or owner not in snap.profiles:
            problems.append(f"{ident.key}: no live owner (table: {snap.identities.get(ident.key)})")
            continue
        if holders != [owner]:
            problems.append(f"{ident.key}: owner {owner} but listed on {holders}")
        if ident in person_of:
            owner_of_person.setdefault(person_of[ident], set()).add(owner)
    people_in: dict[str, set[str]] = {}
    for name, owners in owner_of_person.items():
        if len(owners) > 1:
            rep.splits += 1
            problems.append(f"person {name} split over {sorted(owners)}")
        for o in owners:
            people_in.setdefault(o, set()).add(name)
    for pid, names in people_in.items():
        if len(names) > 1:
            rep.wrong_merges += 1
            problems.append(f"profile {pid} holds the identities of {sorted(names)}")
    for ident in sorted(world.identities):
        owner = snap.owner(ident.key)
        if ident in person_of:
            ok = owner is not None and owner_of_person.get(person_of[ident]) == {owner}
        else:
            ok = owner is not None and bool(people_in.get(owner, set()) & set(world.shared[ident]))
            if not ok:
                problems.append(f"shared cookie {ident.key} is with {owner}, not with one of {world.shared[ident]}")
        rep.right += ok
    if len(snap.profiles) != len(world.persons):
        problems.append(f"{len(snap.profiles)} live profiles for {len(world.persons)} people")
    seen = Counter(e.event_id for p in snap.profiles.values() for e in p.events)
    for r in world.records:
        if r.kind != "e" or (r.hostile and not include_hostile_events):
            continue
        home_owner = snap.owner(r.home().key)
        if seen[r.rid] != 1:
            problems.append(f"event {r.rid} stored {seen[r.rid]} times")
        elif home_owner is None or r.rid not in {e.event_id for e in snap.profiles[home_owner].events}:
            problems.append(f"event {r.rid} is not in the profile of its home identity {r.home().key}")
    return rep
