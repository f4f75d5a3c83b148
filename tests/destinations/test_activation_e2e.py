"""Activation end to end on the real broker: worker -> memberships -> DestinationRunner -> HTTP receiver,
Kafka topic and file export; backfills, consent withdrawal, the `pipeline destinations` / `export` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from http_client import HTTP
from kafka_helpers import Collector, produce
from procs import PipelineProc, stop_all

from pipeline.connection import KafkaConnection
from pipeline.destinations.backfill import Backfill, read_compacted
from pipeline.destinations.cli import make_runner
from pipeline.destinations.config import load_destinations
from pipeline.destinations.runner import DestinationRunner
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]

SEGMENTS = """
audiences:
  - id: shoe-viewers
    name: Shoe viewers
    query: event productView where product.category = "shoes" within 1d
    attributes: [loyalty.tier, consents.email]
  - id: gold
    name: Gold
    query: loyalty.tier = "gold"
    attributes: [loyalty.tier, consents.email]
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    for name in ("identity.yaml", "datasets.yaml"):
        (d / name).write_text((EXAMPLE_CONFIG_DIR / name).read_text())
    (d / "segments.yaml").write_text(SEGMENTS)
    return d


def settings_for(kafka_bootstrap: str, topic_prefix: str, config_dir: Path, tmp_path: Path) -> Settings:
    return Settings(kafka=KafkaConnection(kafka_bootstrap), app_id="test", config_dir=config_dir, data_dir=tmp_path / "data",
                    web_port=0, topic_prefix=topic_prefix, worker_name="test")


def http_dest(name: str, url: str, audiences: str, *, extra: str = "",
              consent: str | None = "{attribute: consents.email, deny_values: [\"no\"]}") -> str:
    return (f"  - name: {name}\n    kind: http\n    audiences: {audiences}\n"
            "    identities:\n      - {namespace: CRMID}\n      - {namespace: ECID}\n"
            "      - {namespace: Email, transform: sha256_lower}\n"
            "    attributes: [loyalty.tier, consents.email]\n"
            + (f"    consent: {consent}\n" if consent else "") +
            f"    url: {url}\n    batch: {{max_records: 100, max_age_ms: 20}}\n    timeout_s: 5\n"
            "    retry: {max_attempts: 12, base_delay_ms: 20, max_delay_ms: 300}\n"
            "    circuit_breaker: {failure_threshold: 3, reset_timeout_s: 0.3}\n" + extra)


def write_destinations(config_dir: Path, *entries: str) -> None:
    (config_dir / "destinations.yaml").write_text("destinations:\n" + "".join(entries))


def event(eid: str, ts: int, ecid: str) -> dict[str, Any]:
    return {"eventId": eid, "timestamp": ts, "eventType": "productView", "dataset": "web-events",
            "identityMap": {"ECID": [{"id": ecid, "primary": True}]},
            "product": {"sku": "S1", "name": "runner", "category": "shoes", "price": 99.0}}


def crm(rid: str, ts: int, crm_id: str, *, tier: str = "gold", consent: str = "yes") -> dict[str, Any]:
    return {"recordId": rid, "timestamp": ts, "dataset": "crm", "crmId": crm_id,
            "email": f"{crm_id.lower()}@example.com", "loyalty": {"tier": tier}, "consents": {"email": consent}}


async def until(cond: Callable[[], bool], timeout_s: float, what: str, poll: Callable[[], None] | None = None
                ) -> None:
    """Wait (without blocking the event loop the receiver runs on) until cond() holds, or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        if poll is not None:
            await asyncio.to_thread(poll)
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def quiet(count: Callable[[], int], quiet_s: float = 1.5, timeout_s: float = 20) -> None:
    """Wait until count() did not change for quiet_s (nothing more is coming)."""
    deadline = time.monotonic() + timeout_s
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if count() != last:
            last, since = count(), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def membership_values(c: Collector) -> list[dict[str, Any]]:
    return [m["value"] for m in c.messages]


def current_members(values: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for v in values:
        last[(v["profile_id"], v["audience_id"])] = v
    return {k: v for k, v in last.items() if v["status"] != "exited"}


@pytest.fixture
def cli_env(kafka_bootstrap: str, topic_prefix: str, config_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "PIPELINE_TOPIC_PREFIX": topic_prefix,
            "PIPELINE_CONFIG": str(config_dir), "PIPELINE_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def start_cli(cli_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
              ) -> Iterator[Callable[..., PipelineProc]]:
    procs: list[PipelineProc] = []

    def start(*args: str) -> PipelineProc:
        p = PipelineProc(list(args), cli_env, tmp_path / f"cli-{len(procs)}.log")
        procs.append(p)
        return p

    yield start
    stop_all(procs, request, tail=6000)


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 60) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout_s)
    assert out.returncode == 0, f"{args}: rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


async def test_memberships_reach_the_webhook_and_topic_through_failures(
        registry, kafka_bootstrap, start_worker, config_dir, receiver, start_cli, cli_env) -> None:
    # Given a worker, and `pipeline destinations run` with a webhook (failing in every retryable way at
    # first: 500s, a 429 with Retry-After, a slow answer; anonymous shoppers have no consent value, which its
    # rule allows) and a Kafka destination for every audience
    start_worker(config_dir=config_dir)
    write_destinations(
        config_dir, http_dest("hook", receiver.base_url + "/hooks", "[shoe-viewers, gold]", consent=(
            "{attribute: consents.email, deny_values: [\"no\"], on_missing: allow}")),
        "  - name: stream\n    kind: kafka\n    audiences: \"*\"\n    identities:\n      - {namespace: ECID}\n"
        "      - {namespace: CRMID}\n    topic: activation.dest-kafka-example\n")
    receiver.plan("/hooks", "500", "503", "500", "429:1", "ok", "slow:1.5", "500")
    runner = start_cli("destinations", "run")
    await until(lambda: "destinations runner: running" in runner.log() or runner.proc.poll() is not None,
                60, "the runner to start")
    assert runner.proc.poll() is None, runner.log()
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    stream = Collector(registry, kafka_bootstrap, "activation.dest-kafka-example")
    try:
        # When 300 shoppers view shoes and 30 CRM records make people gold
        now = int(time.time() * 1000)
        n_events, n_gold = 300, 30
        t0 = time.time()
        produce(registry, kafka_bootstrap, "ingest.events",
                [event(f"e{i}", now - 1000 + i, f"cookie-{i}") for i in range(n_events)])
        produce(registry, kafka_bootstrap, "ingest.profiles",
                [crm(f"r{i}", now - 1000 + i, f"C-{i}") for i in range(n_gold)])
        expected_n = n_events + n_gold
        await until(lambda: len(memberships.messages) >= expected_n, 60, f"{expected_n} membership changes",
                    poll=lambda: memberships.poll(0.3))
        await asyncio.to_thread(memberships.settle, 1.0, 20)
        values = membership_values(memberships)
        keys = {v["idempotency_key"] for v in values}
        # Then every membership change reaches the receiver (idempotency keys), despite the failures
        await until(lambda: keys <= set(receiver.first_stored), 60, "every membership change at the receiver")
        got = receiver.first_stored
        assert {o.outcome for o in receiver.requests} >= {"500", "429:1", "slow:1.5", "503"}
        # And every change reaches the Kafka destination, keyed by profile id
        await until(lambda: keys <= {m["value"]["idempotency_key"] for m in stream.messages}, 60,
                    "every change on the kafka destination topic", poll=lambda: stream.poll(0.3))
        assert all(m["key"] == m["value"]["profile_id"] for m in stream.messages)
        # Latency: membership emit_time_ms -> wall clock at the receiver; deliveries per second
        emit = {v["idempotency_key"]: v["emit_time_ms"] for v in values}
        lat = [got[k][0] * 1000 - emit[k] for k in keys]
        http_span = max(got[k][0] for k in keys) - t0
        stream_ts = [m for m in stream.messages if m["value"]["idempotency_key"] in keys]
        print(f"\nmembership -> HTTP delivery: n={len(lat)} p50={sorted(lat)[len(lat) // 2]:.0f} ms "
              f"p99={p99(lat):.0f} ms max={max(lat):.0f} ms (incl. injected 500/429:1s/slow:1.5s)")
        print(f"http: {len(keys)} deliveries in {http_span:.2f}s from first produce = "
              f"{len(keys) / http_span:,.0f}/s; kafka: {len(stream_ts)} payloads")
        # And `destinations status` shows the destination caught up, nothing dead-lettered
        deadline = time.monotonic() + 30
        while True:
            st = json.loads(await asyncio.to_thread(run_cli, cli_env, "destinations", "status", "--json"))
            # `delivered` comes from the runner's status file, rewritten every 2 s: poll until it has caught up
            if st["hook"]["lag"] == 0 and st["stream"]["lag"] == 0 and st["hook"]["delivered"] >= len(keys):
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.5)
        assert st["hook"]["dead_letter_depth"] == 0 and st["hook"]["runner"] == "running"
        assert st["hook"]["breaker"] in {"closed", "half_open", "open"}
        assert st["hook"]["delivered"] >= len(keys)
        table = await asyncio.to_thread(run_cli, cli_env, "destinations", "status")
        assert "hook" in table and "BREAKER" in table
        # And SIGTERM stops it cleanly (final flush and commit), breaker transitions were logged
        assert runner.stop() == 0, runner.log()
        log = runner.log()
        assert "destinations runner: stopped" in log and "circuit breaker -> open" in log
        assert "cookie-" not in log and "@example.com" not in log  # no personal data in logs
    finally:
        memberships.close()
        stream.close()


async def test_a_newly_mapped_audience_backfills_current_members_once(
        registry, kafka_bootstrap, start_worker, config_dir, receiver, tmp_path, topic_prefix) -> None:
    # Given memberships emitted before any destination maps `gold`: 6 gold, 2 of them since downgraded
    start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles", [crm(f"r{i}", now - 5000 + i, f"C-{i}") for i in range(6)])
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    await until(lambda: len(memberships.messages) >= 6, 60, "6 gold memberships", poll=lambda: memberships.poll(0.3))
    produce(registry, kafka_bootstrap, "ingest.profiles",
            [crm(f"d{i}", now - 1000 + i, f"C-{i}", tier="silver") for i in range(2)])
    await until(lambda: sum(v["status"] == "exited" for v in membership_values(memberships)) >= 2, 60,
                "2 exits", poll=lambda: memberships.poll(0.3))
    members = current_members(membership_values(memberships))
    assert len(members) == 4
    exited = {v["profile_id"] for v in membership_values(memberships) if v["status"] == "exited"}
    state = Collector(registry, kafka_bootstrap, "activation.membership-state")
    await until(lambda: len(state.messages) >= 8, 30, "the membership state", poll=lambda: state.poll(0.3))
    state.close()
    memberships.close()
    # When a runner starts with a destination that maps `gold` for the first time
    write_destinations(config_dir, http_dest("late", receiver.base_url + "/late", "[gold]"))
    settings = settings_for(kafka_bootstrap, topic_prefix, config_dir, tmp_path)
    configs = list(load_destinations(config_dir / "destinations.yaml"))
    runner = make_runner(settings, configs)
    await runner.start()
    try:
        # Then the receiver gets exactly the current members, as realized backfill records, no exits
        await until(lambda: len(receiver.keys("/late")) >= 4, 30, "4 backfilled members")
        await quiet(lambda: len(receiver.keys("/late")))
        records = [rec for _, rec in receiver.first_stored.values()]
        assert {r["profile_id"] for r in records} == {pid for pid, _ in members}
        assert len(receiver.keys("/late")) == 4 and not exited & {r["profile_id"] for r in records}
        assert all(r["status"] == "realized" and r["audience_id"] == "gold" and
                   r["idempotency_key"].endswith(":backfill") for r in records)
        assert all(r["identities"]["CRMID"] for r in records)
        deadline = time.monotonic() + 20
        while (st := (await runner.status())["late"]).lag != 0:
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.2)
        assert st.delivered == 4  # the new group started at the end: no replay of history
    finally:
        await runner.stop()
    # And activation.dest-state records the backfilled audience
    raw = read_compacted(kafka_bootstrap, registry.name("activation.dest-state"))
    assert json.loads(raw[b"late"] or b"{}")["backfilled"] == ["gold"]
    # When the runner restarts, it does not backfill again
    again = DestinationRunner(configs, kafka=kafka_bootstrap, topics=registry, decode=runner.decode,
                              backfill=Backfill())
    await again.start()
    try:
        assert again.backfill is not None and again.backfill.last_run == {}
        await quiet(lambda: len(receiver.keys("/late")), quiet_s=1.5)
        assert len(receiver.keys("/late")) == 4
    finally:
        await again.stop()


async def test_consent_is_checked_on_every_message_and_withdrawal_exits_that_destination_only(
        registry, kafka_bootstrap, start_worker, config_dir, receiver, tmp_path, topic_prefix) -> None:
    # Given gold not listing the consent attribute, a webhook whose rule reads it and one without a rule, both
    # for gold, and a running worker and runner
    (config_dir / "segments.yaml").write_text(SEGMENTS.replace(
        'query: loyalty.tier = "gold"\n    attributes: [loyalty.tier, consents.email]',
        'query: loyalty.tier = "gold"\n    attributes: [loyalty.tier]'))
    write_destinations(config_dir, http_dest("crm", receiver.base_url + "/crm", "[gold]"),
                       http_dest("open", receiver.base_url + "/open", "[gold]", consent=None))
    worker = start_worker(config_dir=config_dir)
    runner = make_runner(settings_for(kafka_bootstrap, topic_prefix, config_dir, tmp_path),
                         list(load_destinations(config_dir / "destinations.yaml")))
    await runner.start()

    def records(path: str, kind: str) -> list[tuple[str, str | None, dict[str, Any], str | None]]:
        """(status, reason, attributes, idempotency tag: the part after the source key) of the records of one
        kind, in delivery order."""
        return [(rec["status"], rec.get("reason"), rec["attributes"],
                 rec["idempotency_key"].split(":")[1] if ":" in rec["idempotency_key"] else None)
                for rec in (receiver.first_stored[k][1] for k in receiver.keys(path)) if rec["kind"] == kind]

    try:
        # When a gold customer who consented to e-mail withdraws consent, then grants it again
        now = int(time.time() * 1000)
        for i, consent in enumerate(("yes", "no", "yes")):
            produce(registry, kafka_bootstrap, "ingest.profiles", [crm(f"r{i}", now - 3000 + i, "C-7", consent=consent)])
            await until(lambda i=i: len(records("/crm", "membership")) == i + 1, 45, f"membership {i + 1} at crm")
            # the e-mail is claimed after the CRM id made the profile: its update comes before the next record
            await until(lambda: len(records("/crm", "attributes")) == 2, 45, "the e-mail identity's update")
        await until(lambda: len(records("/open", "attributes")) == 4, 45, "the open destination's updates")
        await quiet(lambda: len(receiver.keys("/crm")) + len(receiver.keys("/open")))
        # Then crm got the enter (its message carried the consent value gold does not list), an exit and an
        # enter again, each saying why
        assert [(s, r, a) for s, r, a, _ in records("/crm", "membership")] == [
            ("realized", None, {"loyalty.tier": "gold", "consents.email": "yes"}),
            ("exited", "consent_withdrawn", {"loyalty.tier": "gold", "consents.email": "no"}),
            ("realized", "consent_granted", {"loyalty.tier": "gold", "consents.email": "yes"})]
        assert [tag for *_, tag in records("/crm", "membership")] == [None, "consent-exit", "consent-enter"]
        # And the updates of the new profile and of the e-mail identity claimed after the CRM id (withdrawal and
        # grant are not updates)
        assert [(s, r, a) for s, r, a, _ in records("/crm", "attributes")] == [
            ("updated", None, {"loyalty.tier": "gold", "consents.email": "yes"})] * 2
        # And the destination without a rule kept the member: one enter, then the updates of the attributes it
        # maps (the new profile's, the e-mail identity's, the consent attribute's twice)
        assert [(s, r, a) for s, r, a, _ in records("/open", "membership")] == [
            ("realized", None, {"loyalty.tier": "gold", "consents.email": "yes"})]
        assert [(s, r, a) for s, r, a, _ in records("/open", "attributes")] == [
            ("updated", None, {"loyalty.tier": "gold", "consents.email": c}) for c in ("yes", "yes", "no", "yes")]

        # And the customer's lookup shows, on the gold membership, what each destination acknowledged last (the
        # runner's receipts, applied by the worker): crm the enter of the consent grant, open the first enter
        shown: list[list[dict[str, Any]]] = [[]]

        def lookup() -> None:
            r = HTTP.get(f"{worker.url}/profiles", params={"namespace": "CRMID", "id": "C-7"}, timeout=10)
            shown[0] = r.json()["memberships"]["gold"]["destinations"] if r.status_code == 200 else []

        await until(lambda: [(d["name"], d["status"]) for d in shown[0]] == [("crm", "entered"), ("open", "entered")],
                    20, "the receipts of both destinations", poll=lookup)
        assert shown[0] == [{"name": name, "status": "entered", "delivered_ms": d["delivered_ms"]}
                            for name, d in zip(("crm", "open"), shown[0], strict=True)]
        assert all(now <= d["delivered_ms"] <= time.time() * 1000 for d in shown[0])
    finally:
        await runner.stop()


async def test_kafka_destination_and_file_export(registry, kafka_bootstrap, start_worker, config_dir, tmp_path,
                                                 topic_prefix, cli_env) -> None:
    # Given 5 gold members (one later downgraded), a kafka destination and a full csv file export
    start_worker(config_dir=config_dir)
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles", [crm(f"r{i}", now - 5000 + i, f"K-{i}") for i in range(5)])
    memberships = Collector(registry, kafka_bootstrap, "activation.memberships")
    await until(lambda: len(memberships.messages) >= 5, 60, "5 memberships", poll=lambda: memberships.poll(0.3))
    produce(registry, kafka_bootstrap, "ingest.profiles", [crm("x0", now - 1000, "K-0", tier="silver")])
    await until(lambda: any(v["status"] == "exited" for v in membership_values(memberships)), 60, "an exit",
                poll=lambda: memberships.poll(0.3))
    members = {pid for pid, _ in current_members(membership_values(memberships))}
    assert len(members) == 4
    memberships.close()
    exports = tmp_path / "exports"
    write_destinations(
        config_dir,
        "  - name: stream\n    kind: kafka\n    audiences: [gold]\n    identities:\n      - {namespace: CRMID}\n"
        "    topic: activation.dest-kafka-example\n",
        "  - name: files\n    kind: file\n    audiences: [gold]\n    identities:\n      - {namespace: CRMID}\n"
        "      - {namespace: Email, transform: lower}\n    attributes: [loyalty.tier]\n"
        f"    path: {exports}\n    format: csv\n    mode: full\n")
    # When the runner runs the kafka destination (its backfill delivers the current members)
    runner = make_runner(settings_for(kafka_bootstrap, topic_prefix, config_dir, tmp_path),
                         [load_destinations(config_dir / "destinations.yaml").get("stream")])
    stream = Collector(registry, kafka_bootstrap, "activation.dest-kafka-example")
    await runner.start()
    try:
        # Then its topic holds a payload per current member, keyed by profile id
        await until(lambda: {m["key"] for m in stream.messages} >= members, 30, "payloads of the members",
                    poll=lambda: stream.poll(0.3))
        assert all(m["key"] == m["value"]["profile_id"] and m["value"]["audience_id"] == "gold"
                   for m in stream.messages)
        assert {m["key"] for m in stream.messages} == members
    finally:
        await runner.stop()
        stream.close()
    # When `pipeline export files --now` runs
    out = await asyncio.to_thread(run_cli, cli_env, "export", "files", "--now")
    manifest_path = Path(out.splitlines()[0].removeprefix("manifest: ").strip())
    # Then a csv file and its manifest hold the current members
    manifest = json.loads(manifest_path.read_text())
    assert manifest_path.parent.parent == exports and manifest["total_rows"] == 4 and "total: 4 row(s)" in out
    rows = (manifest_path.parent / manifest["files"][0]["name"]).read_text().splitlines()
    assert rows[0].startswith("profile_id,audience_id,status")
    assert {r.split(",")[0] for r in rows[1:]} == members


async def test_runner_delivers_a_backlog_to_each_kind(registry, kafka_bootstrap, receiver, tmp_path, topic_prefix,
                                                     config_dir) -> None:
    # Given 2,000 Avro membership changes already on activation.memberships (no worker: runner only)
    from dest_helpers import membership

    n = 2_000
    produce(registry, kafka_bootstrap, "activation.memberships",
            [membership(f"p{i}", "gold", key=f"k{i}", t=int(time.time() * 1000)) for i in range(n)],
            key=lambda v: v["profile_id"])
    write_destinations(
        config_dir, http_dest("bench", receiver.base_url + "/bench", "[gold]").replace(
            "max_records: 100, max_age_ms: 20", "max_records: 500, max_age_ms: 50"),
        "  - name: kbench\n    kind: kafka\n    audiences: \"*\"\n    identities:\n      - {namespace: CRMID}\n"
        "    topic: activation.dest-kafka-example\n")
    configs = list(load_destinations(config_dir / "destinations.yaml"))
    for cfg in configs:
        # When a runner without backfill (its group starts at the beginning) works through them
        runner = make_runner(settings_for(kafka_bootstrap, topic_prefix, config_dir, tmp_path), [cfg],
                             backfill=False)
        await runner.start()
        try:
            deadline = time.monotonic() + 45
            while runner.local_stats()[cfg.name]["delivered"] < n:
                assert time.monotonic() < deadline, runner.local_stats()
                await asyncio.sleep(0.01)
            # Then each destination had every one delivered and committed, none skipped or dead-lettered
            stats = runner.local_stats()[cfg.name]
            assert (stats["consumed"], stats["delivered"], stats["skipped"], stats["dead_lettered"]) == (n, n, {}, 0)
        finally:
            await runner.stop()
    # And the webhook got every key, in requests of at most 500 records (the speed is `make bench-micro`'s)
    assert sorted(receiver.keys("/bench")) == sorted(f"k{i}" for i in range(n))
    assert max(len(r.body["records"]) for r in receiver.requests if r.path == "/bench") <= 500
