"""The pure ingest decoder: identities from identityMap and schema annotations, flattening, verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.ingest.decode import Decoder, Rejected, Skipped
from pipeline.model import ExperienceEvent, Identity, ProfileRecord
from pipeline.serde.avro import AvroCodec
from pipeline.settings import DEFAULT_CONFIG, PipelineConfig

NOW = 1_800_000_000_000


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return PipelineConfig.load(DEFAULT_CONFIG)


@pytest.fixture
def decoder(cfg: PipelineConfig):
    def make(kind: str) -> Decoder:
        name = "ExperienceEvent" if kind == "event" else "ProfileRecord"
        return Decoder(kind, AvroCodec(name), cfg.profile.identity, cfg.profile.datasets)  # type: ignore[arg-type]
    return make


def encode(decoder: Decoder, value: dict[str, Any]) -> bytes:
    return decoder.codec.encode(value)


def test_event_with_identity_map_and_payload(decoder):
    d = decoder("event")
    data = encode(d, {"eventId": "e1", "timestamp": NOW, "eventType": "purchase", "dataset": "web-events",
                      "identityMap": {"ECID": [{"id": " c1 ", "primary": True}], "Email": [{"id": "A@B.io"}]},
                      "commerce": {"order": {"id": "o1", "total": 12.5, "currency": "EUR"}},
                      "fields": {"campaign": "x"}})
    got = d.decode(data, NOW)
    sha = "b8a6bd3bc4e1f6a4c9de1a2c0dbd2c0abc9c7d6ae1d8e8e3a5f5bd1c2d6c6b51"
    assert isinstance(got, ExperienceEvent)
    assert [i.namespace for i in got.identities] == ["Email", "EMAIL_LC_SHA256", "ECID"]
    assert got.identities[0] == Identity("Email", "a@b.io") and got.identities[2] == Identity("ECID", "c1")
    assert len(got.identities[1].id) == len(sha)
    assert got.primary == Identity("ECID", "c1")
    assert got.fields == {"commerce.order.id": "o1", "commerce.order.total": 12.5,
                          "commerce.order.currency": "EUR", "campaign": "x"}


def test_profile_record_identities_from_annotated_fields(decoder):
    d = decoder("profile")
    data = encode(d, {"recordId": "r1", "timestamp": NOW, "dataset": "crm", "crmId": "C1", "phone": "(201) 555-0123",
                      "loyalty": {"tier": "gold", "points": 5}})
    got = d.decode(data, NOW)
    assert isinstance(got, ProfileRecord)
    assert got.identities == (Identity("CRMID", "C1"), Identity("Phone", "+12015550123"))
    assert got.primary == Identity("CRMID", "C1")
    assert got.attributes == {"loyalty.tier": "gold", "loyalty.points": 5}


@pytest.mark.parametrize("value,reason", [
    ({"identityMap": {}}, "no-usable-identity"),
    ({"identityMap": {"Email": [{"id": "nope"}]}}, "no-usable-identity"),
    ({"identityMap": {"Martian": [{"id": "x"}]}}, "no-usable-identity"),
    ({"identityMap": {"ECID": [{"id": "c"}]}, "dataset": "unknown-ds"}, "unknown-dataset"),
    ({"identityMap": {"ECID": [{"id": "c"}]}, "timestamp": NOW + 2 * 86400_000}, "timestamp-out-of-range"),
    ({"identityMap": {"ECID": [{"id": "c"}]}, "timestamp": 1_800_000_000}, "ok-seconds-look-like-1970"),
])
def test_rejections(decoder, value, reason):
    d = decoder("event")
    base = {"eventId": "e", "timestamp": NOW, "eventType": "pageView", "dataset": "web-events"}
    got = d.decode(encode(d, {**base, **value}), NOW)
    if reason.startswith("ok"):
        assert isinstance(got, ExperienceEvent)  # a seconds timestamp is old, not rejected: windows ignore it
        return
    assert isinstance(got, Rejected) and got.reason == reason
    assert "nope" not in got.detail  # never echo identity values


def test_bytes_that_are_not_avro(decoder):
    d = decoder("event")
    assert d.decode(b"hello", NOW) == Rejected("not-avro", "magic byte 104, expected 0")
    assert d.decode(b"", NOW).reason == "not-avro"  # type: ignore[union-attr]


def test_dataset_not_enabled_for_profile_is_skipped(decoder, cfg):
    disabled = [n for n, ds in cfg.profile.datasets.datasets.items() if not ds.enabled_for_profile]
    assert disabled, "the example config declares a dataset not enabled for profile"
    d = decoder("event")
    got = d.decode(encode(d, {"eventId": "e", "timestamp": NOW, "eventType": "pageView", "dataset": disabled[0],
                              "identityMap": {"ECID": [{"id": "c"}]}}), NOW)
    assert got == Skipped("dataset-not-enabled-for-profile", disabled[0])


def test_a_record_naming_two_crm_ids_is_dead_lettered_with_its_reason(decoder):
    # Given a CRM record carrying two different CRM ids (CRMID is a unique namespace), and one carrying the
    # same CRM id twice
    d = decoder("profile")
    two = encode(d, {"recordId": "r1", "timestamp": NOW, "dataset": "crm",
                     "identityMap": {"CRMID": [{"id": "C-1"}, {"id": "C-2"}], "Email": [{"id": "a@b.io"}]}})
    same = encode(d, {"recordId": "r2", "timestamp": NOW, "dataset": "crm",
                      "identityMap": {"CRMID": [{"id": "C-1"}, {"id": " C-1 "}]}})
    # When they are decoded
    # Then the first is rejected, the reason naming the namespace and no value; the second is one CRM id
    assert d.decode(two, NOW) == Rejected(
        "conflicting-unique-identities",
        "the record carries several CRMID ids; CRMID is unique: a record names one person")
    got = d.decode(same, NOW)
    assert isinstance(got, ProfileRecord) and got.identities == (Identity("CRMID", "C-1"),)


def test_records_over_the_size_limits_are_dead_lettered_with_their_reason(decoder, cfg):
    # Given the example limits (64 KiB per record, 20 identities per record, 256 characters per identity)
    limits = cfg.profile.datasets.limits
    assert (limits.max_record_bytes, limits.max_identities_per_record, limits.max_identity_length) == (65536, 20, 256)
    d = decoder("event")
    base = {"eventId": "e1", "timestamp": NOW, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {"ECID": [{"id": "c1"}]}}
    # When a record is too big, carries 25 e-mails, has a 300-character cookie, or has no value at all
    big = d.decode(encode(d, {**base, "fields": {"blob": "x" * 70_000}}), NOW)
    many = d.decode(encode(d, {**base, "identityMap": {"Email": [{"id": f"p{i}@x.io"} for i in range(25)]}}), NOW)
    long_and_short = d.decode(encode(d, {**base, "identityMap": {"ECID": [{"id": "c" * 300}, {"id": "c2"}]}}), NOW)
    only_long = d.decode(encode(d, {**base, "identityMap": {"ECID": [{"id": "c" * 300}]}}), NOW)
    null = d.decode(None, NOW)
    # Then each is rejected with a reason and a detail without values; an over-long identity is left out
    # like any junk identity (the record keeps its others)
    assert isinstance(big, Rejected) and big.reason == "record-too-large"
    assert big.detail.endswith("bytes; limits.max_record_bytes is 65536")
    assert many == Rejected("too-many-identities", "50 identities; limits.max_identities_per_record is 20")
    assert isinstance(long_and_short, ExperienceEvent) and long_and_short.identities == (Identity("ECID", "c2"),)
    assert only_long == Rejected("no-usable-identity", "a ECID value longer than limits.max_identity_length (256)")
    assert null == Rejected("null-value", "the record has no value (a tombstone?)")
