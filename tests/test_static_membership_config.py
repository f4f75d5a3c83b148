"""Static group membership settings (issue 14, item 6): the instance ids, the switches, the ingest config."""

from __future__ import annotations

import pytest

from pipeline.app import static_members
from pipeline.errors import ConfigError
from pipeline.ingest.agents import consumer_config, ingest_group
from pipeline.settings import Settings
from pipeline.state.faust_compat import static_membership_supported


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("PIPELINE_STATIC_MEMBERSHIP", "PIPELINE_LEAVE_GROUP_ON_STOP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_APP_ID", "cdp-prod")
    monkeypatch.setenv("PIPELINE_WORKER_NAME", "worker-3")
    return monkeypatch


def test_static_membership_is_on_by_default_with_ids_from_app_id_and_worker_name(env) -> None:
    s = Settings.from_env()
    assert s.static_membership and s.leave_group_on_stop
    assert s.group_instance_id() == "cdp-prod-worker-3"
    assert s.group_instance_id("ingest") == "cdp-prod-worker-3-ingest"
    # the same worker name restarted gets the same ids; another worker other ones
    assert Settings.from_env().group_instance_id("ingest") == s.group_instance_id("ingest")
    env.setenv("PIPELINE_WORKER_NAME", "worker-4")
    assert Settings.from_env().group_instance_id() == "cdp-prod-worker-4"


@pytest.mark.parametrize("value", ["0", "false", "off", "No"])
def test_static_membership_can_be_switched_off(env, value: str) -> None:
    env.setenv("PIPELINE_STATIC_MEMBERSHIP", value)
    env.setenv("PIPELINE_LEAVE_GROUP_ON_STOP", value)
    s = Settings.from_env()
    assert not s.static_membership and not s.leave_group_on_stop
    assert s.group_instance_id() is None and s.group_instance_id("ingest") is None
    assert static_members(s, s.group_instance_id()) == []


def test_a_misspelt_switch_is_a_config_error(env) -> None:
    env.setenv("PIPELINE_STATIC_MEMBERSHIP", "maybe")
    with pytest.raises(ConfigError, match="PIPELINE_STATIC_MEMBERSHIP"):
        Settings.from_env()


def test_the_ingest_consumer_joins_as_a_static_member_only_with_an_instance_id() -> None:
    static = consumer_config("g", "w-ingest", instance_id="app-w-ingest")
    assert static["group.instance.id"] == "app-w-ingest"
    assert "group.instance.id" not in consumer_config("g", "w-ingest")
    assert {k: v for k, v in static.items() if k != "group.instance.id"} == consumer_config("g", "w-ingest")


def test_the_worker_leaves_both_groups_as_the_static_members_it_joined_as(env) -> None:
    s = Settings.from_env()
    assert static_members(s, s.group_instance_id()) == [
        ("cdp-prod", "cdp-prod-worker-3"), (ingest_group("cdp-prod"), "cdp-prod-worker-3-ingest")]
    # Faust's consumer stays dynamic where faust-streaming/aiokafka cannot join as a static member
    assert static_members(s, None) == [(ingest_group("cdp-prod"), "cdp-prod-worker-3-ingest")]


def test_the_installed_faust_and_aiokafka_support_static_membership() -> None:
    assert static_membership_supported()
