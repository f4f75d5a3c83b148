"""Erasure end to end on the real broker: a worker, an HTTP destination and a file export hold a person; an
erasure through the API leaves no trace of them in the stores, the compacted topics or a new export, and each
destination received an exit marked `erasure`; erasing again changes nothing; a later event starts a new,
empty profile; an identity erased with `suppress` is dropped from later records."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka_helpers import Collector, produce
from rocksdict import AccessType, Rdict

from pipeline.connection import KafkaConnection
from pipeline.destinations.backfill import read_compacted
from pipeline.destinations.cli import make_runner
from pipeline.destinations.config import load_destinations
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
SALT = "erasure-test-salt"
ANN_EMAIL, ANN_PHONE, ANN_CRM, ANN_COOKIE = "Ann.Erased@Example.com", "+44 20 7946 0958", "C-ANN-1", "ck-ann-1"
BOB_EMAIL, BOB_CRM = "bob.suppressed@example.com", "C-BOB-2"
SEGMENTS = """
audiences:
  - id: gold
    name: Gold
    query: loyalty.tier = "gold"
    attributes: [loyalty.tier]
  - id: shoe-viewers
    name: Shoe viewers
    query: event productView where product.category = "shoes" within 1d
"""


def crm(rid: str, ts: int, crm_id: str, email: str, phone: str | None = None) -> dict[str, Any]:
    return {"recordId": rid, "timestamp": ts, "dataset": "crm", "crmId": crm_id, "email": email, "phone": phone,
            "loyalty": {"tier": "gold"}}


def view(eid: str, ts: int, cookie: str, email: str) -> dict[str, Any]:
    return {"eventId": eid, "timestamp": ts, "eventType": "productView", "dataset": "web-events",
            "identityMap": {"ECID": [{"id": cookie, "primary": True}], "Email": [{"id": email}]},
            "product": {"sku": "S1", "name": "runner", "category": "shoes", "price": 99.0}}


async def until(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await asyncio.to_thread(cond)
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.2)


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def status(http: httpx.Client, request: str, verify: bool = False) -> dict[str, Any] | None:
    r = http.get(f"/privacy/erasures/{request}", params={"verify": "true"} if verify else None)
    return r.json() if r.status_code == 200 and r.json().get("status") == "done" else None


def raw_traces(where: str, rows: dict[bytes, bytes | None], needles: list[bytes]) -> list[str]:
    return [where for k, v in rows.items() for n in needles if n in k or (v is not None and n in v)]


def store_rows(data_dir: Path) -> dict[str, dict[bytes, bytes | None]]:
    """Every RocksDB store of the worker, read-only (as the walk processes read them)."""
    out: dict[str, dict[bytes, bytes | None]] = {}
    for path in sorted(p for p in data_dir.rglob("*.db") if p.is_dir()):
        db = Rdict(str(path), access_type=AccessType.read_only())
        try:
            out[path.name] = dict(db.items())
        finally:
            db.close()
    return out


def make_config_dir(tmp_path: Path) -> Path:
    """The example's identity and datasets, and this test's audiences."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name in ("identity.yaml", "datasets.yaml"):
        (config_dir / name).write_text((EXAMPLE_CONFIG_DIR / name).read_text())
    (config_dir / "segments.yaml").write_text(SEGMENTS)
    return config_dir


async def test_an_erased_person_is_found_nowhere(registry, kafka_bootstrap, start_worker, receiver, tmp_path,
                                                 topic_prefix) -> None:
    # Given a worker, an HTTP destination and a full CSV file export of every audience
    config_dir = make_config_dir(tmp_path)
    exports = tmp_path / "exports"
    (config_dir / "destinations.yaml").write_text(
        "destinations:\n"
        "  - name: hook\n    kind: http\n    audiences: \"*\"\n    identities:\n      - {namespace: CRMID}\n"
        "      - {namespace: Email, transform: sha256_lower}\n"
        f"    url: {receiver.base_url}/hook\n    batch: {{max_records: 100, max_age_ms: 20}}\n"
        f"    erasure: {{method: DELETE, url: {receiver.base_url}/hook/erasures}}\n"
        "  - name: files\n    kind: file\n    audiences: \"*\"\n    identities:\n      - {namespace: CRMID}\n"
        "      - {namespace: Email, transform: lower}\n      - {namespace: Phone}\n"
        f"    path: {exports}\n    format: csv\n    mode: full\n")
    env = {"PIPELINE_ERASURE_SALT": SALT}
    worker = start_worker(config_dir=config_dir, extra_env=env)
    http = httpx.Client(base_url=worker.url, timeout=10)
    # and Ann (CRM record with e-mail and phone, then a shoe view by cookie and e-mail) and Bob, both gold
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles",
            [crm("r-ann", now - 5000, ANN_CRM, ANN_EMAIL, ANN_PHONE), crm("r-bob", now - 5000, BOB_CRM, BOB_EMAIL)])
    produce(registry, kafka_bootstrap, "ingest.events", [view("e-ann", now - 4000, ANN_COOKIE, ANN_EMAIL)])
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    memberships.wait_for(lambda ms: {(m["value"]["audience_id"], m["value"]["status"]) for m in ms} >=
                         {("gold", "realized"), ("shoe-viewers", "realized")} and len(ms) >= 3, 60, "memberships")

    def ann() -> dict[str, Any] | None:
        r = http.get("/profiles", params={"namespace": "Email", "id": ANN_EMAIL})
        p = r.json() if r.status_code == 200 else None
        return p if p and "ECID" in p["identities"] and "Phone" in p["identities"] else None

    ann_profile = await until(ann, 60, "Ann's profile with all her identities")
    ann_pid = ann_profile["profile_id"]
    settings = Settings(kafka=KafkaConnection(kafka_bootstrap), app_id="test", config_dir=config_dir,
                        data_dir=tmp_path / "runner", web_port=0, topic_prefix=topic_prefix, worker_name="test")
    runner = make_runner(settings, list(load_destinations(config_dir / "destinations.yaml")))
    await runner.start()
    try:
        await until(lambda: {r["audience_id"] for _, r in receiver.first_stored.values()
                             if r["profile_id"] == ann_pid} == {"gold", "shoe-viewers"}, 60, "Ann at the webhook")
        files = runner.destination("files")
        await until(lambda: runner.local_stats()["files"]["delivered"] >= 3, 30, "the file destination's spool")
        before = await files.export_now()  # type: ignore[attr-defined]
        assert ANN_CRM in _export_text(before)

        # When Ann is erased through the API, by her e-mail as any client would write it
        r = http.delete("/profiles", params={"namespace": "Email", "id": ANN_EMAIL.upper()})
        assert r.status_code == 202, r.text
        request = r.json()["request"]
        assert ANN_EMAIL.lower() not in r.text.lower() and r.json()["status"] == "requested"
        done = await until(lambda: status(http, request), 30, "the erasure to be done")
        # Then it is done: her profile (and the one the event made, if it came first and was merged into hers: its
        # forward), every identity it held and her 2 memberships
        n_ids = sum(len(ids) for ids in ann_profile["identities"].values())
        assert done["found"] and done["erased"]["profiles"] in (1, 2)
        assert done["erased"] == {"profiles": done["erased"]["profiles"], "identities": n_ids, "memberships": 2}
        assert http.get("/profiles", params={"namespace": "CRMID", "id": ANN_CRM}).status_code == 404
        assert http.get(f"/profiles/{ann_pid}").status_code == 404
        # And the webhook received an exit marked erasure for every audience it had her in
        exits = await until(lambda: sorted(r["audience_id"] for _, r in receiver.first_stored.values()
                                           if r["profile_id"] == ann_pid and r.get("reason") == "erasure"
                                           and r["status"] == "exited"), 30, "the erasure exits")
        assert exits == ["gold", "shoe-viewers"]
        # as DELETE requests to the erasure URL of the webhook, with nothing else in them
        erasing = [q for q in receiver.requests if q.method == "DELETE"]
        assert {q.path for q in erasing} == {"/hook/erasures"}
        assert sorted(r["audience_id"] for q in erasing for r in q.body["records"]) == ["gold", "shoe-viewers"]
        assert all(r["reason"] == "erasure" for q in erasing for r in q.body["records"])
        assert not [r for q in receiver.requests if q.method == "POST" for r in q.body["records"]
                    if r.get("reason")]
        # And the next export does not contain her (Bob still is)
        await until(lambda: runner.local_stats()["files"]["delivered"] >= 5, 30, "the exits in the file spool")
        after = await files.export_now()  # type: ignore[attr-defined]
        text = _export_text(after)
        assert BOB_CRM in text and ANN_CRM not in text and ann_pid not in text and "ann.erased" not in text
    finally:
        await runner.stop()
    needles = [ANN_EMAIL.lower().encode(), b"+442079460958", ANN_CRM.encode(), ANN_COOKIE.encode(), ann_pid.encode()]
    # And the worker's stores hold no trace of her: its own verification, and the raw bytes of every store
    verified = status(http, request, verify=True)
    assert verified is not None and verified["verification"]["clean"], verified
    print("\nGET /privacy/erasures/{request}?verify=true ->\n" + json.dumps(verified["verification"], indent=1))
    worker.stop()  # (closes the stores: read them as they are on disk)
    stores = store_rows(tmp_path / "data")
    assert len(stores) >= 2 and not [w for name, rows in stores.items() for w in raw_traces(name, rows, needles)]
    # And no compacted topic holds her (the latest value of every key): `pipeline privacy verify`, and raw bytes
    cli_env = {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": topic_prefix,
               "PIPELINE_CONFIG": str(config_dir), "PIPELINE_ERASURE_SALT": SALT}
    out = subprocess.run([sys.executable, "-m", "pipeline", "privacy", "verify", "--request", request,
                          *[f"--find={n.decode()}" for n in needles]], env=cli_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    print(f"$ pipeline privacy verify --request {request} --find ... (5 values)\n{out.stdout}{out.stderr}")
    assert out.returncode == 0 and out.stdout.strip().endswith("no trace left"), out.stdout + out.stderr
    compacted = [s for s in registry if "compact" in s.cleanup_policy]
    for spec in compacted:
        rows = read_compacted(KafkaConnection(kafka_bootstrap), spec.name)
        assert not raw_traces(spec.logical, {k: v for k, v in rows.items() if v is not None}, needles)
    memberships.close()


def _export_text(manifest: Any) -> str:
    folder = Path(manifest.folder.removeprefix("file://"))
    return "".join((folder / f.name).read_text() for f in manifest.files)


async def test_erasing_again_a_later_event_and_suppression(registry, kafka_bootstrap, start_worker, tmp_path,
                                                           topic_prefix) -> None:
    # Given a worker, and Ann and Bob known by CRM record
    config_dir = make_config_dir(tmp_path)
    worker = start_worker(config_dir=config_dir, extra_env={"PIPELINE_ERASURE_SALT": SALT})
    http = httpx.Client(base_url=worker.url, timeout=10)
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles",
            [crm("r-ann", now - 5000, ANN_CRM, ANN_EMAIL, ANN_PHONE), crm("r-bob", now - 5000, BOB_CRM, BOB_EMAIL)])

    def profile(ns: str, value: str) -> dict[str, Any] | None:
        r = http.get("/profiles", params={"namespace": ns, "id": value})
        return r.json() if r.status_code == 200 else None

    def settled(ns: str, value: str) -> dict[str, Any] | None:
        """The profile once it lists all four of Ann's identities (its claims are answered one by one)."""
        p = profile(ns, value)
        return p if p is not None and sum(len(ids) for ids in p["identities"].values()) == 4 else None

    old = await until(lambda: settled("Email", ANN_EMAIL), 60, "Ann's profile with all her identities")
    await until(lambda: profile("Email", BOB_EMAIL), 60, "Bob's profile")
    # When Ann is erased, then erased again
    first = http.delete("/profiles", params={"namespace": "CRMID", "id": ANN_CRM}).json()["request"]
    done = await until(lambda: status(http, first), 30, "the first erasure")
    second = http.delete("/profiles", params={"namespace": "CRMID", "id": ANN_CRM}).json()["request"]
    again = await until(lambda: status(http, second), 30, "the second erasure")
    # Then the second finds nothing left and erases nothing; the first keeps its outcome
    assert done["found"] and done["erased"]["identities"] == sum(len(ids) for ids in old["identities"].values())
    assert (again["found"], again["erased"], again["traces"]) == (
        False, {"profiles": 0, "identities": 0, "memberships": 0}, [])
    assert again["subject"] == done["subject"] and status(http, first) == done
    # When an event for her e-mail arrives later
    produce(registry, kafka_bootstrap, "ingest.events", [view("e-later", now - 1000, "ck-new", ANN_EMAIL)])
    new = await until(lambda: profile("Email", ANN_EMAIL), 60, "a profile for the later event")
    # Then it starts a new profile holding only that event: none of the erased attributes or identities
    assert new["profile_id"] != old["profile_id"]
    assert new["identities"] == {"ECID": ["ck-new"], "Email": [ANN_EMAIL.lower()],
                                 "EMAIL_LC_SHA256": [hashlib.sha256(ANN_EMAIL.lower().encode()).hexdigest()]}
    assert new["attributes"] == {} and new["event_count"] == 1
    # When Bob is erased with --suppress through the CLI
    cli_env = {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": topic_prefix,
               "PIPELINE_CONFIG": str(config_dir), "PIPELINE_ERASURE_SALT": SALT}
    out = subprocess.run([sys.executable, "-m", "pipeline", "privacy", "erase", "--namespace", "Email", "--id",
                          BOB_EMAIL, "--suppress", "--wait", "60"], env=cli_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=90)
    print(f"\n$ pipeline privacy erase --namespace Email --id <bob> --suppress\n{out.stdout}{out.stderr}")
    assert out.returncode == 0 and BOB_EMAIL not in out.stdout, out.stdout + out.stderr
    bob_done = json.loads(out.stdout.splitlines()[-1])
    assert (bob_done["status"], bob_done["found"], bob_done["suppress"]) == ("done", True, True)
    await until(lambda: metric(http, "cdp_erasure_suppressed_identities") >= 1, 30, "the suppression list")
    # and a record with his e-mail (and no other identity) and one with his e-mail and a new CRM id arrive
    produce(registry, kafka_bootstrap, "ingest.events", [
        {**view("e-bob", now - 500, "x", BOB_EMAIL), "identityMap": {"Email": [{"id": BOB_EMAIL}]}}])
    produce(registry, kafka_bootstrap, "ingest.profiles", [crm("r-bob2", now - 400, "C-BOB-NEW", BOB_EMAIL)])
    # Then his e-mail (and its derived hash) is dropped from both, counted, never stored: the first record is
    # skipped, the second makes a profile without it
    await until(lambda: metric(http, "cdp_identities_dropped_total", namespace="Email", reason="suppressed") >= 2,
                30, "two suppressed identities dropped")
    assert metric(http, "cdp_identities_dropped_total", namespace="EMAIL_LC_SHA256", reason="suppressed") == 2
    assert metric(http, "cdp_records_skipped_total", dataset="web-events", reason="suppressed-identity") == 1
    bob_new = await until(lambda: profile("CRMID", "C-BOB-NEW"), 60, "the new CRM id's profile")
    assert bob_new["identities"] == {"CRMID": ["C-BOB-NEW"]}
    assert profile("Email", BOB_EMAIL) is None
    assert BOB_EMAIL not in worker.log() and ANN_EMAIL.lower() not in worker.log().lower()
