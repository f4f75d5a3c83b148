"""An HTTP destination down for 60 s (503s, then refused connections) while `pipeline destinations run` delivers."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultlib import Webhook
from kafka_helpers import Collector
from procs import PipelineProc

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(900)]

# The example's crm-webhook (config/example/destinations.yaml) as it ships: batches, retries, breaker, rate
# limit; for every audience, with identities every profile has.
DESTINATIONS = """
destinations:
  - name: hook
    kind: http
    audiences: "*"
    identities:
      - {namespace: CRMID}
      - {namespace: ECID}
    attributes: []
    url: URL
    method: POST
    batch: {max_records: 200, max_age_ms: 500}
    timeout_s: 5
    retry: {max_attempts: 6, base_delay_ms: 200, max_delay_ms: 20000}
    rate_limit_per_s: 50
    circuit_breaker: {failure_threshold: 5, reset_timeout_s: 30}
    queue_max_records: 10000
"""


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    w = Webhook()
    yield w
    w.close()


def test_an_http_destination_down_for_60s_gets_every_membership_exactly_once(
        scenario, webhook: Webhook, registry, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    # Given a worker, 400 generated people fed at 40 records/s, and the destination runner delivering every
    # membership change to a webhook
    s = scenario("http-down-60s", people=400, rate=40)
    (s.config_dir / "destinations.yaml").write_text(DESTINATIONS.replace("URL", webhook.url))
    env = {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": topic_prefix,
           "PIPELINE_CONFIG": str(s.config_dir), "PIPELINE_DATA_DIR": str(tmp_path / "dest-data")}
    runner = PipelineProc(["destinations", "run"], env, tmp_path / "destinations.log")
    dlq = Collector(registry, kafka_bootstrap, "activation.dest-dlq")
    try:
        s.begin()
        # When, at 15 % of the feed, the webhook answers 503 for 30 s and then refuses connections for 30 s
        s.feed.wait_sent(0.15)
        s.inject(f"webhook down (503 for 30 s, then connection refused for 30 s) at {s.feed.progress:.0%} of the feed")
        webhook.set("503")
        time.sleep(30)  # holding the outage open
        webhook.set("refuse")
        time.sleep(30)
        webhook.set("ok")
        s.fault_over()
        s.log(f"webhook back; requests so far {dict(webhook.requests)}")
        s.finish(quiesce_s=180, converge_s=60)
        # Then every membership change on the topic reaches the webhook exactly once (by idempotency key)
        assert s.memberships is not None
        keys = {m["value"]["idempotency_key"] for m in s.memberships.messages}
        def dead_lettered() -> set[str]:
            return {m["value"]["idempotency_key"] for m in dlq.messages if isinstance(m.get("value"), dict)}

        deadline = time.monotonic() + 180
        while (not keys <= set(webhook.keys) | dead_lettered() and time.monotonic() < deadline
               and runner.proc.poll() is None):
            dlq.poll(1)
        dlq.poll(2)
        counts = Counter(webhook.keys)
        missing = len(keys - set(counts))
        duplicated = sum(n - 1 for n in counts.values())
        unknown = len(set(counts) - keys)
        reasons = Counter(m.get("headers", {}).get("reason", "?").split(":")[0] for m in dlq.messages)
        line = (f"FAULTS http-down-60s delivery: membership changes {len(keys)}, delivered {len(set(counts))}, "
                f"missing={missing} duplicated={duplicated} unknown={unknown} dead-lettered={len(dlq.messages)} "
                f"{dict(reasons)} runner exit={runner.proc.poll()} requests {dict(webhook.requests)}")
        print(line, flush=True)
        s.check()
        assert runner.proc.poll() is None, runner.log()[-3000:]
        assert (missing, duplicated, unknown) == (0, 0, 0), line
        assert "Traceback" not in runner.log(), runner.log()[-5000:]
    finally:
        runner.stop()
        dlq.close()
