"""Where a profile's parts came from: the dataset that linked each identity (kept through claims, merges and the
guardrail) and what each destination acknowledged of each membership (receipts from the destination runner)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.api.views import render_profile
from pipeline.destinations.base import Payload
from pipeline.destinations.receipts import receipts_of
from pipeline.identity.datasets import load_datasets_config
from pipeline.identity.namespaces import load_identity_config
from pipeline.model import (
    MAX_DELIVERIES,
    AttributeValue,
    Delivery,
    ExperienceEvent,
    Identity,
    Membership,
    ProfileRecord,
    ProfileState,
)
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.merge import absorb, apply_event, apply_record, enforce_identity_limit
from pipeline.profiles.ops import ProfileProcessor
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments import AudienceDef, SegmentEngine, apply_decisions, exit_all, parse_query
from pipeline.segments.engine import Decision
from pipeline.stages.messages import Apply, AttributesWire, Claimed, Receipt, Taken
from pipeline.state.codec import Forward

NOW_S = 1_800_000_000.0
NOW = int(NOW_S * 1000)
GOLD = AudienceDef("gold", "gold", "", 'loyalty.tier = "gold"', 1, (), parse_query('loyalty.tier = "gold"'))
C1, C2, EMAIL = Identity("ECID", "c1"), Identity("ECID", "c2"), Identity("Email", "ann@example.com")


CONFIG = ProfileConfig(load_identity_config(EXAMPLE_CONFIG_DIR / "identity.yaml"),
                       load_datasets_config(EXAMPLE_CONFIG_DIR / "datasets.yaml"))
Events = Callable[..., ExperienceEvent]
Records = Callable[..., ProfileRecord]
Configs = Callable[..., ProfileConfig]


def processor() -> ProfileProcessor:
    return ProfileProcessor(CONFIG, SegmentEngine([GOLD]), lambda: NOW_S)


# -- the dataset that linked each identity ------------------------------------------------------------------------
def test_an_identity_keeps_the_dataset_of_its_earliest_sighting(make_config: Configs, make_event: Events,
                                                                 make_record: Records) -> None:
    # Given a profile that sees c1 in web events at 200
    config = make_config()
    p = ProfileState("p1", created_ms=1)
    apply_event(p, make_event("e1", 200, dataset="web-events", identities=(C1,)), config)
    # When orders see it later and a CRM record earlier, with a new e-mail
    apply_event(p, make_event("e2", 300, dataset="orders", identities=(C1,)), config)
    apply_record(p, make_record(100, "crm", {"tier": "gold"}, (C1, EMAIL)), config)
    # Then each identity names the dataset of its earliest sighting, with that time
    assert p.identities == {"ECID": {"c1": 100}, "Email": {"ann@example.com": 100}}
    assert p.identity_sources == {"ECID:c1": "crm", "Email:ann@example.com": "crm"}


def test_a_merge_keeps_each_identitys_earliest_time_and_dataset(make_config: Configs) -> None:
    # Given a survivor that saw c1 at 200 in web events, and a merged-away profile that saw c1 at 100 in orders,
    # c2 at 50 in web events, and an identity whose dataset it does not know, earlier than the survivor's
    config = make_config()
    survivor = ProfileState("p1", created_ms=1, identities={"ECID": {"c1": 200}, "Email": {"ann@example.com": 300}},
                            identity_sources={"ECID:c1": "web-events", "Email:ann@example.com": "crm"})
    other = ProfileState("p2", created_ms=2, identities={"ECID": {"c1": 100, "c2": 50},
                                                         "Email": {"ann@example.com": 10}},
                         identity_sources={"ECID:c1": "orders", "ECID:c2": "web-events"},
                         claims={"Phone:+442079460958": {"p2": 60}})
    other.identity_sources["Phone:+442079460958"] = "loyalty"
    # When it is absorbed
    absorb(survivor, other, config)
    # Then each identity has its earliest first-seen time, with that sighting's dataset (a dataset not known on the
    # earlier side keeps the later one's), and the pending claim brings its dataset along
    assert survivor.identities == {"ECID": {"c1": 100, "c2": 50}, "Email": {"ann@example.com": 10}}
    assert survivor.identity_sources == {"ECID:c1": "orders", "ECID:c2": "web-events", "Email:ann@example.com": "crm",
                                         "Phone:+442079460958": "loyalty"}


def test_the_guardrail_drops_an_identitys_dataset_with_it(make_config: Configs, make_event: Events,
                                                          make_record: Records) -> None:
    # Given a profile at a limit of 2 identities given a third
    config = make_config(max_ids=2)
    p = ProfileState("p1", created_ms=1)
    apply_event(p, make_event("e1", 100, dataset="web-events", identities=(C1,)), config)
    apply_record(p, make_record(200, "crm", {}, (C2, EMAIL)), config)
    # When the guardrail applies
    removed = enforce_identity_limit(p, config)
    # Then the oldest cookie goes, and its dataset with it
    assert removed == [C1]
    assert p.identity_sources == {"ECID:c2": "crm", "Email:ann@example.com": "crm"}


def test_a_claimed_identity_keeps_the_dataset_of_the_record_that_claimed_it() -> None:
    # Given a new profile born of a CRM record carrying its home cookie and an e-mail (claimed)
    proc = processor()
    rec = AttributesWire(timestamp_ms=100, dataset="crm", identities=(("ECID", "c1"), ("Email", "ann@example.com")),
                         record_id="r1", attributes={"loyalty.tier": "silver"})
    born = proc.handle("p1", None, Apply(pid="p1", rec=rec, home="ECID:c1"))
    p = born.write
    assert isinstance(p, ProfileState)
    assert (p.identities, p.identity_sources) == ({"ECID": {"c1": 100}},
                                                  {"ECID:c1": "crm", "Email:ann@example.com": "crm"})
    # When the identity table grants the e-mail
    proc.handle("p1", p, Claimed(pid="p1", claimant="p1", key="Email:ann@example.com"))
    # Then it is listed, linked by the CRM dataset at the record's time
    assert p.identities == {"ECID": {"c1": 100}, "Email": {"ann@example.com": 100}}
    assert p.identity_sources == {"ECID:c1": "crm", "Email:ann@example.com": "crm"}
    assert render_profile(p, now_ms=NOW)["identity_links"] == {
        "ECID": {"c1": {"linked_ms": 100, "dataset": "crm"}},
        "Email": {"ann@example.com": {"linked_ms": 100, "dataset": "crm"}}}


def test_a_claim_taken_by_another_profile_forgets_its_dataset() -> None:
    # Given a profile whose claim of an e-mail is pending
    p = ProfileState("p1", created_ms=1, identities={"ECID": {"c1": 100}}, claims={"Email:ann@example.com": {"p1": 100}},
                     identity_sources={"ECID:c1": "crm", "Email:ann@example.com": "crm"})
    # When the identity table answers that p0 owns it
    res = processor().handle("p1", p, Taken(pid="p1", claimant="p1", key="Email:ann@example.com", owner="p0"))
    # Then the claim is settled and its dataset gone (the e-mail is p0's; a merge brings it back with p0's)
    assert res.write is p
    assert (p.claims, p.identity_sources) == ({}, {"ECID:c1": "crm"})


# -- what each destination acknowledged -----------------------------------------------------------------------------
def member(deliveries: dict[str, Delivery] | None = None) -> ProfileState:
    """p1, in gold since 1000."""
    return ProfileState("p1", created_ms=1, identities={"ECID": {"c1": 1}},
                        attributes={"loyalty.tier": AttributeValue("gold", "crm", 1000)},
                        memberships={"gold": Membership("gold", "realized", 1000, 1, "tier", 1000,
                                                        dict(deliveries or {}))})


def receipt(status: str = "entered", at: int = 1500, ev: int = 1000, dest: str = "crm-webhook",
            audience: str = "gold") -> Receipt:
    return Receipt(pid="p1", audience=audience, destination=dest, status=status,  # type: ignore[arg-type]
                   delivered_ms=at, event_ms=ev, key="k")


def test_a_receipt_notes_on_the_membership_what_the_destination_got_and_when() -> None:
    # Given p1 in gold, already acknowledged by the file export
    p = member({"export": Delivery("entered", 1200, 1000)})
    # When the webhook's receipt of the enter arrives
    res = processor().handle("p1", p, receipt())
    # Then the membership holds one entry per destination, the profile is written, and the lookup shows them
    assert res.write is p
    assert res.counters == {"receipts": 1}
    assert p.memberships["gold"].deliveries == {"export": Delivery("entered", 1200, 1000),
                                                "crm-webhook": Delivery("entered", 1500, 1000)}
    assert render_profile(p, now_ms=NOW)["memberships"]["gold"]["destinations"] == [
        {"name": "crm-webhook", "status": "entered", "delivered_ms": 1500},
        {"name": "export", "status": "entered", "delivered_ms": 1200}]


def test_stale_and_unknown_receipts_are_ignored_and_counted() -> None:
    proc = processor()
    cases = [
        # an enter of an earlier transition (the membership's current one began at 1000)
        (member(), receipt(ev=900), "receipts_stale"),
        # a receipt redelivered late, older than the destination's entry
        (member({"crm-webhook": Delivery("exited", 2000, 1100)}), receipt(at=1500, ev=1000), "receipts_stale"),
        # a profile this partition does not have, an audience it never was in
        (None, receipt(), "receipts_unknown"),
        (member(), receipt(audience="silver"), "receipts_unknown"),
    ]
    for entry, msg, counted in cases:
        before = None if entry is None else dict(entry.memberships["gold"].deliveries)
        # When the receipt is handled
        res = proc.handle("p1", entry, msg)
        # Then nothing is written and it is counted
        assert (res.write, res.sends, res.counters) == (None, [], {counted: 1}), msg
        if entry is not None:
            assert entry.memberships["gold"].deliveries == before
    # and at a merged-away profile's forward it is dropped, never passed on to the survivor's membership
    res = proc.handle("p1", Forward("p0"), receipt())
    assert (res.write, res.sends, res.counters) == (None, [], {"stale": 1})


def test_a_profile_waiting_to_be_absorbed_notes_a_receipt_instead_of_holding_it() -> None:
    # Given p1 frozen in a merge into p0
    p = member()
    p.merging = ("p0", "p0/3")
    # When a receipt arrives
    res = processor().handle("p1", p, receipt())
    # Then it is noted (not held: it would be passed on to p0's membership)
    assert (res.write, p.held) == (p, [])
    assert p.memberships["gold"].deliveries == {"crm-webhook": Delivery("entered", 1500, 1000)}


def test_deliveries_outlive_a_transition_and_stay_one_per_destination() -> None:
    # Given p1 in gold, acknowledged by the webhook
    engine = SegmentEngine([GOLD])
    p = member({"crm-webhook": Delivery("entered", 1500, 1000)})
    # When it exits, then enters again
    exit_all(p, engine, now_ms=3000, kind="streaming", reason="tier")
    # Then until the webhook acknowledges the exit its last delivery shows the enter
    assert p.memberships["gold"].deliveries == {"crm-webhook": Delivery("entered", 1500, 1000)}
    processor().handle("p1", p, receipt("exited", at=3100, ev=3000))
    apply_decisions(p, [Decision("gold", True, "tier", None, None)], engine, now_ms=4000, event_time_ms=4000,
                    kind="streaming")
    assert p.memberships["gold"].deliveries == {"crm-webhook": Delivery("exited", 3100, 3000)}
    # and past MAX_DELIVERIES destinations the least recently delivered one goes
    proc = processor()
    for i in range(MAX_DELIVERIES + 1):
        proc.handle("p1", p, receipt(dest=f"d{i:02d}", at=5000 + i, ev=4000))
    assert len(p.memberships["gold"].deliveries) == MAX_DELIVERIES
    assert "crm-webhook" not in p.memberships["gold"].deliveries
    assert p.memberships["gold"].deliveries[f"d{MAX_DELIVERIES:02d}"] == Delivery("entered", 5000 + MAX_DELIVERIES,
                                                                                  4000)


def test_the_runner_makes_a_receipt_of_each_delivered_membership_payload_only() -> None:
    # Given a destination's delivered payloads: an enter, an existing member (backfill), an exit, an attribute update
    def payload(status: str, kind: str = "membership", audience: str | None = "gold") -> Payload:
        return Payload("crm-webhook", "p1", audience, kind, status, {"Email": ["ann@example.com"]},  # type: ignore[arg-type]
                       {"tier": "gold"}, f"key-{status}", 1000, 1001)
    payloads = [payload("realized"), payload("existing"), payload("exited"), payload("updated", "attributes", None)]
    # When the runner makes their receipts
    receipts = receipts_of("crm-webhook", payloads, 2000)
    # Then one per membership payload, enters and existing alike as `entered`, and no identity in any
    assert receipts == [
        Receipt(pid="p1", audience="gold", destination="crm-webhook", status=s, delivered_ms=2000, event_ms=1000, key=k)
        for s, k in [("entered", "key-realized"), ("entered", "key-existing"), ("exited", "key-exited")]]
