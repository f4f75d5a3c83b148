"""CPU of the worker's idle topic followers (`control.erasure`, `control.audiences`): `python -m bench.follow_idle`.

Starts both followers on empty topics of a unique prefix, waits out a warm-up, then reads for `--seconds` how much
CPU the process spent (getrusage) and each of its threads (/proc/self/task/*/schedstat, nanoseconds): the Python
reader threads and librdkafka's own (rdk:*). A process with no follower is measured first, as the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pipeline.local.broker import LocalBroker, free_port
from pipeline.privacy.log import ErasureLog
from pipeline.segments.follow import DefinitionsSync
from pipeline.settings import load_topics
from pipeline.topics import apply


def thread_cpu_ns() -> dict[str, int]:
    """CPU time of every thread of this process, summed by thread name (Python threads are named by their tid)."""
    out: dict[str, int] = defaultdict(int)
    names = {t.native_id: t.name for t in __import__("threading").enumerate()}
    for task in Path("/proc/self/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            comm = (task / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        out[names.get(int(task.name), comm)] += ns
    return dict(out)


def process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pid_cpu_s(pid: int | None) -> float:
    """User + system CPU of another process (the broker), 0 when not known."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(seconds: float, broker_pid: int | None) -> tuple[float, float, dict[str, int]]:
    before_p, before_b, before_t = process_cpu_s(), pid_cpu_s(broker_pid), thread_cpu_ns()
    time.sleep(seconds)  # the measured interval
    after_p, after_b, after_t = process_cpu_s(), pid_cpu_s(broker_pid), thread_cpu_ns()
    return (after_p - before_p, after_b - before_b,
            {k: v - before_t.get(k, 0) for k, v in after_t.items() if v - before_t.get(k, 0) > 0})


def report(label: str, seconds: float, total_s: float, broker_s: float, threads: dict[str, int]) -> None:
    print(f"{label}: process {total_s * 1000:.0f} ms CPU in {seconds:.0f} s ({100 * total_s / seconds:.2f} % of a core);"
          f" broker {broker_s * 1000:.0f} ms")
    for name, ns in sorted(threads.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<24} {ns / 1e6:8.1f} ms")


@contextlib.contextmanager
def broker(bootstrap: str | None, pid: int | None) -> Iterator[tuple[str, int | None]]:
    if bootstrap:
        yield bootstrap, pid
        return
    with tempfile.TemporaryDirectory(prefix="follow-idle-") as tmp:
        b = LocalBroker(Path(tmp), free_port(), free_port())
        b.start(timeout_s=90)
        try:
            yield b.bootstrap, b.proc.pid if b.proc else None
        finally:
            b.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.follow_idle", description=__doc__)
    ap.add_argument("--bootstrap", help="a running broker (default: start one)")
    ap.add_argument("--broker-pid", type=int, help="the running broker's JVM, to measure its CPU too")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("PIPELINE_REPLICATION_FACTOR", "1")
    os.environ.setdefault("PIPELINE_MIN_INSYNC_REPLICAS", "1")
    with broker(args.bootstrap, args.broker_pid) as (bootstrap, broker_pid):
        registry = load_topics(f"idle{uuid.uuid4().hex[:8]}-")
        apply(registry, bootstrap, out=lambda *_: None)
        time.sleep(args.warmup)
        report("no follower", args.seconds, *measure(args.seconds, broker_pid))
        with tempfile.TemporaryDirectory() as tmp:
            erasures = ErasureLog(b"salt")
            definitions = DefinitionsSync(Path(tmp) / "segments.yaml", "bench", writable=True)
            erasures.follow(registry, bootstrap)
            definitions.follow(registry, bootstrap)
            time.sleep(args.warmup)  # connected and caught up
            report("two idle followers", args.seconds, *measure(args.seconds, broker_pid))
            started = time.monotonic()
            erasures.stop()
            definitions.stop()
            print(f"both stopped in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
