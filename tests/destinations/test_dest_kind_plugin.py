"""A destination kind defined entirely here ("memory"): one register_kind call with its own settings parser is
all it takes for destinations.yaml to configure it and for the runner to deliver to it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest
from dest_helpers import membership
from kafka_helpers import produce

from pipeline.destinations.base import Destination, DestinationContext, Payload, register_kind
from pipeline.destinations.cli import registry_decoder
from pipeline.destinations.config import Env, Fields, KindSettings, parse_destinations
from pipeline.destinations.lane import RunnerSettings
from pipeline.destinations.runner import DestinationRunner
from pipeline.errors import ConfigError
from pipeline.topics import TopicRegistry
from pipeline.yamlconf import Doc


@dataclass(frozen=True)
class MemorySettings:
    """A `memory` destination's own keys: the shelf its payloads go to, and how many it holds at most."""

    shelf: str
    capacity: int = 1000


def parse_memory_settings(doc: Doc, f: Fields, env: Env) -> MemorySettings:
    return MemorySettings(doc.string(f["shelf"][1], "shelf"),
                          doc.integer(f["capacity"][1], "capacity", minimum=1) if "capacity" in f else 1000)


SHELVES: dict[str, list[Payload]] = {}


class MemoryDestination(Destination):
    """Keeps what it is given on its shelf (SHELVES), at once: flush has nothing left to do."""

    def __init__(self, config: Any, context: DestinationContext) -> None:
        super().__init__(config, context)
        self.settings = config.settings_as(MemorySettings)

    async def start(self) -> None:
        SHELVES.setdefault(self.settings.shelf, [])

    async def deliver(self, batch: list[Payload]) -> None:
        shelf = SHELVES[self.settings.shelf]
        shelf.extend(batch[:max(0, self.settings.capacity - len(shelf))])

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


register_kind("memory", MemoryDestination, KindSettings(required=frozenset({"shelf"}),
                                                         optional=frozenset({"capacity"}),
                                                         parse=parse_memory_settings))


def memory_yaml(shelf: str, extra: str = "") -> str:
    return ("destinations:\n"
            "  - name: mem\n"
            "    kind: memory\n"
            "    audiences: [vip]\n"
            "    identities:\n"
            "      - {namespace: CRMID}\n"
            "    attributes: [loyalty.tier]\n"
            f"    shelf: {shelf}\n" + extra)


def test_a_kind_registered_in_a_test_module_reads_its_own_settings_from_destinations_yaml() -> None:
    # Given destinations.yaml text naming the memory kind with its own keys
    # When it is parsed
    cfg = parse_destinations(memory_yaml("s1", "    capacity: 5\n"), file="d.yaml").get("mem")
    # Then the kind's parser made its settings; the common keys are read as for every kind
    assert (cfg.kind, cfg.settings, cfg.audiences) == ("memory", MemorySettings("s1", 5), frozenset({"vip"}))
    # And its keys are checked like a built-in kind's: a missing required key, an unknown one, a bad value
    for text, message in [
        (memory_yaml("s1").replace("    shelf: s1\n", ""), "d.yaml:2:5: memory destination: missing key(s) shelf"),
        (memory_yaml("s1", "    url: http://x\n"), "d.yaml:9:5: memory destination: unknown key 'url'; valid: "
         "attributes, audiences, capacity, consent, identities, kind, name, shelf"),
        (memory_yaml("s1", "    capacity: 0\n"), "d.yaml:9:15: capacity must be >= 1"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_destinations(text, file="d.yaml")
        assert str(info.value) == message


@pytest.mark.integration
async def test_the_runner_delivers_to_a_kind_defined_in_a_test_module(registry: TopicRegistry,
                                                                      kafka_bootstrap: str) -> None:
    # Given a memory destination of audience vip, and three membership changes on activation.memberships
    shelf = registry.name("activation.memberships")  # unique per test
    cfg = parse_destinations(memory_yaml(shelf)).get("mem")
    produce(registry, kafka_bootstrap, "activation.memberships",
            [membership("p1", "vip", t=1_000, key="k1"), membership("p2", "churn", t=2_000, key="k2"),
             membership("p3", "vip", "exited", t=3_000, key="k3")], key=lambda v: v["profile_id"])
    runner = DestinationRunner([cfg], kafka=kafka_bootstrap, topics=registry, decode=registry_decoder(registry),
                               settings=RunnerSettings(commit_interval_ms=200))
    # When the runner consumes them (decode, map, deliver, commit)
    await runner.start()
    try:
        deadline = time.monotonic() + 60
        while runner.local_stats()["mem"]["delivered"] < 2 or (await runner.status())["mem"].lag != 0:
            assert time.monotonic() < deadline, runner.local_stats()
            await asyncio.sleep(0.1)
    finally:
        await runner.stop()
    # Then the memory destination holds the two vip changes, mapped, and the churn one was skipped
    assert sorted((p.to_dict() for p in SHELVES[shelf]), key=lambda d: d["idempotency_key"]) == [
        {"destination": "mem", "profile_id": "p1", "audience_id": "vip", "kind": "membership", "status": "realized",
         "identities": {"CRMID": ["C-1"]}, "attributes": {"loyalty.tier": "gold"}, "idempotency_key": "k1",
         "event_time_ms": 1_000, "source_emit_ms": 1_005},
        {"destination": "mem", "profile_id": "p3", "audience_id": "vip", "kind": "membership", "status": "exited",
         "identities": {"CRMID": ["C-1"]}, "attributes": {"loyalty.tier": "gold"}, "idempotency_key": "k3",
         "event_time_ms": 3_000, "source_emit_ms": 3_005}]
    assert runner.local_stats()["mem"]["skipped"] == {"audience_not_activated": 1}
