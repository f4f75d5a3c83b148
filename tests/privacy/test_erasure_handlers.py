"""Erasure's pure parts: the identity and profile stages' handlers, the hashes, the ingest filter of the
suppression list, the payload destinations receive, and the search for traces."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec.structs

from pipeline.destinations.base import Payload
from pipeline.destinations.config import parse_destinations
from pipeline.destinations.mapping import map_change
from pipeline.identity.datasets import load_datasets_config
from pipeline.identity.namespaces import Dropped, load_identity_config
from pipeline.identity.stitch import handle_identity
from pipeline.ingest.decode import Decoder, Skipped
from pipeline.model import AttributeValue, ExperienceEvent, Identity, Membership, ProfileState
from pipeline.privacy.agents import profile_tokens
from pipeline.privacy.erasure import (
    ERASURE_TOPIC,
    Verification,
    erase_at_identity,
    hashed,
    salt_of,
    scan,
    start_erasure,
)
from pipeline.privacy.log import ErasureLog
from pipeline.profiles.config import ProfileConfig
from pipeline.profiles.ops import ProfileProcessor
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments import AudienceDef, SegmentEngine, parse_query
from pipeline.serde.avro import AvroCodec
from pipeline.settings import DEFAULT_CONFIG, PipelineConfig
from pipeline.stages.messages import Erase, EraseForward, Refused, Release, Repoint, Send
from pipeline.state.codec import Forward, encode_profile
from pipeline.topics import IDENTITY_TOPIC, MEMBERSHIP_STATE_TOPIC, PROFILE_TOPIC

SALT = salt_of("test-salt", "app")
NOW_S = 1_800_000_000.0
NOW = int(NOW_S * 1000)
CONFIG = ProfileConfig(load_identity_config(EXAMPLE_CONFIG_DIR / "identity.yaml"),
                       load_datasets_config(EXAMPLE_CONFIG_DIR / "datasets.yaml"))
GOLD = AudienceDef("gold", "gold", "", 'loyalty.tier = "gold"', 1, (), parse_query('loyalty.tier = "gold"'))
RICH = AudienceDef("rich", "rich", "", "loyalty.points >= 1000", 1, (), parse_query("loyalty.points >= 1000"))


def processor() -> ProfileProcessor:
    proc = ProfileProcessor(CONFIG, SegmentEngine([GOLD, RICH]), lambda: NOW_S)
    proc.erasure_salt = SALT
    return proc


def person() -> ProfileState:
    """p1: e-mail, phone and CRM id; gold (active) and rich (exited); it absorbed p7 and p9."""
    return ProfileState(
        "p1", created_ms=1,
        identities={"Email": {"ann@example.com": 1}, "Phone": {"+442079460958": 2}, "CRMID": {"C-1": 3}},
        attributes={"loyalty.tier": AttributeValue("gold", "crm", 5)},
        memberships={"gold": Membership("gold", "realized", 5, 1, "tier", 5),
                     "rich": Membership("rich", "exited", 6, 1, "points", 6)},
        claims={"ECID:cookie-1": {"p1": 4}}, merged=["p7", "p9"])


def erase_msg(pid: str, request: str = "er-1") -> Erase:
    return Erase(pid=pid, request=request, subject=hashed(SALT, "Email:ann@example.com"), suppress=False,
                 requested_ms=NOW - 10)


def test_a_request_is_recorded_without_the_identity_and_sent_to_its_identity() -> None:
    # When an erasure of an e-mail is requested
    request, sends = start_erasure("Email:ann@example.com", SALT, suppress=True, now_ms=NOW, request="er-1")
    # Then the status record holds only the salted hash, and the op goes to the e-mail's identity partition
    subject = hashed(SALT, "Email:ann@example.com")
    assert request == "er-1"
    assert sends == [
        Send(ERASURE_TOPIC, "er-1", {"request": "er-1", "subject": subject, "status": "requested", "suppress": True,
                                     "requested_ms": NOW}),
        Send(IDENTITY_TOPIC, "Email:ann@example.com", Erase(request="er-1", subject=subject, suppress=True,
                                                            requested_ms=NOW)),
    ]
    assert "ann" not in repr(sends[0]) and len(subject) == 32
    # And the hash depends on the salt
    assert hashed(salt_of("other", "app"), "Email:ann@example.com") != subject
    assert salt_of("", "app") == b"app"


def test_the_identity_stage_sends_the_erasure_to_the_owner_or_reports_nothing_found() -> None:
    msg = msgspec.structs.replace(erase_msg("x"), pid=None)
    # Given an owned identity, Then the erasure goes to its profile and the identity is not written
    owned = erase_at_identity("Email:ann@example.com", "p1", msg, NOW)
    assert owned.write is None and not owned.delete
    assert owned.sends == [Send(PROFILE_TOPIC, "p1", erase_msg("p1"))]
    # Given an identity with no owner (erased already, or never seen), Then the request is done, nothing found
    free = erase_at_identity("Email:ann@example.com", None, msg, NOW)
    assert free.sends == [Send(ERASURE_TOPIC, "er-1", {
        "request": "er-1", "subject": msg.subject, "status": "done", "found": False, "suppress": False,
        "requested_ms": NOW - 10, "done_ms": NOW, "erased": {"profiles": 0, "identities": 0, "memberships": 0},
        "traces": []})]


def test_the_profile_stage_erases_the_person_everywhere_it_owns() -> None:
    # Given p1 with three identities, a pending claim, an active and an exited membership, two absorbed ids
    proc = processor()
    # When its erasure arrives
    res = proc.handle("p1", person(), erase_msg("p1"))
    # Then the entry is deleted
    assert res.delete
    # And the active membership exits with reason erasure, carrying the identities (destinations delete by them)
    assert [(c.profile_id, c.audience_id, c.status, c.previous_status, c.reason, c.evaluation, c.identities)
            for c in res.changes] == [
        ("p1", "gold", "exited", "realized", "erasure", "erasure",
         {"CRMID": ["C-1"], "Email": ["ann@example.com"], "Phone": ["+442079460958"]})]
    keys = ["CRMID:C-1", "Email:ann@example.com", "Phone:+442079460958", "ECID:cookie-1"]
    state = [f"{p}|{a}" for p in ("p1", "p7", "p9") for a in ("gold", "rich")]
    assert res.sends == [
        # every identity, listed or pending, is released (compare-and-set: only if still p1's, or still one of
        # the absorbed profiles', whose repoint to p1 may not have reached it yet)
        *[Send(IDENTITY_TOPIC, k, Release(pid="p1", absorbed=("p7", "p9"))) for k in keys],
        # the forwards of the absorbed profiles go (they keep the identities they repointed)
        Send(PROFILE_TOPIC, "p7", EraseForward(pid="p7")),
        Send(PROFILE_TOPIC, "p9", EraseForward(pid="p9")),
        # tombstones for its and their membership state
        *[Send(MEMBERSHIP_STATE_TOPIC, k, None) for k in state],
        Send(ERASURE_TOPIC, "er-1", {
            "request": "er-1", "subject": hashed(SALT, "Email:ann@example.com"), "status": "done", "found": True,
            "suppress": False, "requested_ms": NOW - 10, "done_ms": NOW,
            "erased": {"profiles": 3, "identities": 4, "memberships": 1},
            "traces": sorted(hashed(SALT, v) for v in (*keys, "p1", "p7", "p9"))}),
    ]


def test_an_identity_an_absorbed_profile_still_owns_is_freed_by_the_erasure_and_its_repoint_then_does_nothing() -> None:
    # Given Email:ann still owned by p7, which p1 absorbed (p7's repoint to p1 not yet handled)
    release = next(s.value for s in processor().handle("p1", person(), erase_msg("p1")).sends
                   if s.key == "Email:ann@example.com")
    # When the erasure's release reaches the identity stage
    freed = handle_identity("Email:ann@example.com", "p7", release)
    # Then the identity is free
    assert freed.delete and freed.write is None
    # And p7's late repoint to the erased p1 finds nothing to move: the erased id is never its owner again
    late = handle_identity("Email:ann@example.com", None, Repoint(old="p7", new="p1"))
    assert late.write is None


def test_an_erasure_handled_again_does_nothing_more() -> None:
    # Given p1 erased (no entry left), When the same request is delivered again, Then nothing is sent
    res = processor().handle("p1", None, erase_msg("p1"))
    assert res.sends == [] and res.changes == [] and not res.delete and res.counters == {"stale": 1}


def test_a_forward_passes_an_erasure_on_and_is_erased_by_its_survivor() -> None:
    proc = processor()
    forward = Forward("p1", "p7/1", ("Email:ann@example.com",), ())
    # When an erasure reaches a merged-away profile, Then it goes to the survivor
    passed = proc.handle("p7", forward, erase_msg("p7"))
    assert passed.sends == [Send(PROFILE_TOPIC, "p1", erase_msg("p1"))] and not passed.delete
    # When the survivor's erasure reaches the forward, Then the forward is deleted with what it kept
    gone = proc.handle("p7", forward, EraseForward(pid="p7"))
    assert gone.delete and gone.sends == []
    # And a live profile under that id is not touched by it
    live = proc.handle("p7", replace(person(), profile_id="p7"), EraseForward(pid="p7"))
    assert not live.delete and live.write is None and live.counters == {"stale": 1}


def test_an_erasure_that_reaches_a_merging_profile_waits_and_follows_the_merge() -> None:
    proc = processor()
    merging = replace(person(), profile_id="p9", merged=[], merging=("p1", "p9/1"))
    # When the erasure arrives while p9 waits to be absorbed, Then it is held
    held = proc.handle("p9", merging, erase_msg("p9"))
    assert isinstance(held.write, ProfileState) and held.write.held == [erase_msg("p9")] and not held.delete
    # When the merge is refused, Then the held erasure is handled: the profile is deleted
    refused = proc.handle("p9", held.write, Refused(pid="p9", token="p9/1", by="p1"))
    assert refused.delete and refused.write is None
    assert [c.reason for c in refused.changes] == ["erasure"]


def test_the_suppression_list_drops_an_identity_by_its_hash() -> None:
    # Given a log that read a suppress request and a plain one
    erasures = ErasureLog(SALT)
    assert not erasures.is_suppressed(Identity("Email", "ann@example.com"))  # empty: nothing is hashed
    erasures.note({"request": "er-1", "subject": hashed(SALT, "Email:ann@example.com"), "status": "requested",
                   "suppress": True})
    erasures.note({"request": "er-2", "subject": hashed(SALT, "Email:bob@example.com"), "status": "done",
                   "suppress": False})
    erasures.note(None)
    # Then only the suppressed identity is dropped
    assert erasures.is_suppressed(Identity("Email", "ann@example.com"))
    assert not erasures.is_suppressed(Identity("Email", "bob@example.com"))
    assert not erasures.is_suppressed(Identity("CRMID", "ann@example.com"))
    assert sorted(erasures.requests) == ["er-1", "er-2"]


def test_ingest_drops_a_suppressed_identity_and_what_it_derives_never_dead_lettering_the_record() -> None:
    # Given a decoder whose suppression list holds Ann's e-mail
    cfg = PipelineConfig.load(DEFAULT_CONFIG)
    erasures = ErasureLog(SALT)
    erasures.note({"request": "er-1", "subject": hashed(SALT, "Email:ann@example.com"), "suppress": True})
    dropped: list[Dropped] = []
    decoder = Decoder("event", AvroCodec("ExperienceEvent"), cfg.profile.identity, cfg.profile.datasets,
                      dropped.extend, erasures.is_suppressed)

    def event(identity_map: dict[str, Any]) -> bytes:
        return decoder.codec.encode({"eventId": "e1", "timestamp": NOW, "eventType": "pageView",
                                     "dataset": "web-events", "identityMap": identity_map})

    # When an event carries her e-mail (written another way) and a cookie
    got = decoder.decode(event({"ECID": [{"id": "c1", "primary": True}], "Email": [{"id": " Ann@Example.com"}]}),
                         NOW)
    # Then only the cookie is kept: the e-mail and its derived hash are dropped as suppressed
    assert isinstance(got, ExperienceEvent) and got.identities == (Identity("ECID", "c1"),)
    assert [(d.namespace, d.reason) for d in dropped] == [("Email", "suppressed"), ("EMAIL_LC_SHA256", "suppressed")]
    # When an event carries only her e-mail, Then it is skipped (not dead-lettered: its bytes hold the e-mail)
    assert decoder.decode(event({"Email": [{"id": "ann@example.com"}]}), NOW) == Skipped("suppressed-identity",
                                                                                       "web-events")
    # And anyone else's e-mail goes through
    other = decoder.decode(event({"Email": [{"id": "bob@example.com"}]}), NOW)
    assert isinstance(other, ExperienceEvent) and Identity("Email", "bob@example.com") in other.identities


def test_an_erasure_exit_reaches_destinations_marked_as_such() -> None:
    # Given an HTTP destination of every audience by CRM id
    dest = parse_destinations("destinations:\n  - name: hook\n    kind: http\n    audiences: \"*\"\n"
                              "    identities:\n      - {namespace: CRMID}\n    url: http://x/\n").destinations[0]
    # When the erasure's exit is mapped for it, Then the payload says it is an erasure
    change = processor().handle("p1", person(), erase_msg("p1")).changes[0].to_dict()
    payload = map_change(change, dest)
    assert isinstance(payload, Payload) and payload.to_dict() == {
        "destination": "hook", "profile_id": "p1", "audience_id": "gold", "kind": "membership",
        "status": "exited", "identities": {"CRMID": ["C-1"]}, "attributes": {},
        "idempotency_key": change["idempotency_key"], "event_time_ms": NOW, "source_emit_ms": NOW,
        "reason": "erasure"}
    # And an ordinary exit carries no reason (payloads stay as they were)
    ordinary = map_change({**change, "reason": "tier changed"}, dest)
    assert isinstance(ordinary, Payload) and "reason" not in ordinary.to_dict()


def test_a_verification_finds_hashed_and_plain_traces() -> None:
    wanted = {hashed(SALT, "Email:ann@example.com"), hashed(SALT, "p1")}
    v = Verification("er-1")
    rows = [
        (b"Email:ann@example.com", "p1", b"p1"),  # an identity-table row: key and value
        (b"p2|gold", {"profile_id": "p2", "identities": {"Email": ["bob@example.com"]}}, b"..."),
        (b"p1|gold", {"profile_id": "p1", "identities": {}}, b"..."),  # membership state of p1
        (b"p3", {"profile_id": "p3", "ids": ["Email:ann@example.com"]}, b"raw +442079460958"),
    ]
    scan(v, "topic t", rows, wanted, SALT, plain=[b"+442079460958"])
    assert [(t.where, t.place) for t in v.traces] == [("topic t", "key"), ("topic t", "value"),
                                                      ("topic t", "key"), ("topic t", "value"),
                                                      ("topic t", "value")]
    assert v.plain_hits == ["topic t"] and not v.clean and v.scanned == {"topic t": 4}
    clean = Verification("er-1")
    scan(clean, "store s", rows[1:2], wanted, SALT)
    assert clean.clean and clean.lines() == ["erasure er-1: scanned store s (1 records)", "erasure er-1: no trace left"]


def test_verification_finds_an_identity_left_only_in_a_profiles_identity_datasets() -> None:
    # Given a stored profile that no longer lists the e-mail but still names it as an identity's dataset key
    stored = ProfileState("p2", created_ms=1, identities={"ECID": {"c1": 1}},
                          identity_sources={"ECID:c1": "web-events", "Email:ann@example.com": "crm"})
    raw = encode_profile(stored)
    # When the stores are searched for the erased e-mail's hash
    v = Verification("er-1")
    scan(v, "store profiles[0]", [(b"p2", profile_tokens(raw), raw)], {hashed(SALT, "Email:ann@example.com")}, SALT)
    # Then it is found there: an identity's dataset entry is removed with the identity, or verification says so
    assert [(t.where, t.place) for t in v.traces] == [("store profiles[0]", "value")]
