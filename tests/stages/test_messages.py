"""Typed stage messages: each operation's wire form is the dict the stages wrote before (both ways), stored
messages inside profile entries decode the same, and every logical topic name is declared in topics.yaml."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pipeline import topics
from pipeline.model import ProfileState
from pipeline.stages import messages
from pipeline.stages.messages import (
    Absorb,
    Accepted,
    Apply,
    AttributesWire,
    Batch,
    Claim,
    Claimed,
    DefsCheck,
    Erase,
    EraseForward,
    Evaluate,
    EventWire,
    Link,
    Progress,
    Receipt,
    Refused,
    Release,
    Repoint,
    Resolve,
    Resume,
    Taken,
    Tick,
)
from pipeline.state.codec import FORMAT_VERSION, Forward, decode_profile_entry, encode_profile
from pipeline.topics import TopicRegistry

EVENT = {"ts": 7, "ds": "web-events", "ids": [["ECID", "c1"], ["Email", "a@x"]], "pri": ["ECID", "c1"], "k": "e",
         "id": "r1", "t": "pageView", "f": {"page": "/"}}
CRM = {"ts": 8, "ds": "crm", "ids": [["CRMID", "A"]], "pri": ["CRMID", "A"], "k": "p", "id": "r2",
       "f": {"loyalty.tier": "gold"}}
EVENT_WIRE = EventWire(timestamp_ms=7, dataset="web-events", identities=(("ECID", "c1"), ("Email", "a@x")),
                       primary=("ECID", "c1"), record_id="r1", event_type="pageView", fields={"page": "/"})
CRM_WIRE = AttributesWire(timestamp_ms=8, dataset="crm", identities=(("CRMID", "A"),), primary=("CRMID", "A"),
                          record_id="r2", attributes={"loyalty.tier": "gold"})
ERASE = {"request": "er-1", "subject": "5f1c", "suppress": True, "requested_ms": 3}

# Every operation, as the stages wrote it when messages were dicts (pipeline/identity/stitch.py, profiles/ops.py,
# profiles/agents.py, privacy/erasure.py, segments/batch.py at e0fc9eb), and the typed message it now is.
WRITTEN_BEFORE: list[tuple[dict[str, Any], messages.StageMessage]] = [
    ({"op": "resolve", "rec": EVENT, "cand": "p1"}, Resolve(rec=EVENT_WIRE, candidate="p1")),
    ({"op": "resolve", "rec": None, "cand": "p1"}, Resolve(rec=None, candidate="p1")),
    ({"op": "claim", "pid": "p1", "ts": 7}, Claim(pid="p1", ts=7)),
    ({"op": "repoint", "from": "p9", "to": "p1"}, Repoint(old="p9", new="p1")),
    ({"op": "repoint", "from": "p9", "to": "p1", "adopt": True}, Repoint(old="p9", new="p1", adopt=True)),
    ({"op": "release", "pid": "p1"}, Release(pid="p1")),
    ({"op": "erase", **ERASE}, Erase(request="er-1", subject="5f1c", suppress=True, requested_ms=3)),
    ({"op": "erase", **ERASE, "pid": "p1"}, Erase(request="er-1", subject="5f1c", suppress=True, requested_ms=3,
                                                  pid="p1")),
    ({"op": "apply", "pid": "p1", "rec": CRM, "home": "CRMID:A", "hop": True},
     Apply(pid="p1", rec=CRM_WIRE, home="CRMID:A", hop=True)),
    ({"op": "apply", "pid": "p1", "rec": None, "home": "ECID:c1", "hop": False},
     Apply(pid="p1", rec=None, home="ECID:c1")),
    ({"op": "claimed", "pid": "p1", "claimant": "p9", "key": "ECID:c1"}, Claimed(pid="p1", claimant="p9", key="ECID:c1")),
    ({"op": "taken", "pid": "p1", "claimant": "p1", "key": "ECID:c1", "owner": "p0"},
     Taken(pid="p1", claimant="p1", key="ECID:c1", owner="p0")),
    ({"op": "link", "pid": "p0", "from": "p1", "uniq": {"CRMID": ["A"]}, "via": "ECID:c1"},
     Link(pid="p0", sender="p1", uniq={"CRMID": ["A"]}, via="ECID:c1")),
    ({"op": "link", "pid": "p1", "from": "p0", "uniq": {}, "via": None}, Link(pid="p1", sender="p0")),
    ({"op": "absorb", "pid": "p0", "from": "p1", "token": "p1/3", "state": b"\x01P\x90"},
     Absorb(pid="p0", sender="p1", token="p1/3", state=b"\x01P\x90")),
    ({"op": "accepted", "pid": "p1", "token": "p1/3", "by": "p0"}, Accepted(pid="p1", token="p1/3", by="p0")),
    ({"op": "refused", "pid": "p1", "token": "p1/3", "by": "p0"}, Refused(pid="p1", token="p1/3", by="p0")),
    ({"op": "resume", "pid": "p1"}, Resume(pid="p1")),
    ({"op": "erase-forward", "pid": "p7"}, EraseForward(pid="p7")),
    ({"op": "tick", "pid": "p1"}, Tick(pid="p1")),
    # (new with activation.receipts: the map the destination runner writes, pipeline.destinations.receipts)
    ({"op": "receipt", "pid": "p1", "aud": "gold", "dest": "crm-webhook", "status": "entered", "at": 1700000000500,
      "ev": 1700000000000, "key": "0123456789abcdef0123456789abcdef"},
     Receipt(pid="p1", audience="gold", destination="crm-webhook", status="entered", delivered_ms=1700000000500,
             event_ms=1700000000000, key="0123456789abcdef0123456789abcdef")),
    ({"op": "evaluate", "audiences": ["gold"], "kind": "batch"}, Evaluate(audiences=["gold"])),
    ({"op": "evaluate", "kind": "definition", "audiences": None}, Evaluate(kind="definition")),
    ({"op": "batch", "run": "r1", "audiences": [], "since_ms": 0, "kind": "batch", "started_ms": 42},
     Batch(run="r1", started_ms=42)),
    ({"op": "defs-check"}, DefsCheck()),
    ({"op": "progress", "run": "r1", "partition": 2, "seen": 10, "total": 40, "final": False},
     Progress(run="r1", partition=2, seen=10, total=40)),
    ({"op": "progress", "run": "r1", "partition": 2, "seen": 40, "total": 40, "evaluated": 40, "changes": 3,
      "final": True, "aborted": False, "seconds": 1.5, "started_ms": 42},
     Progress(run="r1", partition=2, seen=40, total=40, evaluated=40, changes=3, final=True, seconds=1.5,
              started_ms=42)),
]
IDS = [f"{d['op']}-{i}" for i, (d, _) in enumerate(WRITTEN_BEFORE)]


def test_every_operation_has_a_typed_message_written_before_in_this_table() -> None:
    # Given the operations of the stages (the union msgspec decodes), Then each is in the table above
    tags = {cls.__struct_config__.tag for cls in messages.StageMessage.__args__}  # type: ignore[attr-defined]
    assert tags == {d["op"] for d, _ in WRITTEN_BEFORE}


@pytest.mark.parametrize(("written", "typed"), WRITTEN_BEFORE, ids=IDS)
def test_a_message_written_as_a_dict_before_an_upgrade_decodes_as_its_typed_message(
        written: dict[str, Any], typed: messages.StageMessage) -> None:
    # Given a message a worker of the previous version produced to an internal topic (msgpack of a dict)
    raw = msgpack.packb(written, use_bin_type=True)
    # When an upgraded worker reads it, Then it is the typed message with the same values
    assert messages.decode(raw) == typed


@pytest.mark.parametrize(("written", "typed"), WRITTEN_BEFORE, ids=IDS)
def test_a_typed_message_is_the_dict_a_worker_of_the_previous_version_reads(
        written: dict[str, Any], typed: messages.StageMessage) -> None:
    # When an upgraded worker sends a message (a rolling restart: the previous version may read it)
    sent = msgpack.unpackb(messages.encode(typed), raw=False)
    # Then it is a map with every key and value the previous version wrote, plus only fields at their defaults
    assert {k: sent[k] for k in written} == written
    extra = {k: v for k, v in sent.items() if k not in written}
    assert extra == {k: v for k, v in msgpack.unpackb(messages.encode(type(typed)(**_required(typed))),
                                                       raw=False).items() if k in extra}


def _required(msg: messages.StageMessage) -> dict[str, Any]:
    """The message's fields without a default (to build the same message with every default)."""
    fields = type(msg).__struct_fields__
    defaults = len(type(msg).__struct_defaults__)
    return {f: getattr(msg, f) for f in fields[:len(fields) - defaults]}


def test_a_release_naming_absorbed_profiles_is_a_plain_release_to_the_previous_version() -> None:
    # Given a release that may free the identity from the profiles its sender absorbed (a field added later)
    sent = messages.encode(Release(pid="p1", absorbed=("p9", "p12")))
    # When a worker of the previous version reads it (a dict reader: its keys are what it knows)
    read = msgpack.unpackb(sent, raw=False)
    # Then it is the release it knew, compare-and-set on the sender, with one key it ignores
    assert read == {"op": "release", "pid": "p1", "absorbed": ["p9", "p12"]}
    assert messages.decode(sent) == Release(pid="p1", absorbed=("p9", "p12"))


def test_a_message_that_is_no_stage_message_is_refused_by_decode() -> None:
    for raw in (msgpack.packb({"op": "merge", "pid": "p1"}), msgpack.packb({"pid": "p1"}), b"\xc1",
                msgpack.packb({"op": "claim", "pid": "p1"})):  # unknown op, no op, not msgpack, a field missing
        with pytest.raises((messages.msgspec.DecodeError, messages.msgspec.ValidationError)):
            messages.decode(raw)


def test_messages_held_by_a_profile_stored_before_typed_messages_decode_as_typed_messages() -> None:
    # Given a merging profile stored by the previous version: held messages, and a thaw's sends, as dicts
    held = [{"op": "apply", "pid": "p9", "rec": EVENT, "home": "ECID:c1", "hop": True},
            {"op": "absorb", "pid": "p9", "from": "p12", "token": "p12/1", "state": b"\x01P"}]
    thawed = ["p9/1", [["internal.identity", "Email:a@x", {"op": "claim", "pid": "p9", "ts": 7}]]]
    body = ["p9", 1, None, 3, {"ECID": {"c1": 1}}, [], [], [], [], [{}, ["p1", "p9/2"], held, [], thawed]]
    stored = bytes((FORMAT_VERSION, ord("P"))) + msgpack.packb(body, use_bin_type=True)
    # When an upgraded worker loads it
    profile = decode_profile_entry(stored)
    # Then they are the typed messages, and stored again they come back the same
    assert isinstance(profile, ProfileState)
    assert profile.held == [Apply(pid="p9", rec=EVENT_WIRE, home="ECID:c1", hop=True),
                            Absorb(pid="p9", sender="p12", token="p12/1", state=b"\x01P")]
    assert profile.thawed == ("p9/1", [["internal.identity", "Email:a@x", Claim(pid="p9", ts=7)]])
    assert decode_profile_entry(encode_profile(profile)) == profile
    # And a forward's passed messages the same way
    forward = bytes((FORMAT_VERSION, ord("F"))) + msgpack.packb(["p1", "p9/2", ["ECID:c1"], held[:1]])
    assert decode_profile_entry(forward) == Forward("p1", "p9/2", ("ECID:c1",), (profile.held[0],))


def test_every_topic_constant_is_declared_in_topics_yaml() -> None:
    # Given the registry loaded from topics.yaml
    declared = {spec.logical for spec in TopicRegistry.load(prefix="")}
    # Then every logical name the code uses is declared there, and every declared one but the example
    # destination's topic has its constant
    constants = {v for k, v in vars(topics).items() if k.isupper() and isinstance(v, str) and "." in v
                 and "/" not in v}
    assert constants == set(topics.LOGICAL_TOPICS)
    assert set(topics.LOGICAL_TOPICS) <= declared
    assert declared - set(topics.LOGICAL_TOPICS) == {"activation.dest-kafka-example"}


def test_no_module_spells_a_logical_topic_name() -> None:
    # Given every module of the package but the registry's own
    root = Path(topics.__file__).parent
    names = set(topics.LOGICAL_TOPICS)
    spelled = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "topics.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{rel}:{node.lineno} {node.value}")
    # Then none spells a topic name: they name it through pipeline.topics
    assert spelled == []
