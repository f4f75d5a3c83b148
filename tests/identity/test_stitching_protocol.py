"""The stitching protocol at the level of its handlers: generated customers, chosen interleavings and crashes,
checked against the plain reference in tests/stitching.py (no Kafka: see tests/identity/stitch_sim.py)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stitch_sim import StitchSim
from stitching import Person, Rec, World, check_world, generate_world

from pipeline.identity.datasets import parse_datasets_config
from pipeline.identity.namespaces import parse_identity_config
from pipeline.model import Identity
from pipeline.profiles.config import ProfileConfig

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

A, B = Identity("CRMID", "A"), Identity("CRMID", "B")
K = Identity("ECID", "household")
CA, CB = Identity("ECID", "a1"), Identity("ECID", "b1")


def run(world: World, seed: int, crash_rate: float = 0.0, fast_path: bool = True) -> StitchSim:
    sim = StitchSim(CONFIG, fast_path=fast_path)
    sim.run(world.records, random.Random(seed), crash_rate=crash_rate)
    return sim


def assert_right(world: World, sim: StitchSim) -> None:
    rep = check_world(world, sim.snapshot())
    assert not rep.problems, f"{rep.line()}\n" + "\n".join(rep.problems[:30])


HOUSEHOLD = World(
    persons=(Person("a", (A, CA)), Person("b", (B, CB))),
    shared={K: ("a", "b")},
    records=(Rec("r0", (A, CA)), Rec("r1", (B, CB)), Rec("r2", (K,)),
             Rec("r3", (A, K)), Rec("r4", (B, K)), Rec("r5", (K,))),
)


def test_two_logins_on_a_shared_cookie_arriving_together_keep_it_on_one_profile() -> None:
    # Given two customers with their own CRM ids, and a household cookie seen anonymously
    # When both log in on the cookie at the same time, under 300 different interleavings (with crashes)
    for seed in range(300):
        sim = run(HOUSEHOLD, seed, crash_rate=0.01 if seed % 2 else 0.0)
        # Then the cookie is listed on exactly one of the two profiles, each login event is with its own
        # customer, the anonymous events with the cookie, and nothing is pending
        assert_right(HOUSEHOLD, sim)


def test_a_settled_household_refuses_the_next_shared_login_without_shipping_a_profile() -> None:
    # Given the household stitched and settled
    sim = run(HOUSEHOLD, 1)
    assert_right(HOUSEHOLD, sim)
    owner_k = sim.snapshot().owner(K.key)
    sim.ops.clear()
    # When the customer who does not have the cookie logs in on it again
    other = B if sim.snapshot().owner(A.key) == owner_k else A
    sim.run([Rec("r9", (other, K))], random.Random(2))
    # Then the link is refused on the unique ids it carries: no profile state travels, nothing moves
    assert dict(sim.ops) == {"apply": 1, "claim": 1, "taken": 1, "link": 1}
    assert sim.snapshot().owner(K.key) == owner_k


def test_a_merge_racing_a_conflicting_link_is_refused_before_any_identity_moves() -> None:
    # Given a cookie-only profile that both customers' logins reach, with their e-mails linked late
    ea, eb = Identity("Email", "a@x"), Identity("Email", "b@x")
    world = World(
        persons=(Person("a", (A, ea, CA)), Person("b", (B, eb, CB))),
        shared={K: ("a", "b")},
        records=(Rec("r0", (K,)), Rec("r1", (ea, CA)), Rec("r2", (eb, CB)), Rec("r3", (A, K)),
                 Rec("r4", (B, K)), Rec("r5", (A, ea)), Rec("r6", (B, eb)), Rec("r7", (K,))),
    )
    # When the records race in 300 interleavings
    for seed in range(300):
        sim = run(world, seed, crash_rate=0.01 if seed % 3 == 0 else 0.0, fast_path=seed % 2 == 0)
        # Then every identity is on its customer's profile (the cookie on one of them), no profile holds
        # both CRM ids, and every identity the refused merge concerned answers with its owner
        assert_right(world, sim)


def test_a_record_carrying_two_crm_ids_never_makes_a_profile_holding_both() -> None:
    # Given two customers, and a hostile record naming both their CRM ids (ingest dead-letters such a
    # record; this is the profile stage's own guard)
    world = World(persons=(Person("a", (A, CA)), Person("b", (B, CB))), shared={},
                  records=(Rec("r0", (A, B), hostile=True), Rec("r1", (A, CA)), Rec("r2", (B, CB))))
    for seed in range(100):
        sim = run(world, seed)
        # Then each CRM id has its own profile and the hostile event is stored once, with CRM id A
        assert_right(world, sim)
        snap = sim.snapshot()
        owner_a, owner_b = snap.owner(A.key), snap.owner(B.key)
        assert owner_a != owner_b
        assert [e.event_id for e in snap.profiles[owner_a].events] == ["r0", "r1"]
        assert [e.event_id for e in snap.profiles[owner_b].events] == ["r2"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32), people=st.integers(1, 7), households=st.sampled_from([0.0, 0.5, 1.0]),
       order=st.integers(0, 2**32), crash_rate=st.sampled_from([0.0, 0.0, 0.003, 0.02]), fast=st.booleans())
def test_generated_customers_stitch_right_under_any_interleaving(seed: int, people: int, households: float,
                                                                 order: int, crash_rate: float,
                                                                 fast: bool) -> None:
    # Given generated customers (households sharing cookies, late links, hostile records)
    world = generate_world(random.Random(seed), people, households=households, hostile=0.3)
    # When their records are stitched under a chosen interleaving, with crashes and redeliveries
    sim = run(world, order, crash_rate=crash_rate, fast_path=fast)
    # Then the graph is the reference's: one profile per person, no identity on two profiles, no two CRM
    # ids in one profile, every event once in the profile of its home identity
    assert_right(world, sim)


def test_a_hundred_people_with_crashes() -> None:
    # Given 100 generated people (about a third in households)
    world = generate_world(random.Random(7), 100, households=0.4, hostile=0.05)
    # When stitched with crashes throughout
    sim = run(world, 11, crash_rate=0.006)
    # Then the graph is exactly the reference's
    assert sim.crashes > 10
    rep = check_world(world, sim.snapshot())
    assert not rep.problems, rep.problems[:20]
    assert (rep.right, rep.wrong_merges, rep.splits, rep.on_two_profiles) == (rep.identities, 0, 0, 0)
