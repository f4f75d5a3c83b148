"""`pipeline destinations run|status|redrive|receive` and `pipeline export DESTINATION --now`.

Registered by `add_parser(sub)` from pipeline/cli.py's build_parser. Handlers are `func(args, settings) -> int`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.connection import check_cluster
from pipeline.destinations.backfill import Backfill, member_payloads, read_current_members
from pipeline.destinations.base import DestinationContext, Payload
from pipeline.destinations.config import DestinationConfig, DestinationsConfig, load_destinations
from pipeline.destinations.lane import Decoder, RunnerSettings
from pipeline.destinations.runner import DestinationRunner
from pipeline.errors import ConfigError, PipelineError
from pipeline.observability import metrics
from pipeline.topics import TopicRegistry

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger("pipeline.destinations")

STATUS_FILE = "destinations/status.json"  # under the data folder; written by `destinations run`
STATUS_STALE_S = 30.0


def add_parser(sub: Any) -> None:
    """Register the `destinations` and `export` subcommands on the `pipeline` command's subparsers."""
    d = sub.add_parser("destinations", help="run, inspect and redrive activation destinations")
    dsub = d.add_subparsers(dest="action", required=True)
    r = dsub.add_parser("run", help="deliver memberships to the destinations of destinations.yaml until "
                                    "SIGTERM / Ctrl-C")
    r.add_argument("--only", nargs="+", metavar="NAME", help="run only these destinations")
    r.add_argument("--no-backfill", action="store_true", help="do not backfill newly mapped audiences")
    r.add_argument("--metrics-port", type=int, default=None,
                   help="serve GET /metrics, /healthz and /readyz on this port (default "
                        "$PIPELINE_DEST_METRICS_PORT, else none), on $PIPELINE_DEST_METRICS_HOST (default 127.0.0.1)")
    r.set_defaults(func=cmd_run)
    st = dsub.add_parser("status", help="lag, last delivery, errors, dead-letter depth, breaker state")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--only", nargs="+", metavar="NAME")
    st.set_defaults(func=cmd_status)
    rd = dsub.add_parser("redrive", help="re-deliver a destination's dead letters")
    rd.add_argument("name")
    rd.set_defaults(func=cmd_redrive)
    rc = dsub.add_parser("receive", help="a local webhook that accepts and counts batches (demo)")
    rc.add_argument("--port", type=int, default=8089)
    rc.add_argument("--host", default="127.0.0.1")
    rc.set_defaults(func=cmd_receive)
    e = sub.add_parser("export", help="run a file destination's export")
    e.add_argument("destination")
    e.add_argument("--now", action="store_true", required=True, help="export immediately")
    e.set_defaults(func=cmd_export)


# -- shared -----------------------------------------------------------------------------------------

def registry_decoder(reg: TopicRegistry) -> Decoder:
    """decode(logical, bytes) -> dict with the topic's declared codec (Avro for the activation topics)."""

    def decode(logical: str, value: bytes) -> dict[str, Any]:
        result = reg[logical].codec.decode(value)
        if not isinstance(result, dict):
            raise ValueError(f"{logical}: expected a record")
        return result

    return decode


def load_config(settings: Settings) -> DestinationsConfig:
    path = Path(settings.config_dir) / "destinations.yaml"
    if not path.exists():
        raise ConfigError("missing destinations.yaml in the configuration folder", file=str(path))
    return load_destinations(path)


def select(config: DestinationsConfig, names: list[str] | None) -> list[DestinationConfig]:
    if not names:
        return list(config)
    return [config.get(n) for n in names]  # an unknown name raises UnknownNameError listing the valid ones


def make_runner(settings: Settings, configs: list[DestinationConfig], *, backfill: bool = True
                ) -> DestinationRunner:
    reg = settings.topic_registry()
    return DestinationRunner(configs, kafka=settings.kafka, topics=reg, decode=registry_decoder(reg),
                             backfill=Backfill() if backfill else None,
                             settings=RunnerSettings(stats_interval_ms=settings.kafka_stats_interval_ms))


def status_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / STATUS_FILE


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# -- destinations run -------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    configs = select(load_config(settings), args.only)
    if not configs:
        print("no destinations configured", file=sys.stderr)
        return 1
    port = args.metrics_port if args.metrics_port is not None else settings.dest_metrics_port
    return asyncio.run(run_until_stopped(settings, configs, backfill=not args.no_backfill, port=port))


STARTING = {"starting": "destinations starting (backfill, consumers joining their groups)"}


def operations_app(not_ready: Callable[[], dict[str, str]]) -> Any:
    """The runner's operations endpoints (the worker's conventions): GET /metrics, GET /healthz (the event
    loop answers) and GET /readyz (200 once every destination consumes, else 503 with the reasons)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(request: web.Request) -> web.Response:
        reasons = not_ready()
        metrics.READY.set(0 if reasons else 1)
        if not reasons:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reasons": [f"{r}: {d}" for r, d in sorted(reasons.items())]},
                                 status=503)

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_page)])
    return app


async def run_until_stopped(settings: Settings, configs: list[DestinationConfig], *, backfill: bool = True,
                            stop: asyncio.Event | None = None, port: int = 0) -> int:
    """Start the runner, publish its status every 2 s, stop cleanly (flush, commit, close) on
    SIGTERM/SIGINT or when `stop` is set. With `port`, serve /metrics, /healthz and /readyz on
    `settings.dest_metrics_host` (from before the cluster check, so a probe sees "starting")."""
    from aiohttp import web

    stop = stop or asyncio.Event()
    started = asyncio.Event()
    ops: web.AppRunner | None = None
    holder: list[DestinationRunner] = []  # the runner, once built
    if port:
        ops = web.AppRunner(operations_app(lambda: holder[0].not_ready() if started.is_set() else STARTING),
                            access_log=None)
        await ops.setup()
        await web.TCPSite(ops, settings.dest_metrics_host, port).start()  # only this interface
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await asyncio.to_thread(check_cluster, settings.kafka)  # refused credentials stop here
    runner = make_runner(settings, configs, backfill=backfill)
    holder.append(runner)
    path = status_path(settings)
    try:
        await runner.start()
        started.set()
        log.info("destinations runner: running %d destination(s): %s", len(configs),
                 ", ".join(f"{c.name} ({c.kind})" for c in configs))
        while not stop.is_set():
            metrics.READY.set(0 if runner.not_ready() else 1)
            _write_json_atomic(path, {"pid": os.getpid(), "updated_ms": int(time.time() * 1000),
                                      "destinations": runner.local_stats()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2.0)
        log.info("destinations runner: stopping (final flush and commit)")
    finally:
        await runner.stop()
        with contextlib.suppress(OSError):
            _write_json_atomic(path, {"pid": os.getpid(), "updated_ms": int(time.time() * 1000),
                                      "stopped": True, "destinations": runner.local_stats()})
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        if ops is not None:
            await ops.cleanup()
    log.info("destinations runner: stopped")
    return 0



# -- destinations status ----------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    rows = asyncio.run(collect_status(settings, select(load_config(settings), args.only)))
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(format_status(rows))
    return 0


async def collect_status(settings: Settings, configs: list[DestinationConfig]) -> dict[str, dict[str, Any]]:
    """Lag and dead-letter depth from Kafka; last delivery, errors and breaker from the running runner's
    status file (absent or stale: `runner` says so)."""
    runner = make_runner(settings, configs, backfill=False)
    local: dict[str, Any] = {}
    runner_state = "not running"
    path = status_path(settings)
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(path.read_text())
        age = time.time() - doc.get("updated_ms", 0) / 1000
        runner_state = "stopped" if doc.get("stopped") else ("running" if age < STATUS_STALE_S else "stale")
        local = doc.get("destinations") or {}
    out: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        lag, depth = await runner.kafka_status(cfg.name)
        mine = local.get(cfg.name, {})
        out[cfg.name] = {
            "kind": cfg.kind, "runner": runner_state if mine else "not running", "lag": lag,
            "dead_letter_depth": depth, "last_delivery_ms": mine.get("last_delivery_ms"),
            "delivered": mine.get("delivered"), "errors": mine.get("errors") or {},
            "skipped": mine.get("skipped") or {}, "dead_lettered": mine.get("dead_lettered"),
            "breaker": mine.get("breaker"),
        }
    return out


def format_status(rows: dict[str, dict[str, Any]]) -> str:
    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "-"

    def show(v: Any) -> str:
        return "-" if v is None else str(v)

    header = ("DESTINATION", "KIND", "RUNNER", "LAG", "LAST DELIVERY", "DELIVERED", "ERRORS", "DLQ", "BREAKER")
    table = [header] + [
        (name, r["kind"], r["runner"], show(r["lag"]), when(r["last_delivery_ms"]), show(r["delivered"]),
         str(sum(r["errors"].values())), show(r["dead_letter_depth"]), show(r["breaker"]))
        for name, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


# -- destinations redrive ---------------------------------------------------------------------------

def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    cfg = load_config(settings).get(args.name)
    n = asyncio.run(redrive(settings, cfg))
    print(f"redriven {n} dead letter(s) of {cfg.name}")
    return 0


async def redrive(settings: Settings, cfg: DestinationConfig) -> int:
    """Re-deliver `cfg`'s dead letters through a destination of its own (a running runner keeps going)."""
    runner = make_runner(settings, [cfg], backfill=False)
    await runner.start(consume=False)
    try:
        return await runner.redrive(cfg.name)
    finally:
        await runner.stop()


# -- export -----------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    cfg = load_config(settings).get(args.destination)
    manifest = asyncio.run(export_now(settings, cfg))
    print(f"manifest: {manifest['folder']}/_manifest.json")
    for f in manifest["files"]:
        print(f"  {f['name']}: {f['rows']} row(s), {f['bytes']} bytes")
    print(f"total: {manifest['total_rows']} row(s) in {len(manifest['files'])} file(s), mode {manifest['mode']}")
    return 0


async def export_now(settings: Settings, cfg: DestinationConfig) -> dict[str, Any]:
    """Export a file destination now. Full: the current members of its audiences, read from
    activation.membership-state. Incremental: the changes the runner spooled since the last export."""
    from pipeline.destinations.files import FileDestination, FileSettings

    if not isinstance(cfg.settings, FileSettings):
        raise PipelineError(f"destination {cfg.name} is a {cfg.kind} destination; only file destinations export")

    async def no_dead_letters(payloads: list[Payload], reason: str) -> None:
        raise PipelineError(f"{len(payloads)} export row(s) failed: {reason}")

    dest = FileDestination(cfg, DestinationContext(dead_letter=no_dead_letters, kafka=settings.kafka))
    await dest.start()
    try:
        members: list[Payload] | None = None
        if cfg.settings.mode == "full":
            reg = settings.topic_registry()
            current = await asyncio.to_thread(read_current_members, settings.kafka, reg, registry_decoder(reg))
            skips: Counter[str] = Counter()
            members = member_payloads(cfg, current, skips=skips, key_suffix="")
            if skips:
                log.info("destination %s: export skips %s", cfg.name, dict(skips))
        manifest = await dest.export_now(members)
    finally:
        await dest.close()
    return manifest.to_dict()


# -- destinations receive (demo webhook) ------------------------------------------------------------

def cmd_receive(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    totals: Counter[str] = Counter()

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        records = body.get("records") or []
        counts = Counter(str(r.get("status")) for r in records)
        totals.update(counts)
        # Counts only: records carry identities, which are personal data.
        log.info("received %d record(s) for %s on %s: %s (total %s)", len(records), body.get("destination"),
                 request.path, dict(counts), dict(totals))
        return web.json_response({"accepted": len(records)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    print(f"receiving on http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
