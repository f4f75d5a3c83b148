"""An audience saved through one worker's console reaches every worker (control.audiences): two real workers,
each with its own configuration folder."""

from __future__ import annotations

import time
from typing import Any

import pytest
from http_client import HTTP

from pipeline.segments import load_segments_text

pytestmark = pytest.mark.integration

SEGMENTS = """audiences:
  - id: gold
    query: loyalty.tier = "gold"
"""


def test_an_audience_saved_on_one_worker_reaches_the_other(start_worker: Any, make_config: Any) -> None:
    # Given two workers, each with its own segments.yaml, whose definitions the console may write
    env = {"PIPELINE_AUDIENCES_WRITABLE": "on"}
    config1, config2 = make_config(SEGMENTS, "config1"), make_config(SEGMENTS, "config2")
    w1 = start_worker("w1", config_dir=config1, wait=False, extra_env=env)
    w2 = start_worker("w2", config_dir=config2, wait=False, extra_env=env)
    w1.wait_ready()
    w2.wait_ready()
    # When an audience is saved through worker 1
    r = HTTP.put(f"{w1.url}/audiences/vip", json={"query": "loyalty.points > 10000", "name": "VIP"}, timeout=20)
    assert r.status_code == 201, r.text
    # Then worker 2's file holds worker 1's whole file, and worker 2 lists the new audience once it reloaded it
    deadline, listed = time.monotonic() + 30, list[str]()
    while time.monotonic() < deadline:
        listed = [a["id"] for a in HTTP.get(f"{w2.url}/audiences", timeout=5).json()]
        if (config2 / "segments.yaml").read_text() == (config1 / "segments.yaml").read_text() and "vip" in listed:
            break
        time.sleep(0.2)
    assert (config2 / "segments.yaml").read_text() == (config1 / "segments.yaml").read_text()
    assert [(a.id, a.name, a.query) for a in load_segments_text((config2 / "segments.yaml").read_text())] == [
        ("gold", "gold", 'loyalty.tier = "gold"'), ("vip", "VIP", "loyalty.points > 10000")]
    assert sorted(listed) == ["gold", "vip"]
