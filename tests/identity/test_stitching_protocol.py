"""The stitching protocol at the level of its handlers: generated customers, chosen interleavings and crashes,
checked against the plain reference in tests/stitching.py (no Kafka: see tests/identity/stitch_sim.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import structs
from stitching import CONFIG, Person, Rec, World, check_world, generate_world

from pipeline.identity.namespaces import parse_identity_config
from pipeline.identity.stitch import (
    IdentityResult,
    apply_msg,
    claim_msg,
    handle_identity,
    in_process_allowed,
    start_resolve,
)
from pipeline.model import ExperienceEvent, Identity, ProfileState
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import ProfileProcessor
from pipeline.segments import SegmentEngine
from pipeline.stages import messages
from pipeline.stages.messages import (
    Absorb,
    Accepted,
    Apply,
    Claim,
    Claimed,
    Link,
    Refused,
    Release,
    Repoint,
    Resolve,
    Resume,
    Send,
    Taken,
    record_to_wire,
)
from pipeline.state.codec import Forward, decode_profile_entry, encode_forward, encode_profile
from pipeline.state.snapshot import GraphSnapshot
from pipeline.topics import IDENTITY_TOPIC, PROFILE_CHANGES_TOPIC, PROFILE_TOPIC

from .stitch_sim import StitchSim

A, B = Identity("CRMID", "A"), Identity("CRMID", "B")
K = Identity("ECID", "household")
CA, CB = Identity("ECID", "a1"), Identity("ECID", "b1")


def run(world: World, seed: int, crash_rate: float = 0.0, fast_path: bool = True) -> StitchSim:
    sim = StitchSim(CONFIG, fast_path=fast_path)
    # bounded: a run that does not settle fails in seconds rather than hanging the suite (the longest of 20,000
    # runs drawn as the hypothesis test draws them took 23,656 steps)
    sim.run(world.records, random.Random(seed), crash_rate=crash_rate, max_steps=200_000)
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


def die_mid_output(seed: int, local_delivery: bool) -> list[str]:
    """Generated customers spread over 1-3 workers that die (SIGKILL) with part of their output written: each
    changelog keeps a prefix of its writes since the last commit, each channel a prefix of its unflushed messages,
    and the worker handles its partitions again from their committed offsets. The problems found, if any."""
    rng = random.Random(seed)
    world = generate_world(random.Random(seed), rng.randint(1, 6), households=0.5, hostile=0.2)
    sim = StitchSim(CONFIG, workers=rng.randint(1, 3), placement=random.Random(seed), fast_path=seed % 2 == 0,
                    local_delivery=local_delivery)
    try:
        sim.run(world.records, random.Random(seed * 7 + 1), worker_crash_rate=0.01, max_steps=200_000)
    except AssertionError as exc:  # no quiescence
        return [f"seed {seed} ({sim.crashes} crashes): {exc}"]
    rep = check_world(world, sim.snapshot())
    return [f"seed {seed} ({sim.crashes} crashes): {rep.problems[:3]}"] if rep.problems else []


def workers_die_mid_output(local_delivery: bool) -> None:
    # Given generated customers spread over 1-3 workers, and workers that die (SIGKILL) with part of their
    # output written
    # When their records are stitched while workers keep dying, for 300 seeds
    failures = [line for seed in range(300) for line in die_mid_output(seed, local_delivery)]
    # Then the graph is the reference's, every time
    assert not failures, f"{len(failures)} of 300 seeds:\n" + "\n".join(failures)


def test_generated_customers_stitch_right_when_workers_die_mid_output() -> None:
    workers_die_mid_output(local_delivery=False)


def test_generated_customers_stitch_right_when_workers_die_mid_output_with_local_delivery() -> None:
    # (as above, with the messages between a worker's own partitions delivered in-process, as the worker does:
    # all but identity-stage messages and absorbs, which go through Kafka, see stitch.in_process_allowed)
    workers_die_mid_output(local_delivery=True)


# Seeds of the loop above (beyond its 300) that once ended wrong, found by sweeping seeds 0-2999. With local
# delivery: a claim answered to a profile whose pending claim a crash had lost was released (650, 910, 1093, 1478,
# 1652, 1772, 1824, 2084, 2289, 2290, 2591, 2781, 2815, 2918, 2994; see the tests below for each cause), and
# 2499, 2722 and 2725 went wrong with only some of the fixes, 3922 and 4652 (a sweep of 3000-5999) with all but the
# last. Without: 2709 never settled (held copies multiplied with every crash).
REGRESSION_SEEDS = [(seed, True) for seed in (650, 910, 1093, 1478, 1652, 1772, 1824, 2084, 2289, 2290, 2499, 2591,
                                              2722, 2725, 2781, 2815, 2918, 2994, 3922, 4652)] + [(2709, False)]


@pytest.mark.parametrize(("seed", "local_delivery"), REGRESSION_SEEDS)
def test_seeds_that_once_ended_wrong_when_workers_die_mid_output(seed: int, local_delivery: bool) -> None:
    # Given / When: as in the loop above, for one seed
    # Then the graph is the reference's and the run settles
    assert die_mid_output(seed, local_delivery) == []


def _processor() -> ProfileProcessor:
    return ProfileProcessor(CONFIG, SegmentEngine([]), lambda: 1_700_000_000.0)


def _round_trip(entry: ProfileState | Forward) -> ProfileState | Forward:
    """As the table stores it (a crash keeps exactly what was encoded)."""
    raw = encode_forward(entry) if isinstance(entry, Forward) else encode_profile(entry)
    return decode_profile_entry(raw)


def test_a_redelivered_accepted_sends_again_what_the_merged_away_profile_sent() -> None:
    # Given profile p9 merging into p1, holding two messages that reached it meanwhile
    proc = _processor()
    p9 = ProfileState("p9", created_ms=1, identities={"ECID": {"c9": 1}}, merging=("p1", "p9/2"),
                      claims={"Email:e9": {"p9": 5}},
                      held=[Apply(pid="p9", rec=None, home="ECID:c9", hop=True),
                            Taken(pid="p9", claimant="p9", key="Email:e9", owner="p4")])
    accepted = Accepted(pid="p9", token="p9/2", by="p1")
    first = proc.handle("p9", p9, accepted)
    expected = [
        Send(IDENTITY_TOPIC, "ECID:c9", Repoint(old="p9", new="p1")),
        Send(IDENTITY_TOPIC, "Email:e9", Repoint(old="p9", new="p1")),
        Send(PROFILE_TOPIC, "p1", Apply(pid="p1", rec=None, home="ECID:c9", hop=True)),
        Send(PROFILE_TOPIC, "p1", Taken(pid="p1", claimant="p9", key="Email:e9", owner="p4")),
    ]
    assert first.sends == expected
    assert isinstance(first.write, Forward) and first.write.into == "p1"
    # When the worker dies after writing the forward but before its messages were acknowledged, and the
    # accepted is delivered again to the stored forward
    again = proc.handle("p9", _round_trip(first.write), accepted)
    # Then exactly the same messages are sent again, and the forward stays as it is
    assert again.sends == expected
    assert again.write is None
    # And an answer to an older attempt is still dropped there
    assert proc.handle("p9", _round_trip(first.write), structs.replace(accepted, token="p9/1")).sends == []


def test_a_redelivered_refused_sends_again_what_the_thawed_messages_sent() -> None:
    # Given profile p9 whose merge into p1 is refused, holding a record that claims an e-mail
    proc = _processor()
    ids = (Identity("Email", "e9"), Identity("ECID", "c9"))
    rec = apply_msg("p9", record_to_wire(ExperienceEvent("r1", 7, "pageView", "web-events", ids, ids[0], {})),
                    "ECID:c9").value
    p9 = ProfileState("p9", created_ms=1, identities={"ECID": {"c9": 1}}, merging=("p1", "p9/2"), held=[rec])
    refused = Refused(pid="p9", token="p9/2", by="p1")
    first = proc.handle("p9", p9, refused)
    claims = [s for s in first.sends if s.topic == IDENTITY_TOPIC]
    assert claims == [Send(IDENTITY_TOPIC, "Email:e9", Claim(pid="p9", ts=7))]
    assert isinstance(first.write, ProfileState) and first.write.merging is None
    # When the thawed state was kept but the claim was lost, and the refused is delivered again
    again = proc.handle("p9", _round_trip(first.write), refused)
    # Then the claim is sent again; the record is not applied twice
    assert [s for s in again.sends if s.topic == IDENTITY_TOPIC] == claims
    assert again.write is None


def test_a_redelivered_adoption_sends_its_apply_again() -> None:
    # Given an identity adopted by a new profile id (its own profile, as a lone identity)
    msg = Resolve(rec=None, candidate="p5")
    first = handle_identity("CRMID:B", None, msg)
    assert first.write == "p5"
    # When the table write survived a crash and the apply did not, and the resolve comes again
    again = handle_identity("CRMID:B", "p5", msg)
    # Then the apply that creates the profile is sent again; an identity someone else owns is left alone
    assert again.sends == first.sends == [Send(PROFILE_TOPIC, "p5", Apply(pid="p5", rec=None, home="CRMID:B", hop=True))]
    assert handle_identity("CRMID:B", "p2", msg).sends == []


def test_a_profile_left_waiting_by_a_crash_sends_again_what_it_waits_on_when_resumed() -> None:
    # Given the state a crash left: p9 merging into p1 (its absorb lost in-process with the worker), holding a
    # record that reached it meanwhile, with a pending claim of its own and one of a profile it absorbed
    proc = _processor()
    held = Apply(pid="p9", rec=None, home="ECID:c9", hop=True)
    p9 = ProfileState("p9", created_ms=1, identities={"ECID": {"c9": 1}}, merging=("p1", "p9/2"),
                      claims={"Email:e9": {"p9": 5, "p12": 3}}, held=[held])
    stored = _round_trip(p9)
    # When a worker is assigned its partition and resumes it
    res = proc.handle("p9", stored, Resume(pid="p9"))
    # Then it ships its state to p1 again, as its first absorb did, and asks for the pending claims again
    assert res.sends == [ProfileProcessor._absorb_msg("p9", p9),
                         Send(IDENTITY_TOPIC, "Email:e9", Claim(pid="p12", ts=3)),
                         Send(IDENTITY_TOPIC, "Email:e9", Claim(pid="p9", ts=5))]
    # And nothing changes: the held message stays held, in order
    assert res.write is None and isinstance(stored, ProfileState) and stored.held == [held]
    # And a resume reaching a forward, or a profile with nothing in flight, sends nothing
    assert proc.handle("p9", Forward("p1"), Resume(pid="p9")).sends == []
    assert proc.handle("p2", ProfileState("p2", 1), Resume(pid="p2")).sends == []


def test_a_record_handled_again_names_the_same_candidate_profile() -> None:
    # Given a record resolved once (its candidate profile may have been created, the identity's write lost)
    rec = record_to_wire(ExperienceEvent("r1", 1_700_000_000_123, "pageView", "web-events",
                                         (Identity("ECID", "c1"),), Identity("ECID", "c1"), {}))
    first = start_resolve(rec, "ECID:c1", now_ms=1_800_000_000_000)
    # When it is read again after a crash, later
    again = start_resolve(rec, "ECID:c1", now_ms=1_800_000_555_000)
    # Then it names the same candidate, which sorts by the record's time; another record names another
    assert again == first and first.value.candidate.startswith(f"{1_700_000_000_123:012x}")
    other = record_to_wire(ExperienceEvent("r2", 1_700_000_000_123, "pageView", "web-events",
                                           (Identity("ECID", "c1"),), Identity("ECID", "c1"), {}))
    assert start_resolve(other, "ECID:c1", now_ms=1_800_000_000_000).value.candidate != first.value.candidate


def test_a_replayed_record_asks_again_for_the_identities_its_profile_lists() -> None:
    # Given a profile that lists the record's identities and holds its event (the first handling's state
    # survived a crash; the identity table's writes of its claims may not have)
    proc = _processor()
    ids = (Identity("ECID", "c1"), Identity("Email", "e1"))
    rec = record_to_wire(ExperienceEvent("r1", 7, "pageView", "web-events", ids, ids[0], {}))
    p1 = proc.handle("p1", None, Apply(pid="p1", rec=rec, home="ECID:c1", hop=True)).write
    assert isinstance(p1, ProfileState)
    p1 = proc.handle("p1", _round_trip(p1), Claimed(pid="p1", claimant="p1", key="Email:e1")).write
    assert isinstance(p1, ProfileState) and p1.identities == {"ECID": {"c1": 7}, "Email": {"e1": 7}}
    # When the record is handled again, through the identity stage (hop) or from ingest's local read
    hop = proc.handle("p1", _round_trip(p1), Apply(pid="p1", rec=rec, home="ECID:c1", hop=True))
    local = proc.handle("p1", _round_trip(p1), Apply(pid="p1", rec=rec, home="ECID:c1", hop=False))
    # Then it asks the identity table again for what it lists (the home too, unless the hop just read it)
    assert hop.sends == [Send(IDENTITY_TOPIC, "Email:e1", Claim(pid="p1", ts=7))]
    assert local.sends == [Send(IDENTITY_TOPIC, "ECID:c1", Claim(pid="p1", ts=7)),
                           Send(IDENTITY_TOPIC, "Email:e1", Claim(pid="p1", ts=7))]
    assert hop.counters == {"duplicates": 1}


SMALL_GRAPHS = ProfileConfig(parse_identity_config("""\
max_identities_per_graph: 2
namespaces:
  - {name: ECID, kind: cookie, priority: 10, normaliser: trim}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}
"""), CONFIG.datasets)


def test_an_identity_given_to_a_profile_that_lost_its_pending_claim_in_a_crash_is_kept() -> None:
    # Given p1 listing an e-mail, whose pending claim of a cookie a crash lost (its state was written back to before
    # the claim), while the claim itself survived in the identity topic and was granted
    proc = _processor()
    p1 = ProfileState("p1", created_ms=1, identities={"Email": {"e1": 1}})
    # When the answer comes
    res = proc.handle("p1", _round_trip(p1), Claimed(pid="p1", claimant="p1", key="ECID:c1"))
    # Then p1 lists the cookie (nothing else would: a profile refused it meanwhile has sent its link here) and
    # releases nothing
    assert isinstance(res.write, ProfileState)
    assert res.write.identities == {"Email": {"e1": 1}, "ECID": {"c1": 1_700_000_000_000}}
    assert [s for s in res.sends if s.topic == IDENTITY_TOPIC] == []
    # But an identity the guardrail has no room for, or a second CRM id, is released as before
    small = ProfileProcessor(SMALL_GRAPHS, SegmentEngine([]), lambda: 1_700_000_000.0)
    full = ProfileState("p1", created_ms=1, identities={"Email": {"e1": 1}, "CRMID": {"A": 1}})
    assert small.handle("p1", _round_trip(full), Claimed(pid="p1", claimant="p1", key="ECID:c1")).sends == [
        Send(IDENTITY_TOPIC, "ECID:c1", Release(pid="p1"))]
    crm = ProfileState("p1", created_ms=1, identities={"CRMID": {"A": 1}})
    assert proc.handle("p1", _round_trip(crm), Claimed(pid="p1", claimant="p1", key="CRMID:B")).sends == [
        Send(IDENTITY_TOPIC, "CRMID:B", Release(pid="p1"))]


def test_an_identity_given_to_a_profile_a_crash_left_unborn_makes_it_hold_the_identity() -> None:
    # Given p1's creation lost in a crash (its apply was delivered in-process), while its claim of a cookie survived
    proc = _processor()
    # When the identity table's answer reaches p1
    res = proc.handle("p1", None, Claimed(pid="p1", claimant="p1", key="ECID:c1"))
    # Then p1 is born holding the cookie (the table gives it to p1), and releases nothing: the record that created it
    # comes again and finds it there
    assert isinstance(res.write, ProfileState)
    assert res.write.identities == {"ECID": {"c1": 1_700_000_000_000}}
    assert [s for s in res.sends if s.topic == IDENTITY_TOPIC] == []


def test_a_link_naming_an_identity_its_profile_lost_in_a_crash_lists_it_so_that_a_merge_repoints_it() -> None:
    # Given p20, which owns its home e-mail in the identity table, but whose state a crash wrote back to what a claim
    # answer made of it (the g0 cookie only)
    proc = _processor()
    p20 = ProfileState("p20", created_ms=1, identities={"ECID": {"g0": 1}})
    # When p06, refused the e-mail (taken: owner p20), links to it
    res = proc.handle("p20", _round_trip(p20), Link(pid="p20", sender="p06", uniq={"CRMID": ["C0"]}, via="Email:e0"))
    # Then p20 lists the e-mail again and ships it with the rest to p06
    assert isinstance(res.write, ProfileState)
    assert res.write.identities == {"ECID": {"g0": 1}, "Email": {"e0": 1_700_000_000_000}}
    assert res.write.merging is not None and res.write.merging[0] == "p06"
    # And once p06 has absorbed it, p20's identities, the e-mail included, are repointed to p06
    token = res.write.merging[1]
    done = proc.handle("p20", _round_trip(res.write), Accepted(pid="p20", token=token, by="p06"))
    assert done.sends == [Send(IDENTITY_TOPIC, "ECID:g0", Repoint(old="p20", new="p06")),
                          Send(IDENTITY_TOPIC, "Email:e0", Repoint(old="p20", new="p06"))]


def test_a_new_merge_attempt_of_a_profile_absorbed_before_is_absorbed_again() -> None:
    # Given p1, which absorbed p9's attempt p9/5; a crash then wrote p9 back to before that merge (its Forward and the
    # `accepted` lost, its absorb kept), and p9, live again, absorbed another cookie before merging into p1 again
    proc = _processor()
    p1 = ProfileState("p1", created_ms=1, identities={"ECID": {"c1": 1, "c9": 1}}, merged=["p9/5"])
    again = ProfileState("p9", created_ms=1, identities={"ECID": {"c9": 1, "c3": 2}}, merging=("p1", "p9/7"))
    absorb = ProfileProcessor._absorb_msg("p9", again).value
    # When its new attempt reaches p1
    res = proc.handle("p1", _round_trip(p1), absorb)
    # Then p1 absorbs it (the new cookie is listed) and accepts that attempt
    assert isinstance(res.write, ProfileState)
    assert res.write.identities == {"ECID": {"c1": 1, "c9": 1, "c3": 2}}
    assert res.write.merged == ["p9/5", "p9/7"]
    assert res.sends[0] == Send(PROFILE_TOPIC, "p9", Accepted(pid="p9", token="p9/7", by="p1"))
    # And a redelivered absorb of an attempt p1 took (or one recorded by id, as stored before tokens) is only
    # answered again
    for merged in (["p9/7"], ["p9"]):
        stored = ProfileState("p1", created_ms=1, identities={"ECID": {"c1": 1}}, merged=merged)
        redelivered = proc.handle("p1", _round_trip(stored), absorb)
        assert redelivered.write is None
        assert redelivered.sends == [Send(PROFILE_TOPIC, "p9", Accepted(pid="p9", token="p9/7", by="p1"))]


def test_links_and_absorbs_always_go_through_kafka() -> None:
    # Given the messages of a merge and of a record
    link = Send(PROFILE_TOPIC, "p9", Link(pid="p9", sender="p1", uniq={}, via=None))
    absorb = Send(PROFILE_TOPIC, "p1", Absorb(pid="p1", sender="p9", token="p9/2", state=b""))
    apply = apply_msg("p1", None, "ECID:c1")
    # Then a link (which freezes its target, whose absorb is in Kafka: handled again after a crash, it must freeze
    # it again at the same point of its log) and an absorb are never delivered in-process; an apply may be
    assert [in_process_allowed(s) for s in (link, absorb, apply, claim_msg("ECID:c1", "p1", 1))] == [
        False, False, True, False]


def test_a_merging_profile_holds_one_copy_of_a_message_delivered_again() -> None:
    # Given p9 merging into p1, holding a link
    proc = _processor()
    link = Link(pid="p9", sender="p4", uniq={}, via=None)
    p9 = ProfileState("p9", created_ms=1, identities={"ECID": {"c9": 1}}, merging=("p1", "p9/2"), held=[link])
    # When the same link comes again (handled again after a crash)
    res = proc.handle("p9", _round_trip(p9), messages.decode(messages.encode(link)))
    # Then it is not held twice (each copy would be passed on, and sent again with every redelivered `accepted`)
    assert res.write is None and res.sends == []
    assert res.counters == {"held_duplicates": 1}


def test_a_link_reaching_a_merged_away_profile_for_an_identity_it_never_listed_hands_it_to_the_survivor() -> None:
    # Given p20, merged into p06 as a Forward having repointed its cookie; the identity table still gives p20 the CRM
    # id its home hop wrote, which p20 never listed (a crash lost its apply; it was born from a claim answer)
    proc = _processor()
    p20 = Forward("p06", "p20/2", ("ECID:c0-1",))
    # When p06, refused the CRM id (taken: owner p20), links to p20
    link = Link(pid="p20", sender="p06", uniq={}, via="CRMID:C0")
    res = proc.handle("p20", _round_trip(p20), link)
    # Then p20 moves it to p06, asking the identity table to tell p06, and passes the link on as before
    adopt = Repoint(old="p20", new="p06", adopt=True)
    assert res.sends == [Send(IDENTITY_TOPIC, "CRMID:C0", adopt), Send(PROFILE_TOPIC, "p06", structs.replace(link, pid="p06"))]
    # And the identity table moves it (compare-and-set) and tells p06, which lists it
    moved = handle_identity("CRMID:C0", "p20", adopt)
    claimed = Claimed(pid="p06", claimant="p06", key="CRMID:C0")
    assert (moved.write, moved.sends) == ("p06", [Send(PROFILE_TOPIC, "p06", claimed)])
    p06 = ProfileState("p06", created_ms=1, identities={"ECID": {"c0-1": 1}})
    listed = proc.handle("p06", _round_trip(p06), claimed).write
    assert isinstance(listed, ProfileState)
    assert listed.identities == {"ECID": {"c0-1": 1}, "CRMID": {"C0": 1_700_000_000_000}}
    # And an identity the forward repointed when it merged, or one owned by someone else, is left alone
    assert proc.handle("p20", _round_trip(p20), structs.replace(link, via="ECID:c0-1")).sends == [
        Send(PROFILE_TOPIC, "p06", structs.replace(link, via="ECID:c0-1", pid="p06"))]
    assert handle_identity("CRMID:C0", "p31", adopt).sends == []


# -- every other stage operation at protocol level: erasure, deadlines and evaluations, the guardrail's releases --
def _settled(seed: int, people: int, crashes: bool) -> tuple[World, StitchSim]:
    """Generated customers stitched to quiescence by 1-3 workers (dying mid-output when `crashes`)."""
    rng = random.Random(seed)
    world = generate_world(random.Random(seed), people, households=0.5, hostile=0.0)
    sim = StitchSim(CONFIG, workers=rng.randint(1, 3), placement=random.Random(seed), fast_path=seed % 2 == 0,
                    local_delivery=seed % 3 == 0)
    sim.run(world.records, random.Random(seed * 7 + 1), worker_crash_rate=0.01 if crashes else 0.0,
            max_steps=200_000)
    assert_right(world, sim)
    return world, sim


def test_an_erased_person_leaves_no_identity_profile_or_forward_and_the_others_stay_as_they_were() -> None:
    ops: Counter[str] = Counter()
    for seed in range(60):
        # Given customers stitched (with merges, and crashes on odd seeds)
        world, sim = _settled(seed, 2 + seed % 4, crashes=seed % 2 == 1)
        before = sim.snapshot()
        person = world.persons[seed % len(world.persons)]
        pid = before.owner(person.own[0].key)
        assert pid is not None
        listed = {i.key for i in before.profiles[pid].identity_list()}
        absorbed = {f for f in before.forwards if before.resolve(f) == pid}
        # When the person is erased by one of their own identities
        sim.erase(person.own[0].key)
        sim.run([], random.Random(seed), max_steps=200_000)
        after = sim.snapshot()
        # Then their profile, every identity it listed and every forward of a profile it absorbed are gone
        assert pid not in after.profiles and pid not in after.forwards
        assert sorted(k for k in listed if k in after.identities) == []
        assert sorted(absorbed & set(after.forwards)) == []
        # And everybody else's profiles, identities and forwards are as they were
        assert {p: v for p, v in after.profiles.items()} == {p: v for p, v in before.profiles.items() if p != pid}
        assert after.identities == {k: v for k, v in before.identities.items() if before.resolve(v) != pid}
        assert after.forwards == {f: v for f, v in before.forwards.items() if before.resolve(f) != pid}
        ops.update(sim.ops)
    assert ops["erase"] == 2 * 60 and ops["erase-forward"] > 0 and ops["release"] > 0


def test_deadlines_and_evaluations_reaching_profiles_at_any_point_of_a_merge_change_no_stitching() -> None:
    ops: Counter[str] = Counter()
    for seed in range(100):
        # Given generated customers, and deadline ticks and walk evaluations sent to stored profiles meanwhile
        rng = random.Random(seed)
        world = generate_world(random.Random(seed), rng.randint(1, 6), households=0.5, hostile=0.2)
        sim = StitchSim(CONFIG, workers=rng.randint(1, 3), placement=random.Random(seed), fast_path=seed % 2 == 0,
                        local_delivery=seed % 3 == 0)
        sim.timer_rate = 0.05
        # When they are stitched, workers dying mid-output
        sim.run(world.records, random.Random(seed * 7 + 1), worker_crash_rate=0.01, max_steps=200_000)
        # Then the graph is right (a merging profile held them, a forward passed them on or dropped a tick)
        assert_right(world, sim)
        ops.update(sim.ops)
    assert ops["tick"] > 0 and ops["evaluate"] > 0


THREE_PER_GRAPH = ProfileConfig(parse_identity_config("""\
max_identities_per_graph: 3
namespaces:
  - {name: ECID, kind: cookie, priority: 10, normaliser: trim}
  - {name: GAID, kind: device, priority: 20, normaliser: lower}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: CRMID, kind: person, priority: 100, unique: true, normaliser: trim}
"""), CONFIG.datasets)


def consistency_problems(snap: GraphSnapshot) -> list[str]:
    """What breaks the tables' agreement: an identity owned by no live profile or not listed by its owner, one
    listed by a profile that does not own it, stitching still in flight, a forward leading nowhere."""
    problems = [f"{k}: owned by {v}, not a live profile listing it" for k, v in sorted(snap.identities.items())
                if (o := snap.resolve(v)) not in snap.profiles
                or k not in {i.key for i in snap.profiles[o].identity_list()}]
    problems += [f"{i.key} listed by {pid}, owned by {snap.owner(i.key)}" for pid, p in sorted(snap.profiles.items())
                 for i in p.identity_list() if snap.owner(i.key) != pid]
    problems += [f"{pid} in flight" for pid, p in sorted(snap.profiles.items()) if p.claims or p.merging or p.held]
    problems += [f"forward {f} leads nowhere" for f in sorted(snap.forwards) if snap.resolve(f) not in snap.profiles]
    return problems


def test_identities_the_guardrail_drops_are_released_and_the_tables_still_agree() -> None:
    ops: Counter[str] = Counter()
    for seed in range(100):
        # Given graphs limited to 3 identities, and customers with more
        rng = random.Random(seed)
        world = generate_world(random.Random(seed), rng.randint(1, 5), households=0.5, hostile=0.2)
        sim = StitchSim(THREE_PER_GRAPH, workers=rng.randint(1, 3), placement=random.Random(seed),
                        fast_path=seed % 2 == 0, local_delivery=seed % 3 == 0)
        # When they are stitched, workers dying mid-output
        sim.run(world.records, random.Random(seed * 7 + 1), worker_crash_rate=0.01, max_steps=200_000)
        # Then every identity the table gives a profile is listed there and nowhere else, nothing is in flight
        assert consistency_problems(sim.snapshot()) == []
        ops.update(sim.ops)
    assert ops["release"] > 0


def _limited() -> ProfileProcessor:
    return ProfileProcessor(THREE_PER_GRAPH, SegmentEngine([]), lambda: 1_700_000_000.0)


def test_an_absorbed_identity_the_guardrail_drops_is_released_from_the_profile_it_came_from() -> None:
    # Given p1 (graphs of at most 3) with a CRM id and an e-mail, absorbing p9 and its two cookies, whose repoints
    # to p1 are still in flight (the identity table gives them to p9)
    p1 = ProfileState("p1", created_ms=1, identities={"CRMID": {"A": 1}, "Email": {"e1": 2}})
    p9 = ProfileState("p9", created_ms=1, identities={"ECID": {"c9": 3, "c8": 4}})
    absorb_msg = Absorb(pid="p1", sender="p9", token="p9/1", state=encode_profile(p9))
    # When p1 absorbs it
    res = _limited().handle("p1", _round_trip(p1), absorb_msg)
    # Then it answers, drops the oldest cookie and frees it from itself or from p9, which still owns it
    assert isinstance(res.write, ProfileState)
    assert res.write.identities == {"CRMID": {"A": 1}, "Email": {"e1": 2}, "ECID": {"c8": 4}}
    assert [s for s in res.sends if s.topic != PROFILE_CHANGES_TOPIC] == [
        Send(PROFILE_TOPIC, "p9", Accepted(pid="p9", token="p9/1", by="p1")),
        Send(IDENTITY_TOPIC, "ECID:c9", Release(pid="p1", absorbed=("p9",)))]
    # And at the identity stage the release frees it from p9, so that p9's repoint finds nothing to move to p1
    release = Release(pid="p1", absorbed=("p9",))
    assert handle_identity("ECID:c9", "p9", release) == IdentityResult(delete=True)
    assert handle_identity("ECID:c9", None, Repoint(old="p9", new="p1")) == IdentityResult()
    # But an identity another profile owns meanwhile is left to it
    assert handle_identity("ECID:c9", "p5", release) == IdentityResult()


def test_a_stale_taken_naming_the_profile_itself_after_its_guardrail_released_the_identity_asks_again() -> None:
    # Given p1 at its limit, awaiting a cookie for p9 (absorbed), whose claim the table answered `taken` by p1 before
    # p1's guardrail dropped and released it
    p1 = ProfileState("p1", created_ms=1, identities={"CRMID": {"A": 1}, "Email": {"e1": 2}, "ECID": {"c8": 4}},
                      claims={"ECID:c9": {"p9": 3}}, merged=["p9/1"])
    # When the answer comes
    res = _limited().handle("p1", _round_trip(p1), Taken(pid="p1", claimant="p9", key="ECID:c9", owner="p1"))
    # Then p1 does not list it (the table may no longer give it to p1): it asks for it again as itself
    assert isinstance(res.write, ProfileState)
    assert res.write.identities == p1.identities and res.write.claims == {"ECID:c9": {"p1": 3}}
    assert res.sends == [Send(IDENTITY_TOPIC, "ECID:c9", Claim(pid="p1", ts=3))]


def test_a_claim_taken_by_a_profile_this_one_absorbed_moves_the_identity_here() -> None:
    # Given p1, which absorbed p9, claiming a cookie the table gives p9 (p9's repoint in flight, or a replayed
    # record's resolve gave the freed cookie p9's id again)
    p1 = ProfileState("p1", created_ms=1, identities={"CRMID": {"A": 1}}, claims={"ECID:c9": {"p1": 3}},
                      merged=["p9/1"])
    # When the table answers `taken` by p9
    res = _limited().handle("p1", _round_trip(p1), Taken(pid="p1", claimant="p1", key="ECID:c9", owner="p9"))
    # Then the claim is settled and the cookie moved here (the table answers `claimed`), rather than a link that
    # p9's forward would only pass back to p1
    assert isinstance(res.write, ProfileState) and res.write.claims == {}
    assert res.sends == [Send(IDENTITY_TOPIC, "ECID:c9", Repoint(old="p9", new="p1", adopt=True))]


def test_a_duplicate_answer_to_a_settled_claim_at_the_limit_releases_the_identity_from_its_owner() -> None:
    # Given p1 at its limit, which listed a cookie, dropped it and released it, while p9 (absorbed) still awaits it
    p1 = ProfileState("p1", created_ms=1, identities={"CRMID": {"A": 1}, "Email": {"e1": 2}, "ECID": {"c8": 4}},
                      claims={"ECID:c9": {"p9": 3}}, merged=["p9/1"])
    # When a duplicate `claimed` of p1's own settled claim comes (its claim was handled twice after a crash)
    res = _limited().handle("p1", _round_trip(p1), Claimed(pid="p1", claimant="p1", key="ECID:c9"))
    # Then p1 does not list it on that answer (p9's claim gets its own), and frees it only if p1 still owns it
    assert res.write is None
    assert res.sends == [Send(IDENTITY_TOPIC, "ECID:c9", Release(pid="p1"))]
    # And with no claim of it pending, a repoint from p9 may have moved it here already: freed from p1 or p9
    p1.claims = {}
    assert _limited().handle("p1", _round_trip(p1), Claimed(pid="p1", claimant="p9", key="ECID:c9")).sends == [
        Send(IDENTITY_TOPIC, "ECID:c9", Release(pid="p1", absorbed=("p9",)))]
