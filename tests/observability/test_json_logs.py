"""PIPELINE_LOG_FORMAT=json (issue 18 item 4): a real worker's output is one JSON object a line, with its name and
the ids of the message a line is about, and none of the personal values of the records it handled."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from http_client import HTTP
from kafka_helpers import produce

pytestmark = pytest.mark.integration


def crm_record(tag: str, n: int, now: int) -> dict[str, Any]:
    return {"recordId": f"{tag}-r{n}", "timestamp": now, "dataset": "crm", "crmId": f"CRM-{tag}-{n}",
            "email": f"Json.Person{n}.{tag}@Example.com",
            # a blocked cookie value: the worker logs (rate-limited, without the value) that it left one out
            "identityMap": {"Phone": [{"id": f"+44 20 7946 {n:04d}"}], "ECID": [{"id": "n/a"}]},
            "attributes": {"loyalty.tier": "gold"}}


def profile_of(url: str, crm_id: str) -> dict[str, Any] | None:
    r = HTTP.get(f"{url}/profiles", params={"namespace": "CRMID", "id": crm_id}, timeout=10)
    return r.json() if r.status_code == 200 else None


def test_a_worker_with_json_logs_writes_only_json_lines_with_ids_and_no_personal_data(
        registry, kafka_bootstrap, start_worker):
    # Given a worker started with JSON logs
    worker = start_worker("json-w", extra_env={"PIPELINE_LOG_FORMAT": "json"})
    tag = uuid.uuid4().hex[:6]
    now = int(time.time() * 1000)
    records = [crm_record(tag, n, now) for n in range(5)]
    # When it handles CRM records carrying a CRM id, an e-mail address, a phone number and a blocked cookie
    produce(registry, kafka_bootstrap, "ingest.profiles", records)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(profile_of(worker.url, f"CRM-{tag}-{n}") is None for n in range(5)):
        time.sleep(0.3)
    assert all(profile_of(worker.url, f"CRM-{tag}-{n}") is not None for n in range(5))
    # ... and stops (its shutdown logged too)
    worker.stop()
    text = worker.log()
    # Then every line is a JSON object with time, level, logger, message and the worker's name
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    parsed = []
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        assert {"time", "level", "logger", "message"} <= obj.keys(), line
        assert obj["worker"] == "json-w", line
        parsed.append(obj)
    assert any(o["logger"].startswith("faust.") for o in parsed)  # Faust's own lines are JSON too
    # And the line about the left-out cookie names the record's topic, partition and offset
    drops = [o for o in parsed if o["logger"] == "pipeline.ingest.drops"]
    assert drops, "no line about the blocked cookie"
    assert drops[0]["topic"] == "ingest.profiles"
    assert isinstance(drops[0]["partition"], int) and isinstance(drops[0]["offset"], int)
    # And no CRM id, e-mail address or phone number of those records appears anywhere, in any notation
    for n, r in enumerate(records):
        for value in (r["crmId"], r["email"], r["email"].lower(), r["identityMap"]["Phone"][0]["id"],
                      f"+44207946{n:04d}", f"207946{n:04d}"):
            assert value.lower() not in text.lower(), f"{value!r} logged"
