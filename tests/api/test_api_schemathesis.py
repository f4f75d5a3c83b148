"""Schemathesis over pipeline/api/openapi.yaml against a running worker: generated requests (valid and
invalid) to every operation get no 5xx, and every response matches the description (status, content type,
headers, schema). Bounded: a few examples per operation (SCHEMATHESIS_EXAMPLES, default 50)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key
from pipeline.api.server import openapi

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "50"))


def test_generated_requests_get_no_server_error_and_match_the_description(start_worker: Any, tmp_path: Path) -> None:
    # Given a worker with an admin key (and a failed-authentication limit the generated 401s stay under)
    key = new_key()
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + entry_yaml(ApiKey("schemathesis", hash_key(key), frozenset({"admin"}))))
    worker = start_worker(extra_env={"PIPELINE_API_KEYS_FILE": str(path), "PIPELINE_API_FAILED_AUTH_BURST": "100000"})
    schema = schemathesis.openapi.from_dict(openapi())
    headers = {"Authorization": f"Bearer {key}"}
    started, cases = time.monotonic(), 0
    for result in schema.get_all_operations():
        operation = result.ok()

        # When schemathesis sends generated requests to each operation
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            nonlocal cases
            cases += 1
            # Then none is a 5xx and every response conforms to the description (status, content type, headers,
            # schema). Not checked: that every schema-valid request is accepted: a namespace must be one of the
            # worker's identity.yaml and an identity value must normalise (an e-mail must look like one), which
            # the description says in words, not in the schema (400 with the reason)
            case.call_and_validate(base_url=worker.url, headers=headers, timeout=10,
                                   excluded_checks=[positive_data_acceptance])

        check()
    print(f"schemathesis: {cases} requests in {time.monotonic() - started:.1f} s")
    assert cases >= len(openapi()["paths"])
