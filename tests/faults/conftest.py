"""Fixtures of the fault suite: a scenario factory on the session broker, and a broker of a test's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultlib import Scenario

from pipeline.local.broker import LocalBroker, free_port
from pipeline.topics import TopicRegistry


@pytest.fixture
def scenario(registry: TopicRegistry, kafka_bootstrap: str, start_worker: Callable[..., Any],
             make_config: Callable[..., Path], tmp_path: Path) -> Iterator[Callable[..., Scenario]]:
    """Factory: `scenario(name, people=.., rate=..)` on this test's topics; closed afterwards."""
    made: list[Scenario] = []

    def make(name: str, *, people: int, rate: float, **kw: Any) -> Scenario:
        s = Scenario(name, registry=registry, bootstrap=kafka_bootstrap, start_worker=start_worker,
                     make_config=make_config, tmp_path=tmp_path, people=people, rate=rate, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A broker of this test's own on free ports, so stopping or killing it disturbs no other test. A module
    uses it by overriding `kafka_bootstrap` with `own_broker.bootstrap`."""
    broker = LocalBroker(tmp_path_factory.mktemp("own-kafka"), free_port(), free_port())
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()
