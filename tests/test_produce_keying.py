"""`pipeline produce --key`: records keyed by the person's highest-priority identity, normalised as ingest does."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from pipeline.identity.namespaces import IdentityConfig
from pipeline.ingest.decode import Decoder, Rejected
from pipeline.ingest.keys import NO_IDENTITY, KeyChoice, KeySpec, RecordKeyer
from pipeline.model import ExperienceEvent, ProfileRecord
from pipeline.settings import DEFAULT_CONFIG, PipelineConfig
from pipeline.state.tables import partition_for
from pipeline.topics import TopicRegistry

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000_000
ANN_SHA = hashlib.sha256(b"ann.lee@example.com").hexdigest()
BOB_SHA = hashlib.sha256(b"bob@example.com").hexdigest()


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "KAFKA_BOOTSTRAP": "127.0.0.1:1", **(env_extra or {})})


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return PipelineConfig.load(DEFAULT_CONFIG)


def event(event_id: str, identity_map: dict[str, list[str]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"eventId": event_id, "timestamp": NOW, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {ns: [{"id": v} for v in ids] for ns, ids in (identity_map or {}).items()}, **extra}


EVENTS = [
    # several namespaces in identityMap; the e-mail in upper case with spaces around it
    event("e-1", {"ECID": ["c-1"], "Email": ["  Ann.Lee@Example.COM "], "Phone": ["+1 (415) 555-0100"]}),
    # only the schema's annotated identity field (ecid -> ECID), with spaces
    event("e-2", ecid="  c-2 "),
    # two device namespaces of equal priority: namespace order decides (GAID before IDFA), GAID is lower-cased
    event("e-3", {"IDFA": ["abc-def"], "GAID": ["XYZ-1"]}),
    # no identity at all
    event("e-4"),
    # an identity the pipeline rejects (not an e-mail): no usable identity either
    event("e-5", {"Email": ["not-an-email"]}),
]
PROFILES = [
    # annotated fields: crmId (CRMID, priority 100) wins over email (60) and phone (50)
    {"recordId": "r-1", "timestamp": NOW, "dataset": "crm", "crmId": " CRM-7 ", "email": "BOB@Example.com",
     "phone": "415-555-0199"},
]


def keys(reg: TopicRegistry, logical: str, records: list[dict[str, Any]], spec: str,
         identity: IdentityConfig | None) -> list[KeyChoice]:
    keyer = RecordKeyer.for_codec(KeySpec.parse(spec), reg[logical].codec, identity)
    return [keyer(r) for r in records]


def test_record_keys_under_every_key_form(cfg):
    # Given the example identity configuration and the ingest topics' schemas
    reg = TopicRegistry.load(prefix="")
    ids = cfg.profile.identity
    # When each event is keyed under each --key form
    got = {spec: keys(reg, "ingest.events", EVENTS, spec, ids)
           for spec in ("identity", "identity:Phone", "field:eventId", "field:ecid", "none")}
    # Then identity keys are "<namespace>:<normalised id>" of the highest-priority identity, the record id
    # when there is no usable identity, and how each key was chosen is said without its value
    no_id = [KeyChoice("e-4", NO_IDENTITY), KeyChoice("e-5", NO_IDENTITY)]
    assert got == {
        "identity": [KeyChoice("Email:ann.lee@example.com", "identity Email"),
                     KeyChoice("ECID:c-2", "identity ECID"),
                     KeyChoice("GAID:xyz-1", "identity GAID"), *no_id],
        "identity:Phone": [KeyChoice("Phone:+14155550100", "identity Phone"),
                           KeyChoice("ECID:c-2", "identity ECID (no Phone)"),
                           KeyChoice("GAID:xyz-1", "identity GAID (no Phone)"), *no_id],
        "field:eventId": [KeyChoice(f"e-{n}", "field eventId") for n in range(1, 6)],
        "field:ecid": [KeyChoice(None, "no key (no field ecid)"), KeyChoice("  c-2 ", "field ecid"),
                       *[KeyChoice(None, "no key (no field ecid)")] * 3],
        "none": [KeyChoice(None, "none")] * 5,
    }
    # And a profile record's annotated fields are identities too; a derived namespace can be asked for
    assert [keys(reg, "ingest.profiles", PROFILES, spec, ids)[0]
            for spec in ("identity", "identity:Email", "identity:EMAIL_LC_SHA256", "identity:Phone",
                         "field:recordId")] == [
        KeyChoice("CRMID:CRM-7", "identity CRMID"),
        KeyChoice("Email:bob@example.com", "identity Email"),
        KeyChoice(f"EMAIL_LC_SHA256:{BOB_SHA}", "identity EMAIL_LC_SHA256"),
        KeyChoice("Phone:+14155550199", "identity Phone"),
        KeyChoice("r-1", "field recordId"),
    ]


def test_identity_key_is_the_first_identity_the_ingest_decoder_finds(cfg):
    # Given the records above, encoded as producers send them, and the worker's decoder for each topic
    reg = TopicRegistry.load(prefix="")
    for logical, kind, records in (("ingest.events", "event", EVENTS), ("ingest.profiles", "profile", PROFILES)):
        codec = reg[logical].codec
        decoder = Decoder(kind, codec, cfg.profile.identity, cfg.profile.datasets)  # type: ignore[arg-type]
        keyer = RecordKeyer.for_codec(KeySpec("identity"), codec, cfg.profile.identity)
        for r in records:
            # When the producer keys the record and the pipeline decodes it
            choice, decoded = keyer(r), decoder.decode(codec.encode(r), NOW)
            # Then the key is the identity-table key of the decoded record's first (highest-priority) identity
            if isinstance(decoded, ExperienceEvent | ProfileRecord):
                assert choice.key == decoded.identities[0].key
            else:  # the decoder rejects it: the producer keyed it by its id
                assert isinstance(decoded, Rejected) and decoded.reason == "no-usable-identity"
                assert choice.source == NO_IDENTITY


def test_key_forms_are_checked():
    # Given forms that are not valid, When parsed, Then the error lists the valid forms
    for bad in ("", "identities", "field", "field:", "none:x", "identity: Email", "key:eventId"):
        with pytest.raises(ValueError, match=r"valid: identity, identity:NAMESPACE, field:NAME, none"):
            KeySpec.parse(bad)
    assert [KeySpec.parse(s) for s in ("identity", "identity:Phone", "field:eventId", "none")] == [
        KeySpec("identity"), KeySpec("identity", "Phone"), KeySpec("field", "eventId"), KeySpec("none")]


def test_produce_refuses_an_unknown_key_form_or_namespace(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps(event("e-1", {"Email": ["ann.lee@example.com"]})) + "\n")
    # Given an unknown --key form, When producing, Then argparse stops with the valid forms (nothing is sent)
    out = run("produce", "--topic", "ingest.events", "--file", str(f), "--key", "email")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines()[-1] == ("pipeline produce: error: argument --key: unknown key form 'email'; "
                                           "valid: identity, identity:NAMESPACE, field:NAME, none")
    # Given a namespace identity.yaml does not declare, Then the error names the file and the valid namespaces
    out = run("produce", "--topic", "ingest.events", "--file", str(f), "--key", "identity:Phon")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (f"configuration error: {DEFAULT_CONFIG / 'identity.yaml'}: --key identity:Phon: unknown "
                          "namespace 'Phon'; valid: CRMID, ECID, EMAIL_LC_SHA256, Email, GAID, IDFA, Phone\n")


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list[tuple[str, str, int, int]]:
    """(eventId, key, partition, offset) of every record of the topic."""
    from pipeline.serde.avro import AvroCodec

    codec = AvroCodec("ExperienceEvent")
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, -2) for p in md.partitions])
    out: list[tuple[str, str, int, int]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for m in c.consume(100, timeout=0.2):
            if m.error() is None:
                out.append((codec.decode(m.value())["eventId"], m.key().decode(), m.partition(), m.offset()))
    c.close()
    return sorted(out)


def test_produce_keys_one_persons_records_into_one_partition(kafka_bootstrap, registry, topic_prefix, tmp_path):
    # Given a file with Ann's events (her e-mail written three ways, each with a different cookie), Bob's events
    # (his phone written three ways, no cookie) and one event without an identity, interleaved
    lines = [
        event("a-1", {"Email": ["Ann.Lee@Example.COM"], "ECID": ["c-a1"]}),
        event("b-1", {"Phone": ["+1 (415) 555-0100"]}),
        event("a-2", {"Email": [" ann.lee@example.com "]}, ecid="c-a2"),
        event("x-1"),
        event("b-2", {"Phone": ["415-555-0100"]}),
        event("a-3", {"ECID": ["c-a3"], "Email": ["ANN.LEE@EXAMPLE.COM"]}),
        event("b-3", {"Phone": ["0014155550100"]}),
    ]
    f = tmp_path / "events.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in lines))
    # When `pipeline produce` publishes it with the default key
    out = run("produce", "--topic", "ingest.events", "--file", str(f),
              env_extra={"KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": topic_prefix})
    # Then it says how the keys were chosen, never an identity value
    topic = registry.name("ingest.events")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    ours = [ln for ln in out.stderr.splitlines(keepends=True)  # not librdkafka's log (e.g. a GETPID retry)
            if not ln.startswith("%") and "pipeline.librdkafka" not in ln]
    assert not any(v in out.stderr.lower() for v in ("ann.lee", "example.com", "4155550100", "c-a"))
    assert "".join(ours) == (
        f"published 7 records to {topic}, keyed by --key identity: 3 identity Email, 3 identity Phone, "
        f"1 {NO_IDENTITY}\n"
        "1 record carries no usable identity: the pipeline dead-letters it (ingest.dlq, with the reason in "
        "the headers)\n")
    # And each person's records carry the person's identity key, sit in the partition Kafka's murmur2 gives
    # that key (where a Java producer or the worker would put it too), in the order of the file
    ann, bob = "Email:ann.lee@example.com", "Phone:+14155550100"
    pa, pb, px = (partition_for(k.encode(), 4) for k in (ann, bob, "x-1"))
    got = read_all(kafka_bootstrap, topic, len(lines))
    assert [(e, k, p) for e, k, p, _ in got] == [
        ("a-1", ann, pa), ("a-2", ann, pa), ("a-3", ann, pa),
        ("b-1", bob, pb), ("b-2", bob, pb), ("b-3", bob, pb),
        ("x-1", "x-1", px),
    ]
    assert [o for *_, o in got[0:3]] == sorted(o for *_, o in got[0:3])
    assert [o for *_, o in got[3:6]] == sorted(o for *_, o in got[3:6])


def test_identity_keys_follow_the_home_identity_when_a_unique_namespace_ranks_lower() -> None:
    # Given a configuration where the unique CRM id ranks below the e-mail
    from pipeline.identity.namespaces import parse_identity_config
    from pipeline.ingest.keys import choose_key

    identity = parse_identity_config("""\
max_identities_per_graph: 50
namespaces:
  - {name: ECID, kind: cookie, priority: 10, normaliser: trim}
  - {name: Email, kind: person, priority: 60, normaliser: email}
  - {name: CRMID, kind: person, priority: 5, unique: true, normaliser: trim}
""")
    spec = KeySpec.parse("identity")
    # When records with and without a CRM id are keyed
    with_crm = {"identityMap": {"Email": [{"id": "A@B.io"}], "CRMID": [{"id": "C-7"}], "ECID": [{"id": "c"}]}}
    without = {"identityMap": {"Email": [{"id": "A@B.io"}], "ECID": [{"id": "c"}]}}
    # Then the key is the home identity the pipeline routes by: the CRM id, else the highest priority
    assert choose_key(with_crm, spec, identity) == KeyChoice("CRMID:C-7", "identity CRMID")
    assert choose_key(without, spec, identity) == KeyChoice("Email:a@b.io", "identity Email")
