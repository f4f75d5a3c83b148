"""Batch-evaluation benchmark: N profiles in RocksDB partitions, 50 audiences, the worker's walk code.

`python -m bench.batch --profiles 1000000` (`make bench-batch`) builds, once and cached under bench/.cache/, a
population of profiles with realistic histories (20,000 templates built by the real merge code from the bench's
record mix, cloned under new ids), then times the walk the worker runs for `pipeline segments run --all`:
every profile read from RocksDB, decoded and evaluated against every audience; a profile whose memberships change
is re-encoded and written back, and its membership messages built (not produced: there is no broker here).

The store holds profiles already evaluated, as a running worker's does, so the timed pass ("steady") changes
nothing; `--first-pass` also walks a store of never-evaluated profiles (every profile enters its audiences).
The walk uses worker processes (`--processes`, default one per core) and is repeated in the event loop on
one partition for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
from rocksdict import Options, Rdict

from bench.workload import Workload
from pipeline.ingest.decode import Decoder
from pipeline.model import ExperienceEvent, ProfileRecord, ProfileState
from pipeline.observability.memory import tune_gc
from pipeline.profiles.config import load_profile_config
from pipeline.profiles.merge import apply_event, apply_record
from pipeline.profiles.ops import ProfileProcessor
from pipeline.profiles.walk import Outcome, Walk, WalkPool, WalkSpec
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments import SegmentEngine
from pipeline.segments.config import load_segments_text
from pipeline.settings import load_topics
from pipeline.stages.messages import Evaluate
from pipeline.state.codec import encode_profile
from pipeline.state.tables import partition_for

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
PARTITIONS = 4
BATCH = WalkSpec("batch")
NO_PRECHECK = WalkSpec("batch", precheck=False)
DAY = 86_400_000

# 30 audiences on top of bench/segments.yaml's 20, in the same shapes (counts, sums, windows, attributes).
EXTRA = "\n".join(
    [f"""  - id: {cat}-browsers-{d}d
    query: count(event productView where product.category = "{cat}" within {d}d) >= 2""" for cat in
     ("shoes", "bags", "shirts", "watches", "jackets") for d in (3, 30)]
    + [f"""  - id: {cat}-carters
    query: event cartAdd where product.category = "{cat}" within 14d and not event purchase within 14d""" for cat in
       ("shoes", "bags", "shirts", "watches", "jackets")]
    + [f"""  - id: city-{city.lower()}
    query: person.city = "{city}" and consents.email = "yes\"""" for city in
       ("Lyon", "Paris", "Berlin", "Madrid", "Milan")]
    + [f"""  - id: spend-over-{n}
    query: sum(commerce.order.total of event purchase within 90d) > {n}""" for n in (100, 300, 1000)]
    + [f"""  - id: tier-{t}-sms
    query: loyalty.tier = "{t}" and consents.sms = "yes\"""" for t in ("gold", "silver", "bronze")]
    + ["""  - id: avg-price-high
    query: avg(product.price of event productView within 30d) > 150""",
       """  - id: many-visits
    query: count(event pageView within 30d) >= 5""",
       """  - id: points-mid
    query: loyalty.points >= 2000 and loyalty.points < 8000""",
       """  - id: vip-or-frequent
    query: inSegment("vip") or inSegment("frequent-buyers")"""])


def audiences() -> list[Any]:
    """The 50 audiences: bench/segments.yaml plus EXTRA."""
    text = (ROOT / "bench" / "segments.yaml").read_text().rstrip("\n") + "\n" + EXTRA + "\n"
    return load_segments_text(text, "bench/segments.yaml + bench.batch.EXTRA")


def templates(count: int, events_per: int, now_ms: int) -> list[ProfileState]:
    """`count` profiles built by the real merge code from the bench's record mix, spread over 40 days."""
    reg = load_topics("bench-batch.")
    cfg = load_profile_config(EXAMPLE_CONFIG_DIR / "identity.yaml", EXAMPLE_CONFIG_DIR / "datasets.yaml")
    dec = {"event": Decoder("event", reg["ingest.events"].codec, cfg.identity, cfg.datasets),  # type: ignore[arg-type]
           "record": Decoder("record", reg["ingest.profiles"].codec, cfg.identity, cfg.datasets)}  # type: ignore[arg-type]
    wl = Workload(reg, population=count, seed=5)
    by_ecid = {p.ecid: p.n for p in wl.people}
    by_crm = {p.crm_id: p.n for p in wl.people if p.crm_id}
    rnd = random.Random(3)
    recs: list[tuple[int, int, Any]] = []
    while len(recs) < count * events_per:
        ts = now_ms - int(rnd.random() ** 2 * 40 * DAY)  # more recent events than old ones
        kind, topic, _key, value = wl.next_record(ts, encode=False)
        if kind == "malformed":
            continue
        n = by_crm[value["crmId"]] if kind == "crm" else by_ecid[value["identityMap"]["ECID"][0]["id"]]
        codec = reg["ingest.profiles" if kind == "crm" else "ingest.events"].codec
        rec = dec["record" if kind == "crm" else "event"].decode(codec.encode(value))
        recs.append((ts, n, rec))
    recs.sort(key=lambda r: r[0])
    profiles = [ProfileState(f"t{n}", now_ms - 40 * DAY) for n in range(count)]
    for _ts, n, rec in recs:
        if isinstance(rec, ExperienceEvent):
            apply_event(profiles[n], rec, cfg)
        elif isinstance(rec, ProfileRecord):
            apply_record(profiles[n], rec, cfg)
    return profiles


def clones(tpls: list[ProfileState], total: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, encoded profile) for `total` profiles: templates under new ids and identities."""
    for i in range(total):
        t = tpls[i % len(tpls)]
        pid = f"p{i:08d}"
        ids = {ns: {f"{v}~{i}": ts for v, ts in vals.items()} for ns, vals in t.identities.items()}
        yield pid.encode(), encode_profile(replace(t, profile_id=pid, identities=ids))


def open_parts(path: Path) -> list[Rdict]:
    opts = Options(raw_mode=True)  # as Faust's rocksdict store opens a table partition
    opts.create_if_missing(True)
    return [Rdict(str(path / f"p{i}"), opts) for i in range(PARTITIONS)]


def build(path: Path, total: int, now_ms: int, engine: SegmentEngine | None) -> None:
    """Write `total` profiles into PARTITIONS stores. With an engine, every template is evaluated first
    (twice: new memberships become 'existing'), so the store is what a running worker holds: each profile
    is a member of the audiences it qualifies for and a batch run has nothing to change."""
    t0 = time.monotonic()
    tpls = templates(min(total, 20_000), 15, now_ms)
    if engine is not None:
        cfg = load_profile_config(EXAMPLE_CONFIG_DIR / "identity.yaml", EXAMPLE_CONFIG_DIR / "datasets.yaml")
        processor = ProfileProcessor(cfg, engine, clock=lambda: now_ms / 1000)
        for t in tpls:
            for _ in range(2):
                processor.handle(t.profile_id, t, Evaluate(kind="batch"))
    print(f"built {len(tpls):,} template profiles in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    parts = open_parts(path)
    for i, (key, raw) in enumerate(clones(tpls, total)):
        parts[partition_for(key, PARTITIONS)][key] = raw
        if i % 100_000 == 99_999:
            print(f"  wrote {i + 1:,} profiles", file=sys.stderr)
    for p in parts:
        p.close()
    (path / "meta.json").write_text(json.dumps({"profiles": total, "now_ms": now_ms}))


def walk_store(parts: list[Rdict], processor: ProfileProcessor, pool: WalkPool | None, task: dict[str, Any],
               limit_parts: int = PARTITIONS, spec: WalkSpec = BATCH) -> dict[str, Any]:
    """One batch run over the partitions, one after another as the worker's agent does, each with the
    worker's Walk; membership changes are built and turned into their message dicts, not produced."""
    t0, c0 = time.monotonic(), time.process_time()
    seen = evaluated = prechecked = changes = writes = rss = 0

    def apply(o: Outcome) -> None:
        nonlocal writes
        for c in o.result.changes:
            c.to_dict()
        if o.raw is not None:
            db.put(o.key, o.raw)
            writes += 1

    for n, db in enumerate(parts[:limit_parts]):
        walk = Walk(processor, spec, db, db.get, apply, lambda s, t: None, set(),
                    task_base={**task, "path": db.path()} if pool else None)
        asyncio.run(walk.run(pool))
        rss = max([rss, *(c.memory_info().rss for c in psutil.Process().children())])
        seen, evaluated, changes = seen + walk.seen, evaluated + walk.evaluated, changes + walk.changes
        prechecked += walk.prechecked
        print(f"  partition {n}: {walk.evaluated:,} profiles, {evaluated / (time.monotonic() - t0):,.0f}/s so far",
              file=sys.stderr)
    wall = time.monotonic() - t0
    return {"profiles": seen, "evaluated": evaluated, "settled_by_precheck": prechecked, "changes": changes,
            "writes": writes, "walk_process_rss_mb": round(rss / 2**20),
            "wall_s": round(wall, 2), "owner_cpu_s": round(time.process_time() - c0, 2),
            "profiles_per_s": round(evaluated / wall, 1)}


def plot(out: dict[str, Any], path: Path) -> None:
    """Profiles/s of each pass against the target's rate (1M profiles in 60 s), as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"steady": f"steady, {out['processes']} processes + pre-check",
              "steady_no_precheck": f"steady, {out['processes']} processes, no pre-check",
              "steady_inline": "steady, event loop + pre-check", "first": "first pass (every profile enters)"}
    runs = [(labels[k], out[k]["profiles_per_s"]) for k in labels if k in out]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(runs)))
    ax.barh([r[0] for r in runs], [r[1] for r in runs], color="tab:blue")
    target = out["profiles"] / 60
    ax.axvline(target, color="r", ls="--", label=f"target: {out['profiles']:,} in 60 s ({target:,.0f}/s)")
    for i, (_, v) in enumerate(runs):
        ax.text(v, i, f" {v:,.0f}/s", va="center")
    ax.set_xlim(0, 1.18 * max(target, *(v for _, v in runs)))
    ax.invert_yaxis()
    ax.set_xlabel("profiles/s")
    ax.set_title(f"Batch: {out['audiences']} audiences over {out['profiles']:,} profiles ({out['date']}, "
                 f"{out['cpu_count']} cores)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profiles", type=int, default=1_000_000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="0: walk in the event loop")
    ap.add_argument("--compare-partitions", type=int, default=1,
                    help="partitions walked again without the pre-check, and again without processes, for the "
                         "ratios (0: skip)")
    ap.add_argument("--first-pass", action="store_true",
                    help="also walk a store whose profiles have no memberships yet (every profile enters its "
                         "audiences: the cost of emitting; slow)")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    tune_gc()
    auds = audiences()
    cfg = load_profile_config(EXAMPLE_CONFIG_DIR / "identity.yaml", EXAMPLE_CONFIG_DIR / "datasets.yaml")
    engine = SegmentEngine(auds)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "profiles": args.profiles,
                           "audiences": len(auds), "processes": args.processes, "cpu_count": os.cpu_count(),
                           "partitions": PARTITIONS}
    pool = WalkPool(args.processes) if args.processes else None
    try:
        for name in (("first", "steady") if args.first_pass else ("steady",)):
            path = CACHE / f"batch-{args.profiles}-{'new' if name == 'first' else 'members'}"
            meta = path / "meta.json"
            if args.rebuild or not meta.exists():
                build(path, args.profiles, int(time.time() * 1000), engine if name == "steady" else None)
            # Each store is evaluated at the time it was built, so runs on a cached store compare.
            now_ms = json.loads(meta.read_text())["now_ms"]
            processor = ProfileProcessor(cfg, engine, clock=lambda: now_ms / 1000)  # noqa: B023 - used in this pass only
            task = {"audiences": tuple(auds), "retention_ms": engine.history_retention_ms,
                    "config_dir": str(EXAMPLE_CONFIG_DIR), "now_ms": now_ms}
            store = path
            if name == "first":  # it writes every profile: walk a copy, keep the store for the next run
                store = path.parent / f"{path.name}-work"
                shutil.rmtree(store, ignore_errors=True)
                shutil.copytree(path, store)
            parts = open_parts(store)
            try:
                r = out[name] = walk_store(parts, processor, pool, task)
                print(f"{name} pass: {r['evaluated']:,} profiles x {len(auds)} audiences in {r['wall_s']}s "
                      f"({r['profiles_per_s']:,.0f}/s; {r['settled_by_precheck']:,} settled by the pre-check), "
                      f"{r['changes']:,} membership changes, owner CPU {r['owner_cpu_s']}s", file=sys.stderr)
                k = args.compare_partitions
                if name == "steady" and k:
                    for label, ratio, walk_pool, spec in (
                            ("steady_no_precheck", "precheck_speedup", pool, NO_PRECHECK),
                            ("steady_inline", "process_speedup", None, BATCH)):
                        r = out[label] = walk_store(parts, processor, walk_pool, task, k, spec)
                        out[ratio] = round(out["steady"]["profiles_per_s"] / r["profiles_per_s"], 2)
                        print(f"{label} ({k} partition(s)): {r['profiles_per_s']:,.0f} profiles/s; the full run is "
                              f"{out[ratio]}x faster", file=sys.stderr)
            finally:
                for p in parts:
                    p.close()
                if store != path:
                    shutil.rmtree(store, ignore_errors=True)
    finally:
        if pool:
            pool.close()
    out["extrapolated_1M_s"] = round(1_000_000 / out["steady"]["profiles_per_s"], 1)
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(out, indent=2))
    plot(out, dest.with_suffix(".png"))
    print(json.dumps(out, indent=2))
    print(f"wrote {dest} and {dest.with_suffix('.png').name}", file=sys.stderr)


if __name__ == "__main__":
    main()
