"""The destination runner's GET /healthz, /readyz and /metrics on a real broker (issue 18): not ready while it
starts, ready once its destination's consumer joined its group, and its group's lag on /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.connection import KafkaConnection
from pipeline.destinations.cli import run_until_stopped
from pipeline.destinations.config import load_destinations
from pipeline.local.broker import free_port
from pipeline.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_runner_is_ready_once_its_destinations_consume(registry: Any, kafka_bootstrap: str, topic_prefix: str,
                                                             tmp_path: Path) -> None:
    # Given a runner with one Kafka destination, serving its endpoints on a port, statistics every 0.5 s
    (tmp_path / "destinations.yaml").write_text(
        "destinations:\n  - name: stream\n    kind: kafka\n    audiences: [gold]\n"
        "    identities:\n      - {namespace: CRMID}\n    topic: activation.dest-kafka-example\n")
    port = free_port()
    settings = Settings(kafka=KafkaConnection(kafka_bootstrap), app_id="test", config_dir=tmp_path,
                        data_dir=tmp_path / "data", web_port=0, topic_prefix=topic_prefix, worker_name="test",
                        dest_metrics_port=port, kafka_stats_interval_ms=500)
    configs = list(load_destinations(tmp_path / "destinations.yaml"))
    stop = asyncio.Event()
    runner = asyncio.create_task(run_until_stopped(settings, configs, backfill=False, stop=stop, port=port))
    seen: list[tuple[int, int, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            # When it starts and its consumer joins the group cdp-dest-stream
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (seen and seen[-1][1] == 200):
                with contextlib.suppress(httpx.TransportError):
                    ready = await http.get("/readyz")
                    seen.append(((await http.get("/healthz")).status_code, ready.status_code, ready.json()))
                await asyncio.sleep(0.05)
            # Then /readyz said 503 with the reason until then (/healthz 200 throughout), and 200 after
            assert seen[0][:2] == (200, 503) and seen[-1] == (200, 200, {"ready": True}), seen[-3:]
            assert {tuple(body["reasons"]) for _, status, body in seen if status == 503} <= {
                ("starting: destinations starting (backfill, consumers joining their groups)",),
                ("destination stream: joining consumer group cdp-dest-stream",)}
            # and /metrics shows the group's partitions (each source topic's) once statistics came
            expected = registry["activation.memberships"].partitions + registry["activation.profile-changes"].partitions
            line = f'cdp_partitions_assigned{{group="cdp-dest-stream"}} {float(expected)}'
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and line not in (text := (await http.get("/metrics")).text):
                await asyncio.sleep(0.2)
            assert line in text
            assert 'cdp_consumer_lag{group="cdp-dest-stream"' in text and "cdp_ready 1.0" in text
    finally:
        stop.set()
        assert await asyncio.wait_for(runner, 60) == 0
