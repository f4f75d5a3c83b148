"""A 10-minute soak at 1,000 events/s on 3,000 people, worker memory and lag sampled every 10 s.

`FAULTS_SOAK_S` shortens or lengthens it (default 600 s); the samples are printed and written with a PNG to
tests/faults/results/. Run alone with `make soak`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(3000)]

SOAK_S = float(os.environ.get("FAULTS_SOAK_S", "600"))
RATE = 1000
PEOPLE = 3000
SAMPLE_EVERY_S = 10
DRAIN_S = 300  # after the feed, for a backlog to drain (sampled too); test-faults stays under an hour
# RSS may grow by at most this much per second over the last third of the feed, once the caches and queues
# have filled to their bounds (pipeline.runtime): generous for noise and malloc's fragmentation, and a leak
# of ~1 MB/s (the same load, unbounded) fails it several times over
LEVEL_MB_PER_S = 0.25
RESULTS = Path(__file__).parent / "results"


def workload_records(registry, seed: int, n: int, tag: str) -> list[tuple[str, str, bytes, bytes | None]]:
    """n records of the benchmark's realistic mix (web events, logins, CRM records, 1 % malformed) drawn from
    PEOPLE people, timestamped now (the audiences' 30-day windows hold them through the run)."""
    gen = Workload(registry, population=PEOPLE, seed=seed, run_tag=tag)
    logical = {registry.name(lg): lg for lg in ("ingest.events", "ingest.profiles")}
    now = int(time.time() * 1000)
    out = []
    for _ in range(n):
        _kind, topic, key, value = gen.next_record(now)
        out.append((logical[topic], topic, key, value))
    return out


def plot(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s["rss_mb"] for s in samples], "b-", label="worker RSS (MB)")
    ax.set_xlabel("seconds since the feed started")
    ax.set_ylabel("RSS (MB)", color="b")
    lag = ax.twinx()
    lag.plot(t, [s["lag_ingest"] for s in samples], "r-", label="ingest lag")
    lag.plot(t, [s["lag_stages"] for s in samples], "m--", label="stage lag")
    lag.set_ylabel("lag (records)", color="r")
    fig.legend(loc="upper left")
    ax.set_title(f"soak: {RATE} events/s on {PEOPLE} people")
    fig.tight_layout()
    fig.savefig(path)


def rss_growth(samples: list[dict[str, Any]], fed_at: float) -> tuple[float, float]:
    """(MB, seconds): how much RSS grew over the last third of the feed, from the median of the three samples
    around its start to the median of the last three (one sample is noisy: a batch, a GC, a flush)."""
    feed = [x for x in samples if x["t"] <= fed_at]
    start = min(range(len(feed)), key=lambda i: abs(feed[i]["t"] - 2 * fed_at / 3))
    median = lambda xs: sorted(x["rss_mb"] for x in xs)[len(xs) // 2]  # noqa: E731
    head, tail = feed[max(0, start - 1):start + 2], feed[-3:]
    return median(tail) - median(head), tail[1]["t"] - head[len(head) // 2]["t"]


def test_a_soak_at_1000_events_per_second_keeps_memory_and_lag_bounded(scenario, registry) -> None:
    # Given one worker and the benchmark's mix for 3,000 people, 1,000 records/s for SOAK_S seconds
    n = int(RATE * SOAK_S)
    s = scenario("soak", people=0, rate=RATE, records=workload_records(registry, 11, n, f"soak{int(time.time())}-"))
    s.begin()
    worker = next(iter(s.fleet.live.values()))
    proc = psutil.Process(worker.proc.pid)
    assert s.lag is not None
    # When it runs, worker memory and lag are sampled every 10 s, through the feed and the drain after it
    samples: list[dict[str, Any]] = []
    drain_deadline = None
    while True:
        s.fleet.check_alive()
        lag = s.lag.sample()
        samples.append({"t": round(time.monotonic() - s.feed.started_at, 1), "sent": s.feed.sent,
                        "rss_mb": round(proc.memory_info().rss / 2**20, 1), "lag_ingest": lag["ingest"],
                        "lag_stages": lag["stages"]})
        print(f"  soak sample: {samples[-1]}", flush=True)
        if s.feed.finished_at:
            drain_deadline = drain_deadline or time.monotonic() + DRAIN_S
            if lag["ingest"] + lag["stages"] == 0 or time.monotonic() > drain_deadline:
                break
        time.sleep(SAMPLE_EVERY_S)  # pacing the samples
    drained = samples[-1]["lag_ingest"] + samples[-1]["lag_stages"] == 0
    # Then it keeps up (or drains its backlog), and 300 people checked through the API match the reference
    report = s.finish(quiesce_s=60, converge_s=60, sample=300)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rss = [x["rss_mb"] for x in samples]
    fed = next(x for x in samples if x["sent"] >= n)
    grew_mb, over_s = rss_growth(samples, fed["t"])
    summary = {"rate": RATE, "people": PEOPLE, "seconds": SOAK_S, "records": n, "samples": samples,
               "rss_growth_last_third_mb": round(grew_mb, 1), "rss_growth_last_third_s": round(over_s),
               "report": report.line(), "rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_max_mb": max(rss),
               "lag_max": max(x["lag_ingest"] + x["lag_stages"] for x in samples)}
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(summary, indent=1))
    plot(samples, RESULTS / f"soak-{stamp}.png")
    print(f"FAULTS soak: {n} records offered at {RATE}/s over {fed['t']:.0f}s, "
          f"{'drained' if drained else 'NOT drained'} at {samples[-1]['t']:.0f}s (handled "
          f"{n / samples[-1]['t']:.0f}/s on average); RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB (max {max(rss):.0f}), "
          f"lag max {summary['lag_max']}; over the last third of the feed RSS grew {grew_mb:.0f} MB in "
          f"{over_s:.0f}s; tests/faults/results/soak-{stamp}.png", flush=True)
    # and memory levels off: what the worker holds is bounded (pipeline.runtime), so it stops growing
    assert grew_mb < LEVEL_MB_PER_S * over_s, \
        f"worker RSS still growing at the end of the feed: {grew_mb:.0f} MB over its last {over_s:.0f}s"
    s.check()
