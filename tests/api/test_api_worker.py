"""The API of a running `pipeline worker` with a keys file: keys and scopes on every endpoint, Faust's pages
gone, the former 500s, a slow client cut off, the failed-authentication limit, key rotation, the access log."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from kafka_helpers import produce

from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key
from pipeline.api.server import openapi, operations
from pipeline.segments.explain import time_text

pytestmark = pytest.mark.integration

EMAIL = "Hidden.Person@Example.com"
CRM = "CRM-SECRET-77"
READ_TIMEOUT_S = 2


def write_keys(path: Path, keys: dict[str, tuple[str, list[str]]]) -> None:
    path.write_text("keys:\n" + "".join(entry_yaml(ApiKey(i, hash_key(k), frozenset(s))) for i, (k, s) in keys.items()))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_worker_api_with_keys(registry: Any, kafka_bootstrap: str, start_worker: Any, tmp_path: Path) -> None:
    # Given a worker with a keys file: an admin key, a profile reader, a metrics scraper
    keys = {"ops": (new_key(), ["admin"]), "reader": (new_key(), ["profiles:read"]),
            "scraper": (new_key(), ["metrics:read"])}
    path = tmp_path / "api-keys.yaml"
    write_keys(path, keys)
    # (room for the failed authentications the test makes on purpose: two per secured endpoint, and a few more)
    burst = 2 * sum(op.scope is not None for ops_ in operations().values() for op in ops_.values()) + 20
    worker = start_worker(extra_env={"PIPELINE_API_KEYS_FILE": str(path), "PIPELINE_API_FAILED_AUTH_BURST": str(burst),
                                     "PIPELINE_WEB_READ_TIMEOUT_S": str(READ_TIMEOUT_S)})
    reader, ops = bearer(keys["reader"][0]), bearer(keys["ops"][0])
    # and a person known by e-mail and CRM id
    ts = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles", [{
        "recordId": "r1", "timestamp": ts, "dataset": "crm", "crmId": CRM, "email": EMAIL,
        "loyalty": {"tier": "gold", "points": 1}}])
    http = httpx.Client(base_url=worker.url, timeout=10)
    # (both identities: the e-mail is claimed through the identity topic after the CRM id made the profile)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = http.get("/profiles", params={"namespace": "CRMID", "id": CRM}, headers=reader)
        by_email = http.get("/profiles", params={"namespace": "Email", "id": EMAIL}, headers=reader)
        if r.status_code == by_email.status_code == 200:
            break
        time.sleep(0.5)
    # When the reader asks for the profile, Then it is served
    assert r.status_code == 200, r.text
    pid = r.json()["profile_id"]
    # with the evidence of its gold-loyalty membership (`loyalty.tier = "gold"`), no identity value in it, and the
    # answer as pipeline/api/openapi.yaml describes a profile
    gold = r.json()["memberships"]["gold-loyalty"]
    assert gold["evidence"] == [f'loyalty.tier is "gold" (dataset crm, {time_text(ts)})'], gold
    shown = json.dumps(r.json()["memberships"]).lower()
    assert CRM.lower() not in shown and EMAIL.lower() not in shown
    spec = openapi()
    jsonschema.Draft202012Validator({**spec, "$ref": "#/components/schemas/Profile"}).validate(r.json())
    assert http.get(f"/profiles/{pid}", headers=reader).json()["profile_id"] == pid
    assert http.post("/edge/evaluate", json={"namespace": "Email", "id": EMAIL}, headers=reader).status_code == 200

    # When each secured endpoint is called without a key, with a wrong one, and with an under-scoped one
    for path_, ops_ in operations().items():
        for method, op in ops_.items():
            url = (path_.replace("{profile_id}", pid).replace("{audience_id}", "x").replace("{request_id}", "er-0")
                   .replace("{file}", "index.html").replace("{name}", "x"))
            if op.scope is None:
                assert http.request(method, url).status_code in (200, 503)  # healthz, readyz, openapi.json, console
                continue
            # Then 401 (with WWW-Authenticate), 401, 403: problem bodies
            for headers, status in (({}, 401), (bearer(new_key()), 401),
                                    (bearer(keys["scraper"][0] if op.scope != "metrics:read" else keys["reader"][0]), 403)):
                r = http.request(method, url, headers=headers)
                assert r.status_code == status and r.headers["content-type"] == "application/problem+json", (method, url)
                assert r.json()["status"] == status
            assert "WWW-Authenticate" in http.request(method, url).headers
    assert http.get("/metrics", headers={"X-API-Key": keys["scraper"][0]}).status_code == 200

    # Faust's own pages are gone, even for an admin key
    for url in ("/", "/router/", f"/table/identity/CRMID:{CRM}/", f"/table/profiles/{pid}/", "/stats/", "/graph/"):
        r = http.get(url, headers=ops)
        assert r.status_code == 404 and r.json()["type"].endswith(":not-found"), url

    # The requests that were 500s are 4xx problems
    assert http.get("/profiles/__cdp_acked__:0", headers=ops).status_code == 404
    assert http.get("/profiles/__cdp_defs__:0", headers=ops).status_code == 404
    for body in ({"namespace": {"x": 1}, "id": "a"}, {"namespace": "Email", "id": [EMAIL]}, {"namespace": ["a"]}):
        assert http.post("/edge/evaluate", json=body, headers=ops).status_code == 400, body
    deep = "[" * 50_000 + "]" * 50_000
    assert http.post("/edge/evaluate", content=deep, headers=ops).status_code == 413  # over 64 KiB
    deep = "[" * 20_000 + "]" * 20_000
    assert http.post("/edge/evaluate", content=deep, headers=ops).json()["type"].endswith(":too-deep")

    # A slow client that never finishes its request head is cut off after the read timeout
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", worker.web_port), timeout=READ_TIMEOUT_S + 20) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        assert s.recv(1024) == b""  # closed by the server
    cut_after = time.monotonic() - started
    assert cut_after < READ_TIMEOUT_S + 15, cut_after  # (generous: the machine is shared)
    # ... and so is one that sends its head but not the body it announced (408 after the read timeout)
    with socket.create_connection(("127.0.0.1", worker.web_port), timeout=READ_TIMEOUT_S + 20) as s:
        s.sendall(b"POST /edge/evaluate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                  b"Authorization: Bearer " + keys["reader"][0].encode() + b"\r\n\r\n{")
        assert b" 408 " in s.recv(4096).split(b"\r\n")[0]

    # Keys rotate without a restart: a new key works within seconds, the removed one stops working
    fresh = new_key()
    write_keys(path, {"ops": keys["ops"], "fresh": (fresh, ["profiles:read"])})
    deadline = time.monotonic() + 10
    while http.get(f"/profiles/{pid}", headers=bearer(fresh)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert http.get(f"/profiles/{pid}", headers=bearer(fresh)).status_code == 200
    assert http.get(f"/profiles/{pid}", headers=reader).status_code == 401
    # and a broken file keeps the last good keys
    path.write_text("keys:\n  - id: x\n    hash: nope\n")
    time.sleep(1.5)
    assert http.get(f"/profiles/{pid}", headers=bearer(fresh)).status_code == 200

    # Failed authentications from one address are limited: 429 with Retry-After
    # (the Retry-After of the first 429 itself: a later request may find a token refilled on a slow machine)
    answers = [http.get("/audiences", headers=bearer("wrong")) for _ in range(burst + 10)]
    statuses = [r.status_code for r in answers]
    assert statuses.count(429) > 0 and set(statuses) <= {401, 429}
    limited = next(r for r in answers if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1 and limited.json()["status"] == 429

    # The access log has a line per profile read, with key id and profile id, and no identity value
    log = worker.log()
    assert f"key=reader endpoint=GET /profiles status=200 profile={pid}" in log
    assert f"key=reader endpoint=GET /profiles/{{profile_id}} status=200 profile={pid}" in log
    assert "key=reader endpoint=POST /edge/evaluate status=200" in log
    for secret in (EMAIL, EMAIL.lower(), CRM, "hidden.person"):
        assert secret not in log, secret
    assert "API keys file not reloaded" in log and "api-keys.yaml:2:5: a key entry: missing key(s) scopes" in log
    http.close()


def test_a_worker_without_keys_or_with_a_bad_keys_file_does_not_start(start_worker: Any, tmp_path: Path) -> None:
    # When a worker starts with neither a keys file nor PIPELINE_API_AUTH=off, Then it stops with the reason
    w = start_worker(name="nokeys", wait=False, extra_env={"PIPELINE_API_AUTH": ""})
    assert w.proc.wait(60) == 2 and "PIPELINE_API_KEYS_FILE" in w.log()
    # When its keys file is bad, Then it stops naming file, line and problem
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: [profile:read]\n")
    w = start_worker(name="badkeys", wait=False, extra_env={"PIPELINE_API_KEYS_FILE": str(bad)})
    assert w.proc.wait(60) == 2 and f"{bad}:4:14: unknown scope 'profile:read'" in w.log()
