"""Backfill planning (pure) and the example destinations.yaml against the example audiences."""

from __future__ import annotations

from collections import Counter

from dest_helpers import dest_config, membership

from pipeline.destinations.backfill import DestState, Plan, member_payloads, next_state, plan_for
from pipeline.destinations.config import load_destinations
from pipeline.destinations.files import FileSettings
from pipeline.destinations.http import HttpSettings
from pipeline.destinations.kafka_topic import KafkaSettings
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments import load_segments
from pipeline.topics import TopicRegistry

EXAMPLE = EXAMPLE_CONFIG_DIR


def test_plan_backfills_only_audiences_never_backfilled() -> None:
    cfg = dest_config(audiences="[vip, churn]")
    assert plan_for(cfg, None) == Plan(frozenset({"vip", "churn"}))
    assert plan_for(cfg, DestState(frozenset({"vip"}))) == Plan(frozenset({"churn"}))
    assert plan_for(cfg, DestState(frozenset({"vip", "churn", "old"}))).empty
    assert plan_for(cfg, DestState(frozenset(), all=True)).empty  # it streamed every audience already
    star = dest_config(audiences='"*"')
    assert plan_for(star, None) == Plan(None) and not Plan(None).empty
    assert plan_for(star, DestState(frozenset({"vip"}))) == Plan(None, frozenset({"vip"}))
    assert plan_for(star, DestState(frozenset({"vip"}), all=True)).empty


def test_next_state_records_mapped_audiences_or_all() -> None:
    cfg = dest_config(audiences="[vip]")
    assert next_state(cfg, DestState(frozenset({"vip", "gone"})), ["x"]).audiences == {"vip"}
    star = next_state(dest_config(audiences='"*"'), DestState(frozenset({"a"})), ["b"])
    assert star.all and star.audiences == {"a", "b"}
    assert DestState.from_json(star.to_json()).same_as(star)


def test_member_payloads_map_current_members_with_the_normal_rules() -> None:
    cfg = dest_config(audiences="[vip, churn]")
    members = [membership("p1", "vip", status="existing"), membership("p2", "vip", consent="no"),
               membership("p3", "other"), membership("p4", "churn", email=None, crm=None),
               membership("p5", "churn")]
    skips: Counter[str] = Counter()
    out = member_payloads(cfg, members, Plan(frozenset({"vip", "churn"}), frozenset({"churn"})), skips)
    assert [(p.profile_id, p.status) for p in out] == [("p1", "realized")]
    assert out[0].idempotency_key.endswith(":backfill")
    assert skips == {"consent_denied": 1}
    assert len(member_payloads(cfg, members, None, key_suffix="")) == 2  # p1, p5


def test_example_destinations_fit_the_example_audiences_and_attributes() -> None:
    dests = load_destinations(EXAMPLE / "destinations.yaml", env={})  # no secrets needed
    audiences = {a.id for a in load_segments(EXAMPLE / "segments.yaml")}
    reg = TopicRegistry.load(prefix="")
    known_attrs = {"person.firstName", "person.lastName", "loyalty.tier", "consents.email"}
    for d in dests:
        assert d.audiences is None or d.audiences <= audiences, (d.name, d.audiences - audiences)
        assert set(d.attributes) <= known_attrs, d.name
        assert d.consent is None or d.consent.attribute in known_attrs
        if isinstance(d.settings, HttpSettings):
            assert d.settings.url.startswith("http://127.0.0.1:")
        if isinstance(d.settings, KafkaSettings):
            reg[d.settings.topic]  # a logical topic of topics.yaml
        if isinstance(d.settings, FileSettings):
            assert d.settings.path.startswith("data/exports/")
