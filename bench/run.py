"""`make bench` / `python -m bench.run`: throughput, lag, latency, CPU/RSS of the pipeline worker on a real broker.

1. own broker (free ports, temp dir) + topics under a unique prefix;
2. ceiling: a plain Faust passthrough (bench/passthrough.py) drains N pre-loaded Avro events;
3. pipeline: N worker processes, 20 streaming audiences (bench/segments.yaml), a producer process offering
   a realistic mix at fixed rates in steps; per step: offered vs ingested/completed rate (Prometheus
   counters), consumer lag of the worker group per topic (every second), event->membership latency
   (p50/p95/p99, emit_time and consume time), CPU% and peak RSS per process;
4. py-spy profile of one worker at the highest sustainable rate (top costs summarised);
5. batch: `pipeline segments run --all` over the profiles present at the end;
6. JSON + PNG under bench/results/, summary table on stdout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from pathlib import Path
from typing import Any

import psutil

from pipeline.ingest.agents import ingest_group
from pipeline.local import procs as children
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.stages.agents import stages_group

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
LAG_TOPICS = ["ingest.events", "ingest.profiles", "internal.identity", "internal.profile-ops"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- helpers


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name' or 'name{labels}': value} for the cdp_ counters we use (and sums by name)."""
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if not line.startswith("cdp_") or line.startswith("cdp_event_to") or "_bucket" in line:
            continue
        m = re.match(r"([a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)", line)
        if not m:
            continue
        name, labels, val = m.group(1), m.group(2) or "", float(m.group(3))
        if name.endswith("_created"):
            continue
        out[name] += val
        if name == "cdp_profile_ops_total":
            op = re.search(r'op="([^"]+)"', labels)
            out[f"profile_op:{op.group(1) if op else '?'}"] += val
        if name == "cdp_membership_changes_total":
            ev = re.search(r'evaluation="([^"]+)"', labels)
            out[f"membership:{ev.group(1) if ev else '?'}"] += val
        if name in ("cdp_gc_pause_seconds_sum", "cdp_gc_pause_seconds_count"):
            gen = re.search(r'generation="([^"]+)"', labels)
            out[f"gc_{name.rsplit('_', 1)[1]}:{gen.group(1) if gen else '?'}"] += val
    return dict(out)


def fetch_metrics(ports: list[int]) -> dict[str, float]:
    import httpx

    total: dict[str, float] = collections.defaultdict(float)
    for port in ports:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=3)
            for k, v in parse_metrics(r.text).items():
                total[k] += v
        except Exception:  # noqa: BLE001 - a busy worker may time out; the next sample catches up
            total["_errors"] += 1
    return dict(total)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class LagProbe:
    """Committed offsets of a worker group vs end offsets, per logical topic (`ingest`: the probe of the
    workers' other group, the ingest consumers, merged into each sample)."""

    def __init__(self, bootstrap: str, group: str, reg: Any, topics: list[str] | None = None,
                 ingest: LagProbe | None = None) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        self.tps = {lg: [TopicPartition(reg[lg].name, p) for p in range(reg[lg].partitions)] for lg in (topics or LAG_TOPICS)}
        self.ingest = ingest

    def sample(self) -> dict[str, int]:
        out: dict[str, int] = self.ingest.sample() if self.ingest else {}
        all_tps = [tp for tps in self.tps.values() for tp in tps]
        committed = {(tp.topic, tp.partition): tp.offset for tp in self.c.committed(all_tps, timeout=5)}
        for lg, tps in self.tps.items():
            lag = 0
            for tp in tps:
                _lo, hi = self.c.get_watermark_offsets(tp, timeout=5, cached=False)
                off = committed.get((tp.topic, tp.partition), -1001)
                lag += max(0, hi - max(off, 0))
            out[lg] = lag
        return out

    def close(self) -> None:
        self.c.close()
        if self.ingest:
            self.ingest.close()


def membership_consumer(bootstrap: str, prefix: str, stop: Any, out_q: Any) -> None:
    """Reads activation.memberships; records (consume wall ms, event_time_ms, emit_time_ms, evaluation)."""
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.settings import load_topics

    reg = load_topics(prefix)
    spec = reg["activation.memberships"]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-lat-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    c.assign([TopicPartition(spec.name, p, -2) for p in range(spec.partitions)])
    wall, ev_t, emit_t = array("d"), array("d"), array("d")
    evals: list[str] = []
    codes: dict[str, int] = {}
    while not stop.is_set():
        for m in c.consume(1000, timeout=0.2):
            if m.error() is not None:
                continue
            now = time.time() * 1000
            try:
                v = spec.codec.decode(m.value())
            except Exception:  # noqa: BLE001
                continue
            wall.append(now)
            ev_t.append(float(v["event_time_ms"]))
            emit_t.append(float(v["emit_time_ms"]))
            evals.append(codes.setdefault(v["evaluation"], v["evaluation"]))
    c.close()
    out_q.put({"wall": wall.tobytes(), "event": ev_t.tobytes(), "emit": emit_t.tobytes(), "evaluation": evals})


class Procs:
    """psutil handles of the processes we watch: cpu% per sample and peak RSS."""

    def __init__(self) -> None:
        self.p: dict[str, psutil.Process] = {}
        self.peak_rss: dict[str, float] = collections.defaultdict(float)

    def add(self, name: str, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.cpu_percent(None)
            self.p[name] = proc

    def remove(self, name: str) -> None:
        self.p.pop(name, None)

    def sample(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, proc in list(self.p.items()):
            try:
                rss = proc.memory_info().rss / 2**20
                out[name] = {"cpu": proc.cpu_percent(None), "rss_mb": rss}
                self.peak_rss[name] = max(self.peak_rss[name], rss)
            except psutil.Error:
                self.p.pop(name, None)
        return out

    def cpu_times(self) -> dict[str, float]:
        out = {}
        for name, proc in self.p.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[name] = t.user + t.system
        return out


class Sampler(threading.Thread):
    """Every second: lag per topic, summed worker counters, cpu/rss per process; a log line every 5 s."""

    def __init__(self, lag: LagProbe, ports: list[int], procs: Procs, t0: float) -> None:
        super().__init__(daemon=True)
        self.lag, self.ports, self.procs, self.t0 = lag, ports, procs, t0
        self.timeline: list[dict[str, Any]] = []
        self.stop_ev = threading.Event()
        self.phase = "start"
        self.lock = threading.Lock()

    def run(self) -> None:
        last_log = 0.0
        prev: dict[str, Any] | None = None
        while not self.stop_ev.is_set():
            t = time.time()
            try:
                lag = self.lag.sample()
            except Exception as exc:  # noqa: BLE001
                lag = {"error": str(exc)[:80]}  # type: ignore[dict-item]
            s = {"t": round(t - self.t0, 2), "wall": t, "phase": self.phase, "lag": lag,
                 "metrics": fetch_metrics(self.ports), "procs": self.procs.sample(),
                 "load1": os.getloadavg()[0], "sys_cpu_pct": psutil.cpu_percent(None) * (psutil.cpu_count() or 1)}
            s["other_cpu_pct"] = max(0.0, s["sys_cpu_pct"] - sum(p["cpu"] for p in s["procs"].values()))
            with self.lock:
                self.timeline.append(s)
            if prev is not None and t - last_log >= 5:
                last_log = t
                dt_ = max(1e-6, s["wall"] - prev["wall"])
                ing = (s["metrics"].get("cdp_records_ingested_total", 0) - prev["metrics"].get(
                    "cdp_records_ingested_total", 0)) / dt_
                app = (s["metrics"].get("profile_op:apply", 0) - prev["metrics"].get("profile_op:apply", 0)) / dt_
                lags = " ".join(f"{k.split('.')[-1]}={v}" for k, v in lag.items())
                cpus = " ".join(f"{k}={v['cpu']:.0f}%" for k, v in s["procs"].items())
                cpus += f" others={s['other_cpu_pct']:.0f}% load1={s['load1']:.1f}"
                log(f"  [{self.phase}] ingest {ing:,.0f}/s, profile apply {app:,.0f}/s | lag {lags} | cpu {cpus}")
            prev = s
            self.stop_ev.wait(max(0.05, 1 - (time.time() - t)))

    def last(self) -> dict[str, Any]:
        with self.lock:
            return self.timeline[-1] if self.timeline else {}


def total_lag(sample: dict[str, Any]) -> int:
    lag = sample.get("lag") or {}
    return sum(v for v in lag.values() if isinstance(v, int))


def start_worker(i: int, env_base: dict[str, str], tmp: Path) -> dict[str, Any]:
    from pipeline.local.broker import free_port

    port = free_port()
    name = f"w{i + 1}"
    env = {**env_base, "PIPELINE_WEB_PORT": str(port), "PIPELINE_WORKER_NAME": name}
    log_path = tmp / f"worker-{name}.log"
    proc = children.start(children.pipeline_command("worker", "--loglevel", "info"), env, log_path)
    return {"name": name, "proc": proc, "port": port, "log": log_path}


def wait_ready(w: dict[str, Any], timeout_s: float) -> None:
    """Until the worker's GET /readyz answers 200 (partitions assigned, tables recovered, ingest consuming)."""
    children.wait_ready(w["proc"], f"http://127.0.0.1:{w['port']}/readyz", timeout_s=timeout_s, name=w["name"],
                       log_path=w["log"])


def stop_proc(proc: subprocess.Popen[bytes] | None, timeout_s: float = 20) -> None:
    if proc is not None:
        children.stop(proc, timeout_s)


# ---------------------------------------------------------------- phases


def run_passthrough(ctx: dict[str, Any], n: int) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic

    prefix, bootstrap, tmp = ctx["prefix"], ctx["bootstrap"], ctx["tmp"]
    t_in, t_out = f"{prefix}bench.passthrough.in", f"{prefix}bench.passthrough.out"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(t_in, 4, 1), NewTopic(t_out, 4, 1)]).values():
        fut.result()
    log(f"ceiling: pre-loading {n:,} Avro events into {t_in}")
    ctx["cmd_q"].put(("preload", t_in, n))
    kind, info = ctx["out_q"].get(timeout=300)
    assert kind == "preloaded", kind
    log(f"ceiling: pre-loaded in {info['seconds']:.1f}s; starting the passthrough")
    result = tmp / "passthrough.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "BENCH_IN": t_in, "BENCH_OUT": t_out, "BENCH_N": str(n),
           "BENCH_RESULT": str(result), "BENCH_APP_ID": f"bench-pt-{prefix.rstrip('-')}",
           "BENCH_DATA_DIR": str(tmp / "pt-data"), "PIPELINE_TOPIC_PREFIX": prefix}
    log_path = tmp / "passthrough.log"
    proc = children.start([PY, "-m", "bench.passthrough"], env, log_path)
    ctx["children"].append(proc)
    ps = psutil.Process(proc.pid)
    ps.cpu_percent(None)
    cpu0 = time.time()
    peak = 0.0
    deadline = time.monotonic() + 240
    last = 0.0
    try:
        while not result.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"passthrough exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"passthrough did not finish: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss / 2**20)
            if time.monotonic() - last > 5:
                last = time.monotonic()
                log("  ceiling: draining...")
            time.sleep(0.25)
        cpu = ps.cpu_percent(None)
        r = json.loads(result.read_text())
    finally:
        stop_proc(proc)
    dur = r["last_ts"] - r["first_ts"]
    steady = (r["last_ts"] - r["t10_ts"]) if r.get("t10_ts") else dur
    out = {"messages": r["n"], "seconds": round(dur, 2), "msgs_per_s": round(r["n"] / dur, 1),
           "steady_msgs_per_s": round(0.9 * r["n"] / steady, 1), "decode_errors": r["errors"],
           "cpu_pct_avg": round(cpu, 1), "wall_for_cpu_s": round(time.time() - cpu0, 1), "peak_rss_mb": round(peak, 1),
           "machine_load1_end": round(os.getloadavg()[0], 2)}
    log(f"ceiling: {out['msgs_per_s']:,.0f} msg/s over {r['n']:,} messages ({out['steady_msgs_per_s']:,.0f}/s "
        f"after the first 10%), passthrough cpu {cpu:.0f}%")
    return out


def write_config(tmp: Path) -> Path:
    cfg = tmp / "config"
    cfg.mkdir()
    for name in ("identity.yaml", "datasets.yaml"):
        shutil.copy(EXAMPLE_CONFIG_DIR / name, cfg / name)
    shutil.copy(ROOT / "bench" / "segments.yaml", cfg / "segments.yaml")
    return cfg


def run_step(ctx: dict[str, Any], sampler: Sampler, rate: int, seconds: float, label: str,
             drain_cap: float, lag_cap: int) -> dict[str, Any]:
    procs: Procs = ctx["procs"]
    sampler.phase = label
    m0 = fetch_metrics(ctx["ports"])
    c0 = procs.cpu_times()
    t0 = time.time()
    ctx["cmd_q"].put(("step", rate, seconds))
    aborted_for_lag = False
    probe: LagProbe = ctx["ingest_probe"]
    while True:
        with contextlib.suppress(Exception):
            kind, info = ctx["out_q"].get(timeout=0.25)
            assert kind == "step", kind
            break
        if not ctx["abort"].is_set() and time.time() - t0 > 0.5:
            with contextlib.suppress(Exception):
                ing_lag = sum(probe.sample().values())
                if ing_lag > lag_cap:
                    ctx["abort"].set()
                    aborted_for_lag = True
                    log(f"  {label}: ingest lag {ing_lag:,} > {lag_cap:,} records after {time.time() - t0:.1f}s: "
                        "stop offering (saturated)")
    t1 = time.time()
    m1 = fetch_metrics(ctx["ports"])
    c1 = procs.cpu_times()
    window = t1 - t0
    sampler.phase = f"{label} drain"
    drain_start = time.time()
    drained = False
    while time.time() - drain_start < drain_cap:
        time.sleep(1)
        if total_lag(sampler.last()) < max(500, rate // 4) and sampler.last().get("wall", 0) > drain_start + 0.5:
            drained = True
            break
    t2 = time.time()
    m2 = fetch_metrics(ctx["ports"])

    def d(a: dict[str, float], b: dict[str, float], k: str) -> float:
        return b.get(k, 0) - a.get(k, 0)

    malformed = info["counts"].get("malformed", 0)
    samples = [s for s in sampler.timeline if t0 <= s["wall"] <= t2]
    peak_rss: dict[str, float] = collections.defaultdict(float)
    for s in samples:
        for name, p in s["procs"].items():
            peak_rss[name] = max(peak_rss[name], p["rss_mb"])
    step = {
        "label": label, "offered_rate": rate, "achieved_offered_rate": round(info["achieved_rate"], 1),
        "sent": info["sent"], "malformed_sent": malformed, "mix": info["counts"], "window_s": round(window, 2),
        "aborted_for_lag": aborted_for_lag, "drain_s": round(t2 - t1, 2), "drained": drained,
        "t_start": t0, "t_end": t1, "t_drained": t2,
        "ingested_per_s": round((d(m0, m1, "cdp_records_ingested_total")
                                 + d(m0, m1, "cdp_records_dead_lettered_total")) / window, 1),
        "accepted_per_s": round(d(m0, m1, "cdp_records_ingested_total") / window, 1),
        "dead_lettered_per_s": round(d(m0, m1, "cdp_records_dead_lettered_total") / window, 1),
        "profile_apply_per_s": round(d(m0, m1, "profile_op:apply") / window, 1),
        "profile_ops_per_s": round(d(m0, m1, "cdp_profile_ops_total") / window, 1),
        "identity_ops_per_s": round(d(m0, m1, "cdp_identity_ops_total") / window, 1),
        "memberships_per_s": round(d(m0, m1, "cdp_membership_changes_total") / window, 1),
        "incl_drain": {"accepted": d(m0, m2, "cdp_records_ingested_total"),
                       "dead_lettered": d(m0, m2, "cdp_records_dead_lettered_total"),
                       "profile_apply": d(m0, m2, "profile_op:apply"), "seconds": round(t2 - t0, 2)},
        # share of the window the workers' event loops stood still in the garbage collector, per generation
        "gc_pct": {g: round(100 * d(m0, m1, f"gc_sum:{g}") / window / max(1, len(ctx["ports"])), 2) for g in "012"},
        "gc_full_collections": d(m0, m1, "gc_count:2"),
        "lag_max": max((total_lag(s) for s in samples), default=0),
        "lag_max_by_topic": {lg: max((s["lag"].get(lg, 0) for s in samples if isinstance(s.get("lag"), dict)),
                                     default=0) for lg in LAG_TOPICS},
        "lag_end": total_lag(sampler.last()),
        "machine_load1_avg": round(sum(s.get("load1", 0) for s in samples) / max(1, len(samples)), 2),
        "other_processes_cpu_pct_avg": round(sum(s.get("other_cpu_pct", 0) for s in samples) / max(1, len(samples)), 1),
        "cpu_pct": {k: round(100 * (c1[k] - c0.get(k, c1[k])) / window, 1) for k in c1},
        "peak_rss_mb": {k: round(v, 1) for k, v in peak_rss.items()},
        "producer": {"cpu_pct": round(info["cpu_pct"], 1), "rss_mb": round(info["rss_mb"], 1),
                     "delivery_errors": info["delivery_errors"]},
    }
    span = t2 - t0
    step["throughput_per_s"] = round((d(m0, m2, "cdp_records_ingested_total")
                                      + d(m0, m2, "cdp_records_dead_lettered_total")) / span, 1)
    step["completed_per_s"] = round(d(m0, m2, "profile_op:apply") / span, 1)
    valid = info["sent"] - malformed
    step["e2e_ratio"] = round(step["profile_apply_per_s"] * window / valid, 3) if valid else None
    step["sustained"] = bool(not aborted_for_lag and drained and step["e2e_ratio"] and step["e2e_ratio"] >= 0.9
                             and info["achieved_rate"] >= 0.9 * rate)
    log(f"step {label}: offered {rate:,}/s (achieved {info['achieved_rate']:,.0f}/s, {info['sent']:,} sent) -> "
        f"over step+drain: ingested {step['throughput_per_s']:,.0f}/s, completed {step['completed_per_s']:,.0f}/s; "
        f"in the offer window: ingested {step['ingested_per_s']:,.0f}/s, profile apply {step['profile_apply_per_s']:,.0f}/s, "
        f"memberships {step['memberships_per_s']:,.0f}/s, max lag {step['lag_max']:,}, "
        f"{'drained' if drained else 'NOT drained'} after {t2 - t1:.0f}s; sustained={step['sustained']}; "
        f"gc pauses {sum(step['gc_pct'].values()):.1f}% of the time ({step['gc_full_collections']:.0f} full)")
    return step


def latency_stats(lat: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    wall, ev, emit = (array("d"), array("d"), array("d"))
    wall.frombytes(lat["wall"])
    ev.frombytes(lat["event"])
    emit.frombytes(lat["emit"])
    lo, hi = t0 * 1000, t1 * 1000
    e2e_emit, e2e_wall = [], []
    by_eval: collections.Counter[str] = collections.Counter()
    for i in range(len(ev)):
        if lo <= ev[i] <= hi:
            by_eval[lat["evaluation"][i]] += 1
            if lat["evaluation"][i] in ("streaming", "merge"):
                e2e_emit.append(emit[i] - ev[i])
                e2e_wall.append(wall[i] - ev[i])
    return {"n": len(e2e_emit), "by_evaluation": dict(by_eval),
            "emit_ms": {f"p{q}": pct(e2e_emit, q) for q in (50, 95, 99)},
            "consume_ms": {f"p{q}": pct(e2e_wall, q) for q in (50, 95, 99)}}


def run_profile(ctx: dict[str, Any], sampler: Sampler, rate: int, seconds: float, drain_cap: float,
                lag_cap: int) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        log("py-spy not found: skipping the profile (pip install py-spy into .venv)")
        return {"skipped": "py-spy not installed"}
    w = ctx["workers"][0]
    stamp = ctx["stamp"]
    svg, raw = RESULTS / f"profile-{stamp}.svg", ctx["tmp"] / "profile.txt"
    dur = max(3, int(seconds) - 2)
    cmds = [[spy, "record", "--nonblocking", "-r", "100", "-d", str(dur), "-p", str(w["proc"].pid), "-o", str(svg)],
            [spy, "record", "--nonblocking", "-r", "100", "-d", str(dur), "-p", str(w["proc"].pid), "-f", "raw",
             "-o", str(raw)]]
    log(f"profile: py-spy on worker {w['name']} (pid {w['proc'].pid}) for {dur}s at {rate:,}/s")
    spies = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    step = run_step(ctx, sampler, rate, seconds, f"profile@{rate}", drain_cap, lag_cap)
    for s in spies:
        try:
            s.wait(30)
        except subprocess.TimeoutExpired:
            s.kill()
    if not raw.exists():
        err = spies[1].stderr.read().decode(errors="replace") if spies[1].stderr else ""
        return {"skipped": f"py-spy failed: {err[-500:]}", "step": step}
    shutil.copy(raw, RESULTS / f"profile-{stamp}.txt")
    return {"rate": rate, "svg": str(svg.relative_to(ROOT)), "raw": f"bench/results/profile-{stamp}.txt",
            "step": step, **summarise_profile(raw)}


def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"(.*?) \((.*?):\d+\)$", frame.strip())
    if not m:
        return frame.strip()
    path = m.group(2)
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group(1)} ({path})"


def summarise_profile(raw: Path) -> dict[str, Any]:
    """Self and inclusive % of samples per function, plus per 'area' (pipeline module / library)."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    area_self: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        cnt = int(n)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += cnt
        self_c[frames[-1]] += cnt
        for f in set(frames):
            incl[f] += cnt
        leaf = frames[-1]
        m = re.search(r"\((.*)\)$", leaf)
        path = m.group(1) if m else leaf
        area = path.split("/")[0] if "/" in path else path
        if path.startswith("pipeline/"):
            area = "/".join(path.split("/")[:2])
        area_self[area] += cnt

    def top(c: collections.Counter[str], k: int) -> list[dict[str, Any]]:
        return [{"function": f, "pct": round(100 * v / total, 1)} for f, v in c.most_common(k)]

    return {"samples": total, "top_self": top(self_c, 25), "top_inclusive": top(incl, 40),
            "self_by_area": top(area_self, 15)}


def run_batch(ctx: dict[str, Any], sampler: Sampler) -> dict[str, Any]:
    from confluent_kafka import Consumer, TopicPartition

    reg = ctx["reg"]
    control = reg["control.segments"]
    c = Consumer({"bootstrap.servers": ctx["bootstrap"], "group.id": f"bench-batch-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(control.name, 0, -1)])
    c.poll(0.5)
    sampler.phase = "batch"
    log("batch: pipeline segments run --all")
    t0 = time.monotonic()
    proc = subprocess.Popen([PY, "-m", "pipeline", "segments", "run", "--all"], env=ctx["env_base"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finals: dict[int, dict[str, Any]] = {}
    first_progress: float | None = None
    while proc.poll() is None or len(finals) < reg["internal.profile-ops"].partitions:
        msg = c.poll(0.3)
        if msg is not None and msg.error() is None:
            v = control.codec.decode(msg.value())
            if first_progress is None:
                first_progress = time.monotonic()
            if v.get("final"):
                finals[v["partition"]] = v
        if time.monotonic() - t0 > 300:
            proc.kill()
            break
        if proc.poll() is not None and time.monotonic() - t0 > 5 and len(finals) < 4 and proc.returncode != 0:
            break
    out_s, err_s = proc.communicate(timeout=10)
    wall = time.monotonic() - t0
    c.close()
    evaluated = sum(f.get("evaluated", 0) for f in finals.values())
    busy = sum(f.get("seconds", 0) for f in finals.values())
    m = re.search(r"(\d+) profiles evaluated, (\d+) membership changes", out_s)
    res = {"cli_wall_s": round(wall, 2), "cli_rc": proc.returncode, "cli_stdout": out_s.strip()[-300:],
           "profiles_evaluated": int(m.group(1)) if m else evaluated, "changes": int(m.group(2)) if m else None,
           "partition_seconds": {p: f.get("seconds") for p, f in sorted(finals.items())},
           "partition_seconds_sum": round(busy, 2), "audiences": 20}
    # the workers' own account of their walks: how many profiles the pre-check settled without a full evaluation
    walks = [tuple(map(int, m.groups())) for w in ctx["workers"] for m in re.finditer(
        r"walk \(batch\): (\d+) profiles evaluated \((\d+) settled by the pre-check\)", w["log"].read_text())]
    res["walk_profiles"] = sum(e for e, _ in walks)
    res["walk_settled_by_precheck"] = sum(p for _, p in walks)
    n = res["profiles_evaluated"]
    if n and busy:
        res["profiles_per_s_wall"] = round(n / wall, 1)
        res["profiles_per_s_busy"] = round(n / busy, 1)  # one worker evaluates its partitions one after another
        res["audience_evals_per_s_busy"] = round(20 * n / busy, 1)
    log(f"batch: {n:,} profiles in {wall:.1f}s wall (CLI), {busy:.1f}s summed partition time -> "
        f"{res.get('profiles_per_s_busy', 0):,.0f} profiles/s x 20 audiences; "
        f"{res['walk_settled_by_precheck']:,} of {res['walk_profiles']:,} settled by the pre-check")
    return res


def plot(result: dict[str, Any], timeline: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in result["steps"]]
    fig, axes = plt.subplots(3, 1, figsize=(10, 12))
    ax = axes[0]
    x = [s["offered_rate"] for s in steps]
    ax.plot(x, x, "k:", label="offered")
    ax.plot(x, [s["throughput_per_s"] for s in steps], "o-", label="ingested (decode+DLQ) /s, step+drain")
    ax.plot(x, [s["completed_per_s"] for s in steps], "s-", label="completed (profile apply) /s, step+drain")
    ceil = result.get("ceiling", {}).get("msgs_per_s")
    if ceil:
        ax.axhline(ceil, color="r", ls="--", label=f"passthrough ceiling {ceil:,.0f}/s")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("events/s")
    ax.set_title(f"Throughput ({result['workers']} worker(s), {result['machine']['cpus']} cores)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, style in (("emit_ms", "o-"), ("consume_ms", "s--")):
        ys = [(s.get("latency") or {}).get(key, {}).get("p99") for s in steps]
        ax.plot(x, [y / 1000 if y is not None else float("nan") for y in ys], style, label=f"p99 {key[:-3]} - event")
    ys = [(s.get("latency") or {}).get("emit_ms", {}).get("p50") for s in steps]
    ax.plot(x, [y / 1000 if y is not None else float("nan") for y in ys], "^:", label="p50 emit - event")
    ax.set_yscale("log")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("seconds")
    ax.set_title("Event time -> membership latency")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    t = [s["t"] for s in timeline]
    for lg in LAG_TOPICS:
        ax.plot(t, [s["lag"].get(lg, 0) if isinstance(s.get("lag"), dict) else 0 for s in timeline], label=lg)
    t0 = result["t0"]
    for s in result["steps"] + ([result["profile"]["step"]] if result.get("profile", {}).get("step") else []):
        ax.axvspan(s["t_start"] - t0, s["t_end"] - t0, alpha=0.08, color="g")
        ax.text(s["t_start"] - t0, ax.get_ylim()[1] * 0.9 if ax.get_ylim()[1] > 1 else 1, str(s["label"]), fontsize=7)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("lag (messages)")
    ax.set_title("Consumer lag of the worker groups: ingest, stages (committed vs end offsets)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def summary_table(result: dict[str, Any]) -> str:
    rows = ["| offered/s | achieved/s | ingested/s (step+drain) | completed/s (step+drain) | memberships/s | max lag | drained | "
            "p50/p95/p99 emit-event (ms) | p99 consume-event (ms) | worker CPU% | broker CPU% | producer CPU% |",
            "|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|"]
    for s in result["steps"] + ([result["profile"]["step"]] if result.get("profile", {}).get("step") else []):
        lat = s.get("latency") or {}
        e, c = lat.get("emit_ms", {}), lat.get("consume_ms", {})

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:,.0f}"

        wcpu = "/".join(f"{v:.0f}" for k, v in s["cpu_pct"].items() if k.startswith("w"))
        rows.append(f"| {s['offered_rate']:,}{' (profiled)' if s['label'].startswith('profile') else ''} | "
                    f"{s['achieved_offered_rate']:,.0f} | {s['throughput_per_s']:,.0f} | {s['completed_per_s']:,.0f} | "
                    f"{s['memberships_per_s']:,.0f} | {s['lag_max']:,} | {'yes' if s['drained'] else 'no'} | "
                    f"{f(e.get('p50'))}/{f(e.get('p95'))}/{f(e.get('p99'))} | {f(c.get('p99'))} | {wcpu} | "
                    f"{s['cpu_pct'].get('broker', 0):.0f} | {s['producer']['cpu_pct']:.0f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", help="offered events/s per step (default 500,800,1500,5000; quick 800,1500)")
    ap.add_argument("--step-seconds", type=float, help="seconds of offering per step (default 20)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 short steps, small ceiling run (< 2 min)")
    ap.add_argument("--population", type=int, default=50_000)
    ap.add_argument("--passthrough-n", type=int, help="messages for the ceiling run (default 40000, quick 12000)")
    ap.add_argument("--lag-cap", type=int, help="stop offering in a step once the ingest topics lag this many records")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--warmup-seconds", type=float, help="seconds of load before the measured steps, so the "
                    "broker's JIT has compiled its hot paths and people are known (default 60, quick 20; 0: none)")
    ap.add_argument("--warmup-rate", type=int, default=400, help="offered events/s during the warm-up")
    ap.add_argument("--codec-encode", action="store_true", help="producer encodes with the registry codec")
    args = ap.parse_args(argv)
    rates = [int(r) for r in (args.rates or ("800,1500" if args.quick else "500,800,1500,5000")).split(",")]
    step_s = args.step_seconds or (6.0 if args.quick else 20.0)
    pt_n = args.passthrough_n or (8_000 if args.quick else 30_000)
    drain_cap = 5.0 if args.quick else 15.0
    lag_cap = args.lag_cap or (2_000 if args.quick else 5_000)

    from pipeline.local.broker import SINGLE_BROKER_ENV, LocalBroker, ensure_jars, free_port
    from pipeline.settings import load_topics
    from pipeline.topics import apply

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-w{args.workers}" if args.workers > 1 else "") + (
        "-quick" if args.quick else "")
    tmp = Path(tempfile.mkdtemp(prefix="cdp-bench-"))
    t_start = time.time()
    broker = None
    ctx: dict[str, Any] = {"tmp": tmp, "children": [], "stamp": stamp}
    workers: list[dict[str, Any]] = []
    producer = lat_proc = None
    sampler = None
    mpctx = mp.get_context("spawn")

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        ensure_jars()
        broker = LocalBroker(tmp / "kafka", free_port(), free_port())
        log(f"starting broker on {broker.port} (data {tmp / 'kafka'})")
        broker.start(timeout_s=120)
        bootstrap = broker.bootstrap
        os.environ.update(SINGLE_BROKER_ENV)  # one broker: one replica (here and in the workers started below)
        prefix = f"b{uuid.uuid4().hex[:6]}-"
        reg = load_topics(prefix)
        apply(reg, bootstrap, out=lambda *_: None)
        app_id = f"cdp-bench-{prefix.rstrip('-')}"
        cfg = write_config(tmp)
        env_base = {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "PIPELINE_TOPIC_PREFIX": prefix,
                    "PIPELINE_APP_ID": app_id, "PIPELINE_DATA_DIR": str(tmp / "data"), "PIPELINE_CONFIG": str(cfg),
                    "PIPELINE_API_AUTH": "off"}  # the bench reads /metrics on its own local workers
        procs = Procs()
        procs.add("broker", broker.proc.pid)  # type: ignore[union-attr]
        cmd_q, out_q, abort = mpctx.Queue(), mpctx.Queue(), mpctx.Event()
        from bench.workload import producer_main

        producer = mpctx.Process(target=producer_main, args=(bootstrap, prefix, args.population,
                                                             args.codec_encode, cmd_q, out_q, abort), daemon=True)
        producer.start()
        kind, _ = out_q.get(timeout=120)
        assert kind == "ready", kind
        ctx.update(bootstrap=bootstrap, prefix=prefix, reg=reg, cmd_q=cmd_q, out_q=out_q, abort=abort,
                   procs=procs, env_base=env_base)
        log(f"producer ready (pid {producer.pid}, population {args.population:,}, fast encoder "
            f"{'off' if args.codec_encode else 'on, byte-identical to the codec (self-checked)'})")

        ceiling = run_passthrough(ctx, pt_n)

        log(f"starting {args.workers} pipeline worker(s) with 20 streaming audiences")
        for i in range(args.workers):
            w = start_worker(i, env_base, tmp)
            workers.append(w)
            ctx["children"].append(w["proc"])
        for w in workers:
            wait_ready(w, 180)
            procs.add(w["name"], w["proc"].pid)
        time.sleep(2)  # assignment settles
        ctx["workers"], ctx["ports"] = workers, [w["port"] for w in workers]
        procs.add("producer", producer.pid)  # type: ignore[arg-type]
        lat_stop, lat_q = mpctx.Event(), mpctx.Queue()
        lat_proc = mpctx.Process(target=membership_consumer, args=(bootstrap, prefix, lat_stop, lat_q), daemon=True)
        lat_proc.start()
        procs.add("latency-consumer", lat_proc.pid)  # type: ignore[arg-type]
        sampler = Sampler(LagProbe(bootstrap, stages_group(app_id), reg, ["internal.identity", "internal.profile-ops"],
                                   ingest=LagProbe(bootstrap, ingest_group(app_id), reg,
                                                   ["ingest.events", "ingest.profiles"])),
                          ctx["ports"], procs, t_start)
        ctx["ingest_probe"] = LagProbe(bootstrap, ingest_group(app_id), reg, ["ingest.events", "ingest.profiles"])
        sampler.start()
        names = ", ".join(f"{w['name']} pid {w['proc'].pid} :{w['port']}" for w in workers)
        log(f"workers ready: {names}")

        warmup: dict[str, Any] = {}
        warm_s = args.warmup_seconds if args.warmup_seconds is not None else (20.0 if args.quick else 60.0)
        if warm_s > 0:
            # a fresh broker spends its first ~40 s compiling (C2 JIT at ~1 core on this machine): measured
            # steps start after that, and with part of the population already known, as in production
            log(f"warm-up: offering {args.warmup_rate:,} events/s for {warm_s:.0f}s (not a measured step)")
            warmup = run_step(ctx, sampler, args.warmup_rate, warm_s, "warm-up", drain_cap * 2, lag_cap * 4)
        steps = []
        for rate in rates:
            log(f"step: offering {rate:,} events/s for {step_s:.0f}s")
            steps.append(run_step(ctx, sampler, rate, step_s, str(rate), drain_cap, lag_cap))

        profile: dict[str, Any] = {}
        if not args.no_profile:
            sustainable = [s["offered_rate"] for s in steps if s["sustained"]]
            prate = max(sustainable) if sustainable else rates[0]
            if not sustainable:
                log("no step was sustainable: profiling at the lowest rate (worker saturated)")
            profile = run_profile(ctx, sampler, prate, step_s, drain_cap, lag_cap)
            profile["sustainable"] = bool(sustainable)

        batch: dict[str, Any] = {}
        if not args.no_batch:
            sampler.phase = "pre-batch drain"
            t_d = time.time()
            while total_lag(sampler.last()) > 1000 and time.time() - t_d < (10 if args.quick else 45):
                time.sleep(1)
            log(f"pre-batch drain: lag {total_lag(sampler.last()):,} after {time.time() - t_d:.0f}s")
            batch = run_batch(ctx, sampler)
            batch["lag_before"] = total_lag(sampler.last())

        sampler.phase = "end"
        lat_stop.set()
        lat = lat_q.get(timeout=120)
        for s in steps + ([profile["step"]] if profile.get("step") else []):
            s["latency"] = latency_stats(lat, s["t_start"], s["t_end"])
        sampler.stop_ev.set()
        sampler.join(5)
        end_metrics = fetch_metrics(ctx["ports"])
        result = {
            "date": dt.datetime.now().isoformat(timespec="seconds"), "stamp": stamp, "t0": t_start,
            "machine": {"host": platform.node(), "cpus": psutil.cpu_count(), "mem_gib": round(
                psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
                "platform": platform.platform()},
            "args": vars(args), "rates": rates, "step_seconds": step_s, "workers": args.workers,
            "population": args.population, "lag_cap": lag_cap, "ceiling": ceiling, "warmup": warmup, "steps": steps,
            "profile": profile, "batch": batch, "peak_rss_mb": {k: round(v, 1) for k, v in procs.peak_rss.items()},
            "end_metrics": end_metrics, "timeline": sampler.timeline,
        }
        best = max((s["throughput_per_s"] for s in steps), default=0)
        best_sust = max((s["throughput_per_s"] for s in steps if s["sustained"]), default=0)
        result["max_completed_per_s"] = max((s["completed_per_s"] for s in steps), default=0)
        result["max_ingested_per_s"] = best
        result["max_sustained_offered"] = max((s["offered_rate"] for s in steps if s["sustained"]), default=0)
        result["max_sustained_p99_under_1s"] = max((s["offered_rate"] for s in steps if s["sustained"] and (
            s.get("latency") or {}).get("emit_ms", {}).get("p99", 1e9) < 1000), default=0)
        result["ratio_to_ceiling"] = round(best / ceiling["msgs_per_s"], 3) if ceiling.get("msgs_per_s") else None
        result["ratio_sustained_to_ceiling"] = round(best_sust / ceiling["msgs_per_s"], 3) if ceiling.get(
            "msgs_per_s") else None
        json_path = RESULTS / f"bench-{stamp}.json"
        json_path.write_text(json.dumps(result, indent=1, default=str))
        png = RESULTS / f"bench-{stamp}.png"
        plot(result, sampler.timeline, png)
        print()
        print(summary_table(result))
        print()
        print(f"passthrough ceiling: {ceiling['msgs_per_s']:,.0f} msg/s; pipeline max ingested "
              f"{best:,.0f} events/s (completed {result['max_completed_per_s']:,.0f}/s) = {result['ratio_to_ceiling']:.1%} of the ceiling "
              f"(highest sustained offered rate: {result['max_sustained_offered']:,}/s; with p99 event -> membership "
              f"under 1 s: {result['max_sustained_p99_under_1s']:,}/s)")
        print("peak RSS (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in result["peak_rss_mb"].items()))
        if batch.get("profiles_per_s_busy"):
            print(f"batch: {batch['profiles_evaluated']:,} profiles x 20 audiences in {batch['cli_wall_s']}s CLI "
                  f"wall ({batch['partition_seconds_sum']}s worker time) = {batch['profiles_per_s_busy']:,.0f} "
                  f"profiles/s (50 audiences x 1,000,000 profiles: `make bench-batch`)")
        if profile.get("top_self"):
            print(f"profile ({profile['samples']} samples at {profile['rate']:,}/s) top self time:")
            for r in profile["top_self"][:12]:
                print(f"  {r['pct']:5.1f}%  {r['function']}")
        print(f"\nresults: {json_path.relative_to(ROOT)}, {png.relative_to(ROOT)}")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if sampler is not None:
            sampler.stop_ev.set()
            sampler.join(5)
            with contextlib.suppress(Exception):
                sampler.lag.close()
        with contextlib.suppress(Exception):
            ctx["ingest_probe"].close()
        for w in workers:
            stop_proc(w["proc"])
        for p in ctx["children"]:
            stop_proc(p)
        for p in (producer, lat_proc):
            if p is not None and p.is_alive():
                p.terminate()
                p.join(5)
        if broker is not None:
            log("stopping broker")
            broker.stop()
        if os.environ.get("BENCH_KEEP_TMP"):
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
