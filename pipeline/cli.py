"""The `pipeline` command: init, worker, topics, produce, tail, profile, segments, dlq, sample, destinations,
privacy."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.connection import check_cluster, client_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.settings import PipelineConfig, Settings
from pipeline.stages import messages
from pipeline.topics import CONTROL_SEGMENTS, PROFILE_TOPIC, TopicRegistry


def _registry(settings: Settings) -> TopicRegistry:
    return settings.topic_registry()


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    import faust
    import uvloop

    from pipeline.app import build_app
    from pipeline.observability.memory import start_tracing, tune_gc
    from pipeline.observability.metrics import watch_gc

    start_tracing(settings.tracemalloc_frames)  # PIPELINE_TRACEMALLOC: off by default
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # the worker's loop is created after this
    from pipeline.api.server import load_authenticator

    config = PipelineConfig.load(settings.config_dir)  # a bad config stops here, before any connection
    auth = load_authenticator(settings)  # so do a bad API keys file, or none without PIPELINE_API_AUTH=off
    check_cluster(settings.kafka)  # refused credentials stop here; an unreachable cluster is waited for
    rt = build_app(settings, config, auth=auth)
    watch_gc()
    tune_gc()
    logging.getLogger(__name__).info("worker %s: %d audiences, config %s", settings.worker_name,
                                     len(config.audiences), settings.config_dir)
    from pipeline.observability.logformat import faust_logging_config

    # JSON logs: Faust's banner and spinner are text on stdout, so they are left out (quiet)
    worker = faust.Worker(rt.app, loglevel=args.loglevel, quiet=settings.log_format == "json",
                          logging_config=faust_logging_config(settings.log_format, settings.worker_name,
                                                              args.loglevel))
    worker.execute_from_commandline()
    return 0


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    from pipeline.resources import EXAMPLE_CONFIG_DIR

    target = Path(args.dir)
    names = sorted(p.name for p in EXAMPLE_CONFIG_DIR.glob("*.yaml"))
    taken = [n for n in names if (target / n).exists()]
    if taken and not args.force:
        print(f"{target} already has {', '.join(taken)}: not overwritten (--force replaces them)",
              file=sys.stderr)
        return 1
    target.mkdir(parents=True, exist_ok=True)
    for name in names:  # contents only, not the mode: an installed package's files may be read-only
        shutil.copyfile(EXAMPLE_CONFIG_DIR / name, target / name)
    config = target.resolve()
    print(f"wrote {', '.join(names)} to {config}\n"
          "next:\n"
          "  1. edit them: identity.yaml (identity namespaces), datasets.yaml (datasets, merge policy, limits),\n"
          "     segments.yaml (audiences), destinations.yaml (where memberships are delivered)\n"
          f"  2. export PIPELINE_CONFIG={config} KAFKA_BOOTSTRAP=host:port\n"
          f"     (the worker keeps its state in {settings.data_dir}; PIPELINE_DATA_DIR changes it)\n"
          "  3. pipeline topics apply --dry-run   # the plan; then without --dry-run to create the topics\n"
          "  4. pipeline worker")
    return 0


RENDERED_HEADER = "# Rendered from topics.yaml by `pipeline topics render --format strimzi`: edit topics.yaml, not this.\n"


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.topics import apply, strimzi_topics

    if args.action == "render":  # no cluster needed: topics.yaml as Strimzi KafkaTopic manifests
        import yaml

        print(RENDERED_HEADER + yaml.safe_dump_all(strimzi_topics(_registry(settings), args.cluster),
                                                   sort_keys=False), end="")
        return 0

    items = apply(_registry(settings), settings.kafka, dry_run=args.dry_run)
    if args.dry_run:
        changes = sum(1 for it in items if it.action != "ok")
        print(f"dry run against {settings.bootstrap}: {changes} change(s) planned, nothing applied")
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from collections import Counter

    from pipeline.clients import produce_json_lines
    from pipeline.identity.namespaces import load_identity_config
    from pipeline.ingest.keys import NO_IDENTITY, RecordKeyer

    reg = _registry(settings)
    spec = args.key
    # the same identity.yaml the worker reads, so keys are normalised and ordered as the pipeline does
    identity = load_identity_config(settings.config_dir / "identity.yaml") if spec.mode == "identity" else None
    keyer = RecordKeyer.for_codec(spec, reg[args.topic].codec, identity)
    sources: Counter[str] = Counter()
    src = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115
    with src:
        n = produce_json_lines(reg, settings.kafka, args.topic, src, key=keyer, sources=sources)
    # how the keys were chosen, never the keys themselves (an identity key holds an e-mail, phone, CRM id...)
    how = ", ".join(f"{c} {s}" for s, c in sorted(sources.items(), key=lambda sc: (-sc[1], sc[0])))
    print(f"published {n} records to {reg.name(args.topic)}, keyed by --key {spec}: {how or 'nothing'}",
          file=sys.stderr)
    if sources[NO_IDENTITY]:
        one = sources[NO_IDENTITY] == 1
        print(f"{sources[NO_IDENTITY]} {'record carries' if one else 'records carry'} no usable identity: the "
              f"pipeline dead-letters {'it' if one else 'them'} (ingest.dlq, with the reason in the headers)",
              file=sys.stderr)
    return 0


def _key_spec(text: str) -> Any:
    from pipeline.ingest.keys import KeySpec

    try:
        return KeySpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.clients import tail

    for rec in tail(_registry(settings), settings.kafka, args.topic, from_beginning=args.from_beginning,
                    max_messages=args.max, idle_timeout_s=args.timeout):
        print(json.dumps(rec, default=str), flush=True)
    return 0


def cmd_profile(args: argparse.Namespace, settings: Settings) -> int:

    import httpx

    url = args.url or f"http://127.0.0.1:{settings.web_port}"
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    r = httpx.get(f"{url}/profiles", params={"namespace": args.namespace, "id": args.id}, headers=headers,
                  timeout=10)
    print(json.dumps(r.json(), indent=2))
    return 0 if r.status_code == 200 else 1


def cmd_api_key(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime

    from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key, parse_keys, parse_scopes

    scopes = parse_scopes(args.scopes)
    expires = None
    if args.expires:
        try:
            expires = datetime.fromisoformat(args.expires)
        except ValueError:
            raise ConfigError(f"--expires must be an ISO 8601 date or time, not {args.expires!r}") from None
        expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    key = new_key()
    entry = ApiKey(args.id, hash_key(key), scopes, args.description or "", expires)
    text = entry_yaml(entry)
    parse_keys("keys:\n" + text, "(the new entry)")  # the entry is valid as printed (id, scopes)
    print(f"API key (shown once; the keys file keeps only its hash):\n\n  {key}\n\n"
          f"add this entry under `keys:` in the keys file (PIPELINE_API_KEYS_FILE); the worker picks it up "
          f"within a second, without a restart:\n\n{text}")
    return 0


def cmd_segments(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.segments import SegmentEngine

    config = PipelineConfig.load(settings.config_dir)
    engine = SegmentEngine(config.audiences,
                           history_retention_ms=config.profile.datasets.event_history.retention_ms)
    if args.action == "explain":
        for e in engine.explain(args.ids[0] if args.ids else None):
            modes = [m for m, ok in (("streaming", e.streaming), ("batch", e.batch), ("edge", e.edge)) if ok]
            print(f"{e.audience_id}: {', '.join(modes)} - {e.reason}")
        return 0
    if args.action == "list":
        for a in config.audiences:
            print(f"{a.id} (v{a.version}): {a.query}")
        return 0
    since = args.since_ms
    if args.incremental:
        since = last_run_start(settings)
        print(f"incremental: profiles changed since {since} (start of the last completed run)"
              if since else "incremental: no completed run yet, evaluating every profile", file=sys.stderr)
    return run_batch(settings, [] if args.all else list(args.ids), since_ms=since)


def last_run_start(settings: Settings) -> int:
    from pipeline.kafka_reads import read_messages
    from pipeline.segments.batch import last_completed_start

    reg = _registry(settings)
    spec = reg[CONTROL_SEGMENTS]
    # read to its end, not until 2 s without a record: that always waited 2 s, and stopped early on a slow broker
    progress = (spec.codec.decode(m.value()) for m in read_messages(settings.kafka, spec.name) if m.value() is not None)
    return last_completed_start(progress, reg[PROFILE_TOPIC].partitions)


def run_batch(settings: Settings, audiences: list[str], since_ms: int = 0, timeout_s: float = 600) -> int:
    """Ask every partition's owner to evaluate, then follow progress on the control topic."""
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.clients import producer
    from pipeline.segments.batch import batch_request, new_run_id

    reg = _registry(settings)
    ops, control = reg[PROFILE_TOPIC], reg[CONTROL_SEGMENTS]
    run = new_run_id()
    c = Consumer(client_config(settings.kafka, {"group.id": f"cdp-batch-{run}", "enable.auto.commit": False}))
    c.assign([TopicPartition(control.name, 0, -1)])  # latest: only this run's progress
    c.poll(0.5)
    p = producer(settings.kafka)
    for part in range(ops.partitions):
        p.produce(ops.name, key=run.encode(), partition=part,
                  value=messages.encode(batch_request(run, audiences, since_ms)))
    p.flush(10)
    progress: dict[int, tuple[int, int]] = {}
    finals: dict[int, messages.Progress] = {}
    bar = _progress_bar(ops.partitions)
    deadline = time.monotonic() + timeout_s
    while len(finals) < ops.partitions and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is None or msg.error():
            continue
        v = messages.decode(msg.value() or b"")
        if not isinstance(v, messages.Progress) or v.run != run:
            continue
        progress[v.partition] = (v.seen, v.total)
        if v.final:
            finals[v.partition] = v
        bar(progress, len(finals))
    c.close()
    if len(finals) < ops.partitions:
        print(f"\nbatch run {run} timed out: {len(finals)}/{ops.partitions} partitions reported", file=sys.stderr)
        return 1
    total = sum(f.evaluated for f in finals.values())
    changes = sum(f.changes for f in finals.values())
    print(f"\nbatch run {run}: {total} profiles evaluated, {changes} membership changes emitted")
    aborted = sorted(p for p, f in finals.items() if f.aborted)
    if aborted:
        print(f"batch run {run}: stopped early on partition(s) {aborted} (revoked during a rebalance); "
              "run it again", file=sys.stderr)
        return 1
    return 0


def _progress_bar(parts: int) -> Any:
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(progress: dict[int, tuple[int, int]], finished: int) -> None:
        seen = sum(s for s, _ in progress.values())
        total = sum(t for _, t in progress.values()) or 1
        if tty:
            width = 30
            filled = int(width * seen / total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {seen}/{total} profiles, "
                             f"{finished}/{parts} partitions done")
            sys.stderr.flush()
        elif time.monotonic() - last[0] > 2 or finished == parts:
            last[0] = time.monotonic()
            print(f"batch progress: {seen}/{total} profiles, {finished}/{parts} partitions done", file=sys.stderr)

    return show


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.ingest.replay import parse_since, replay

    reasons = frozenset(r.strip() for arg in args.reason for r in arg.split(",") if r.strip())
    try:
        since_ms = parse_since(args.since, int(time.time() * 1000)) if args.since else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = replay(_registry(settings), settings.kafka, reasons=reasons, since_ms=since_ms, app_id=settings.app_id,
                 dry_run=args.dry_run, progress=lambda line: print(line, file=sys.stderr))
    by_topic = Counter(r.logical for r in out.replays)
    done = "would replay" if args.dry_run else "replayed"
    print(f"{done} {len(out.replays)} records ({', '.join(sorted(reasons))})"
          + "".join(f"; {n} to {t}" for t, n in sorted(by_topic.items())))
    for why, n in sorted(out.left.items()):
        print(f"left {n}: {why}")
    return 0


def cmd_sample(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.sample import write

    ev, rec = write(args.people, Path(args.out), int(time.time() * 1000), seed=args.seed)
    print(f"wrote {ev} and {rec}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pipeline", description="Real-time customer data pipeline")
    ap.add_argument("--config", help="configuration folder (default $PIPELINE_CONFIG, else the example "
                                     "shipped with the package: `pipeline init DIR` writes a copy to edit)")
    sub = ap.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="write a starter configuration folder (a copy of the example) to edit")
    i.add_argument("dir", help="the folder to write identity.yaml, datasets.yaml, segments.yaml and "
                               "destinations.yaml into (created if missing)")
    i.add_argument("--force", action="store_true", help="replace files that are already there")
    i.set_defaults(func=cmd_init)
    w = sub.add_parser("worker", help="run the stream-processing worker")
    w.add_argument("--loglevel", default="info")
    w.set_defaults(func=cmd_worker)
    t = sub.add_parser("topics", help="manage the topics declared in topics.yaml")
    t.add_argument("action", choices=["apply", "render"],
                   help="apply: create or update them on the cluster; render: print them as manifests")
    t.add_argument("--dry-run", action="store_true",
                   help="print the plan (compared with the cluster at KAFKA_BOOTSTRAP) and change nothing")
    t.add_argument("--format", choices=["strimzi"], default="strimzi",
                   help="render: Strimzi KafkaTopic resources (the default and only format)")
    t.add_argument("--cluster", default="cdp-kafka", help="render: the Strimzi Kafka cluster's name")
    t.set_defaults(func=cmd_topics)
    p = sub.add_parser("produce", help="publish JSON-lines records as Avro to a pipeline topic")
    p.add_argument("--topic", required=True, help="logical topic name from topics.yaml")
    p.add_argument("--file", required=True, help="JSON-lines file, or - for stdin")
    p.add_argument("--key", type=_key_spec, default="identity", metavar="FORM", help=(
        "the Kafka key of each record (Kafka orders records only within a partition; the key picks it). "
        "identity (default): '<namespace>:<normalised id>' of the record's highest-priority identity, read, "
        "normalised and ordered as the pipeline does (identity.yaml from `pipeline --config DIR` or "
        "PIPELINE_CONFIG), so one person's records stay in one partition, in order; identity:NAMESPACE: that "
        "namespace's identity if the record has one, else the highest-priority one; field:NAME: a top-level "
        "field's value (field:eventId was the old default); none: no key. A record without a usable identity "
        "is still published, keyed by its eventId/recordId: the pipeline dead-letters it with its reason. "
        "Keys are never printed (they hold e-mails, phones, CRM ids)"))
    p.set_defaults(func=cmd_produce)
    tl = sub.add_parser("tail", help="print a pipeline topic's messages decoded, as JSON lines")
    tl.add_argument("topic")
    tl.add_argument("--from-beginning", action="store_true")
    tl.add_argument("--max", type=int)
    tl.add_argument("--timeout", type=float, default=5.0, help="exit after this many idle seconds")
    tl.set_defaults(func=cmd_tail)
    pr = sub.add_parser("profile", help="look up a merged profile")
    pr.add_argument("action", choices=["get"])
    pr.add_argument("--namespace", required=True)
    pr.add_argument("--id", required=True)
    pr.add_argument("--url")
    pr.set_defaults(func=cmd_profile)  # the API key: PIPELINE_API_KEY
    ak = sub.add_parser("api-key", help="make an API key for the worker's HTTP API")
    ak.add_argument("action", choices=["create"])
    ak.add_argument("--id", required=True, help="the key's name (in the access log): letters, digits, - _ .")
    ak.add_argument("--scopes", required=True, help="comma-separated: profiles:read, audiences:read, "
                    "audiences:write, privacy:erase, metrics:read, destinations:read, destinations:redrive, "
                    "admin (all of them)")
    ak.add_argument("--description")
    ak.add_argument("--expires", help="ISO 8601 date or time (UTC unless a zone is given)")
    ak.set_defaults(func=cmd_api_key)
    s = sub.add_parser("segments", help="explain, list or batch-run audiences")
    s.add_argument("action", choices=["explain", "list", "run"])
    s.add_argument("ids", nargs="*")
    s.add_argument("--all", action="store_true")
    s.add_argument("--since-ms", type=int, default=0, help="only profiles changed since this time (ms)")
    s.add_argument("--incremental", action="store_true",
                   help="only profiles changed since the start of the last completed run")
    s.set_defaults(func=cmd_segments)
    dl = sub.add_parser("dlq", help="replay dead-lettered ingest records once their cause is fixed")
    dl.add_argument("action", choices=["replay"])
    dl.add_argument("--reason", action="append", required=True,
                    help="the reason header of the entries to replay (e.g. no-usable-identity); repeat it or "
                         "separate reasons with commas")
    dl.add_argument("--since", help="only entries dead-lettered since then: an ISO 8601 time (UTC unless it "
                                    "gives a zone) or an age (90s, 30m, 2h, 7d, 1w)")
    dl.add_argument("--dry-run", action="store_true", help="count what would be replayed and produce nothing")
    dl.set_defaults(func=cmd_dlq)
    sm = sub.add_parser("sample", help="write reproducible sample data (events.jsonl, profiles.jsonl)")
    sm.add_argument("--people", type=int, default=2000)
    sm.add_argument("--seed", type=int, default=7)
    sm.add_argument("--out", default="data/sample")
    sm.set_defaults(func=cmd_sample)
    from pipeline.destinations.cli import add_parser as add_destinations; add_destinations(sub)  # noqa: E702, I001
    from pipeline.privacy.cli import add_parser as add_privacy; add_privacy(sub)  # noqa: E702, I001
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.observability import logformat

    logging.basicConfig(level=logging.INFO, format=logformat.TEXT_FORMAT)
    try:
        settings = Settings.from_env(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logformat.configure(settings.log_format, settings.worker_name)
    try:
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
