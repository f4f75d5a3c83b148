"""`make bench-micro` / `python -m bench.micro`: the speed floors that used to be asserted in tests, measured
here instead: segment evaluations/s, HTTP destination deliveries/s, file export rows/s and (on a local broker
of its own, free ports, a temp dir) the destination runner's deliveries/s per kind of a 10,000-change backlog.

Each floor is far below what the 2-core CI machine does: it catches a pathology (a quadratic loop, a request per
record), not a regression of a few percent (that is `make bench`'s job). Exit status 1 when one is below its floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from confluent_kafka import Producer

from pipeline.destinations.base import DestinationContext, Payload
from pipeline.destinations.config import parse_destinations
from pipeline.destinations.files import FileDestination
from pipeline.destinations.http import HttpDestination
from pipeline.local.broker import free_port
from pipeline.model import AttributeValue, ProfileState, StoredEvent
from pipeline.segments import AudienceDef, SegmentEngine, parse_query

# name -> floor (per second)
FLOORS = {"segment evaluations": 20_000, "http deliveries": 1_000,
          "file export rows csv": 2_000, "file export rows jsonl": 2_000, "file export rows parquet": 2_000,
          "runner deliveries http": 300, "runner deliveries kafka": 300}
T0 = 1_780_000_000_000


def payloads(n: int) -> list[Payload]:
    return [Payload(destination="bench", profile_id=f"p{i:06d}", audience_id="vip", kind="membership",
                    status="realized", identities={"CRMID": [f"C-{i}"]}, attributes={"loyalty.tier": "gold"},
                    idempotency_key=f"k-{i}", event_time_ms=i, source_emit_ms=i) for i in range(n)]


def destination_yaml(kind_keys: str, name: str = "bench") -> str:
    return (f"destinations:\n  - name: {name}\n    kind: " + kind_keys + "\n    audiences: [vip]\n"
            "    identities:\n      - {namespace: CRMID}\n    attributes: [loyalty.tier]\n")


def segment_evaluations(n: int = 50) -> float:
    """Compiled audiences: 100 attribute audiences over a profile with 50 events, evaluations per second."""
    queries = {f"a{i}": f'loyalty.tier = "gold" and loyalty.points > {i}' for i in range(100)}
    auds = [AudienceDef(aid, aid, "", q, 1, (), parse_query(q)) for aid, q in queries.items()]
    eng = SegmentEngine(auds)
    p = ProfileState("p1", 0, attributes={"loyalty.tier": AttributeValue("gold", "crm", 0),
                                          "loyalty.points": AttributeValue(50, "crm", 0)},
                     events=[StoredEvent(f"e{k}", "productView", T0 - k * 60_000, "web", {"product.category": "shoes"})
                             for k in reversed(range(50))])
    start = time.perf_counter()
    for _ in range(n):
        eng.evaluate(p, T0)
    return n * len(auds) / (time.perf_counter() - start)


async def receiver(keys: set[str]) -> tuple[web.AppRunner, int]:
    """A webhook on a free port that keeps the idempotency keys it is sent."""
    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        keys.update(r["idempotency_key"] for r in body["records"])
        return web.json_response({"accepted": len(body["records"])})

    app = web.Application()
    app.router.add_post("/bench", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def http_deliveries(n: int = 20_000) -> float:
    """The HTTP destination (batches of <= 500) against a local aiohttp receiver: records per second."""
    keys: set[str] = set()
    runner, port = await receiver(keys)
    cfg = parse_destinations(destination_yaml(f"http\n    url: http://127.0.0.1:{port}/bench\n"
                                              "    batch: {max_records: 500, max_age_ms: 50}")).get("bench")
    dest = HttpDestination(cfg, DestinationContext())
    batch = payloads(n)
    await dest.start()
    try:
        start = time.perf_counter()
        for i in range(0, n, 1000):
            await dest.deliver(batch[i:i + 1000])
        await dest.flush()
        elapsed = time.perf_counter() - start
    finally:
        await dest.close()
        await runner.cleanup()
    if len(keys) != n:
        raise SystemExit(f"http: {len(keys)} of {n} records arrived")
    return n / elapsed


async def file_export_rows(fmt: str, n: int = 20_000) -> float:
    """A file export of n rows in files of <= 8,000 rows: rows per second."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_destinations(destination_yaml(f"file\n    path: {Path(tmp) / fmt}\n    format: {fmt}\n"
                                                  "    max_rows_per_file: 8000")).get("bench")
        dest = FileDestination(cfg, DestinationContext())
        await dest.start()
        try:
            start = time.perf_counter()
            await dest.deliver(payloads(n))
            manifest = await dest.export_now()
            elapsed = time.perf_counter() - start
        finally:
            await dest.close()
    if manifest.total_rows != n:
        raise SystemExit(f"file {fmt}: {manifest.total_rows} of {n} rows exported")
    return n / elapsed


async def runner_deliveries(bootstrap: str, n: int = 10_000) -> dict[str, float]:
    """The destination runner (consume, decode Avro, map, deliver, commit) working through a backlog of n
    membership changes, per kind: deliveries per second from its first commit to its last."""
    from pipeline.destinations.cli import registry_decoder
    from pipeline.destinations.lane import RunnerSettings
    from pipeline.destinations.runner import DestinationRunner
    from pipeline.model import MembershipChange
    from pipeline.settings import load_topics
    from pipeline.topics import apply

    reg = load_topics(f"micro{free_port()}-")
    apply(reg, bootstrap, out=lambda *_: None)
    spec = reg["activation.memberships"]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    now = int(time.time() * 1000)
    for i in range(n):
        change = MembershipChange(
            profile_id=f"p{i}", audience_id="vip", audience_version=1, status="realized", previous_status=None,
            identities={"CRMID": [f"C-{i}"]}, attributes={"loyalty.tier": "gold"}, reason="rule matched",
            cause_event_id=f"e{i}", evaluation="streaming", event_time_ms=now, emit_time_ms=now,
            idempotency_key=f"k{i}")
        producer.produce(spec.name, key=f"p{i}".encode(), value=spec.codec.encode(change.to_dict()))
        producer.poll(0)
    producer.flush(60)
    keys: set[str] = set()
    web_runner, port = await receiver(keys)
    rates: dict[str, float] = {}
    try:
        for kind, keys_yaml in (("http", f"http\n    url: http://127.0.0.1:{port}/bench\n"
                                          "    batch: {max_records: 500, max_age_ms: 50}"),
                                ("kafka", "kafka\n    topic: activation.dest-kafka-example")):
            # (a destination per kind: each its own consumer group, from the start of the backlog)
            cfg = parse_destinations(destination_yaml(keys_yaml, f"runner-{kind}")).get(f"runner-{kind}")
            runner = DestinationRunner([cfg], kafka=bootstrap, topics=reg, decode=registry_decoder(reg),
                                       settings=RunnerSettings())
            await runner.start()
            try:
                deadline = time.monotonic() + 120
                first: tuple[float, int] | None = None
                while (delivered := runner.local_stats()[cfg.name]["delivered"]) < n:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"runner {kind}: {delivered} of {n} delivered in 120 s")
                    if first is None and delivered:
                        first = (time.perf_counter(), delivered)
                    await asyncio.sleep(0.01)
                t0, d0 = first or (time.perf_counter(), 0)
                rates[kind] = (n - d0) / max(1e-3, time.perf_counter() - t0)
            finally:
                await runner.stop()
    finally:
        await web_runner.cleanup()
    return rates


def with_broker(run: Callable[[str], dict[str, float]]) -> dict[str, float]:
    """`run(bootstrap)` on a single local broker of its own (free ports, a temp dir), stopped afterwards."""
    import os

    from pipeline.local.broker import SINGLE_BROKER_ENV, LocalBroker, ensure_jars

    os.environ.update(SINGLE_BROKER_ENV)
    ensure_jars()
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp) / "kafka", free_port(), free_port())
        broker.start(timeout_s=120)
        try:
            return run(broker.bootstrap)
        finally:
            broker.stop()


def run_sync(fn: Callable[..., Coroutine[Any, Any, float]], *args: Any) -> float:
    return asyncio.run(fn(*args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-broker", action="store_true", help="skip the runner (it needs a local broker)")
    args = parser.parse_args(argv)
    runs: dict[str, Callable[[], float]] = {
        "segment evaluations": segment_evaluations,
        "http deliveries": lambda: asyncio.run(http_deliveries()),
        **{f"file export rows {fmt}": partial(run_sync, file_export_rows, fmt) for fmt in ("csv", "jsonl", "parquet")},
    }
    if not args.no_broker:
        by_kind: dict[str, float] = {}

        def runner_rate(kind: str) -> float:
            if not by_kind:
                by_kind.update(with_broker(lambda bootstrap: asyncio.run(runner_deliveries(bootstrap))))
            return by_kind[kind]

        runs.update({f"runner deliveries {kind}": partial(runner_rate, kind) for kind in ("http", "kafka")})
    results: dict[str, Any] = {}
    below = []
    for name, run in runs.items():
        rate = run()
        results[name] = {"per_s": round(rate), "floor": FLOORS[name]}
        ok = rate >= FLOORS[name]
        below += [] if ok else [name]
        print(f"{name:28} {rate:12,.0f}/s  (floor {FLOORS[name]:,}/s){'' if ok else '  BELOW THE FLOOR'}", flush=True)
    print(json.dumps(results))
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
