"""Walks over one partition's profile store (batch runs, definition checks): the pure step per profile, and
the same step run by worker processes over read-only views of the store, so a walk uses every core.

A walk evaluates each profile that is in the store when it starts. In worker processes it works like this:
the owner (the Faust worker) records every key it writes while the walk runs (`dirty`), flushes the store so
a read-only view sees everything written before, and hands key ranges to the processes. Each returns, per
profile whose memberships changed, the re-encoded profile and its output. The owner writes and publishes
those, except for keys written meanwhile: their outcome was computed from an older value, so the owner
evaluates them again, inline, from the current one. A range whose process fails is evaluated inline too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import gc
import logging
import multiprocessing
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from rocksdict import AccessType, Options, Rdict

from pipeline.model import ProfileState
from pipeline.profiles.config import ProfileConfig, load_profile_config
from pipeline.profiles.ops import OpResult, ProfileProcessor
from pipeline.segments import AudienceDef, SegmentEngine
from pipeline.segments.columnar import Precheck
from pipeline.stages.messages import Evaluate
from pipeline.state.codec import decode_profile_entry, encode_profile, profile_body

log = logging.getLogger(__name__)

META_PREFIX = b"__"  # faust's offset keys and our per-partition metadata; never profiles
SLICE_KEYS = 10_000  # keys per task handed to a process: ~1-3 s of work, so progress stays frequent
PROGRESS_EVERY = 2_000  # keys between progress reports (and yields to the event loop) when walking inline
PRECHECK_MIN = 64  # fewer keys than this go straight to the full path (the column set-up costs ~1-5 ms)
# Keys pre-checked together: their decoded bodies (~12 KB each) are alive at once, so this bounds a walk
# process's extra memory (~60 MB); larger chunks gain little (numpy's per-call cost is spread thin by then).
PRECHECK_CHUNK = 4_000


@dataclass(frozen=True)
class WalkSpec:
    """What a walk does to each profile. `kind="batch"`: evaluate `audiences` (None: all) on profiles
    changed since `since_ms` (0: all). `kind="definitions"`: exit the members of `removed` audiences and
    evaluate the `audiences` that are new or edited."""

    kind: str
    audiences: tuple[str, ...] | None = None
    since_ms: int = 0
    removed: tuple[str, ...] = ()
    evaluation: str = "batch"  # the membership messages' `evaluation`
    precheck: bool = True  # settle unchanged profiles column-wise first (segments/columnar.py); False: all in full


@dataclass
class Outcome:
    """One profile's result: `raw` is the profile to write back (None: unchanged), `result` its output."""

    key: bytes
    profile_id: str
    raw: bytes | None
    deadline: int | None
    result: OpResult


@dataclass
class SliceResult:
    """A key range's results: how many profiles were evaluated (`prechecked` of them settled by the pre-check
    alone), and the outcomes of those with output."""

    evaluated: int = 0
    prechecked: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


def last_change(p: ProfileState) -> int:
    """The latest time any data of the profile changed (for incremental runs)."""
    latest = max((e.ts_ms for e in p.events[-1:]), default=0)
    return max(latest, max((a.ts_ms for a in p.attributes.values()), default=0), p.created_ms)


def visit(processor: ProfileProcessor, spec: WalkSpec, key: bytes, raw: bytes | None) -> Outcome | None:
    """Evaluate one stored value; None when it is not a profile or the spec skips it. The outcome holds the
    re-encoded profile only when memberships changed (a run that changes nothing writes nothing)."""
    entry = decode_profile_entry(raw) if raw else None
    if not isinstance(entry, ProfileState) or entry.merging is not None:  # merging: about to be a forward
        return None
    pid = key.decode()
    before = _marks(entry)
    if spec.kind == "definitions":
        res = processor.exit_removed(entry, list(spec.removed)) if spec.removed else OpResult()
        if spec.audiences:
            more = processor.handle(pid, entry, Evaluate(audiences=list(spec.audiences), kind=spec.evaluation))
            res.changes.extend(more.changes)
            res.sends.extend(more.sends)
            res.write = more.write or res.write
    else:
        if spec.since_ms and last_change(entry) < spec.since_ms:
            return None
        res = processor.handle(pid, entry, Evaluate(kind=spec.evaluation,
                                                    audiences=list(spec.audiences) if spec.audiences else None))
    written = res.write
    res.write = None  # the outcome carries the encoded profile instead (it crosses a process boundary)
    # Written when a membership changed, with a message or silently ('realized' -> 'existing', a new audience
    # version): left unwritten, the next batch run would find the same silent change to make again.
    changed = isinstance(written, ProfileState) and (bool(res.changes) or _marks(written) != before)
    raw_out = encode_profile(written) if changed else None  # type: ignore[arg-type]
    return Outcome(key, pid, raw_out, entry.next_deadline_ms, res)


def _marks(p: ProfileState) -> list[tuple[str, str, int]]:
    """What a walk may change of a profile's memberships, silently or not."""
    return [(a, m.status, m.version) for a, m in p.memberships.items()]


def has_output(o: Outcome) -> bool:
    """Whether the owner has anything to write or publish for this outcome."""
    return o.raw is not None or bool(o.result.changes or o.result.sends or o.result.counters)


_prechecks: weakref.WeakKeyDictionary[SegmentEngine, Precheck] = weakref.WeakKeyDictionary()
# When most profiles of a range need the full path anyway (a first pass: a new audience everyone enters), the
# pre-check is pure overhead (~30 % of a full visit): it pauses for this many ranges of the walk, then is tried
# again.
PRECHECK_PAUSE = 8


@dataclass
class PrecheckGate:
    """One walk's pause of the pre-check (per walk, so a first pass does not slow the next walk down)."""

    paused: int = 0


_gates: dict[str, PrecheckGate] = {}  # a worker process's gates, by walk id


def needs_full(processor: ProfileProcessor, spec: WalkSpec, items: list[tuple[bytes, bytes | None]],
               gate: PrecheckGate) -> list[bool] | None:
    """Per item, whether it must be visited in full (False: the pre-check proved its memberships cannot change);
    None when every item must (the spec is not one the pre-check covers, too few items, or the walk's gate has
    paused the pre-check)."""
    if not spec.precheck or spec.since_ms or len(items) < PRECHECK_MIN:
        return None
    if gate.paused:
        gate.paused -= 1
        return None
    check = _prechecks.get(processor.engine)
    if check is None:
        check = _prechecks[processor.engine] = Precheck(processor.engine)
    rows: list[int] = []
    bodies: list[list[Any]] = []
    # The bodies are ~250 objects each, all alive until the columns are built: the collector would scan them
    # again and again for nothing (they hold no cycles). It is off for this synchronous step only.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for i, (_key, raw) in enumerate(items):
            body = profile_body(raw)
            if body is not None:  # a forward, a missing or an undecodable value: the full path deals with it
                rows.append(i)
                bodies.append(body)
        cols = check.columns(bodies, spec.removed)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        # a body the columns cannot read: every item takes the full path, which decodes each and names the error
        return None
    finally:
        del bodies
        if collecting:
            gc.enable()
    now = processor.now_ms()
    if spec.kind == "definitions":
        change = check.may_change(cols, now, spec.audiences or (), spec.removed)
    else:
        change = check.may_change(cols, now, spec.audiences or None)
    full = [True] * len(items)
    for i, c in zip(rows, change.tolist(), strict=True):
        full[i] = c
    if sum(full) > 0.75 * len(full):
        gate.paused = PRECHECK_PAUSE
    return full


def evaluate_items(processor: ProfileProcessor, spec: WalkSpec, items: Iterable[tuple[bytes, bytes | None]],
                   gate: PrecheckGate | None = None) -> SliceResult:
    """Visit every (key, value) of a store's range, meta keys skipped, PRECHECK_CHUNK at a time: first the
    pre-check over the chunk, then in full each profile it could not prove unchanged."""
    out = SliceResult()
    gate = gate or PrecheckGate()
    it = iter(items)
    while chunk := [(k, v) for k, v in islice(it, PRECHECK_CHUNK) if not k.startswith(META_PREFIX)]:
        full = needs_full(processor, spec, chunk, gate)
        for i, (key, raw) in enumerate(chunk):
            if full is not None and not full[i]:
                out.evaluated += 1
                out.prechecked += 1
                continue
            o = visit(processor, spec, key, raw)
            if o is not None:
                out.evaluated += 1
                if has_output(o):
                    out.outcomes.append(o)
    return out


def profile_keys(store: Any) -> list[bytes]:
    """The keys of every entry of a store except meta keys, in key order."""
    return [k for k in store.keys() if not k.startswith(META_PREFIX)]  # noqa: SIM118 - a rocksdict Rdict


def slices(keys: list[bytes], size: int = SLICE_KEYS) -> list[tuple[bytes, bytes | None, int]]:
    """(lower, upper exclusive or None, key count) ranges of at most `size` of the sorted keys."""
    return [(keys[i], keys[i + size] if i + size < len(keys) else None, min(size, len(keys) - i))
            for i in range(0, len(keys), size)]


# ---- in a worker process ----

@dataclass(frozen=True)
class SliceTask:
    """A key range of a store to evaluate in a worker process, with everything the process needs."""

    path: str
    lower: bytes
    upper: bytes | None
    spec: WalkSpec
    audiences: tuple[AudienceDef, ...]
    retention_ms: int
    config_dir: str  # identity.yaml and datasets.yaml (loaded once per process; not picklable)
    now_ms: int | None = None  # evaluate as of this time (benchmarks, tests); None: the wall clock
    walk_id: str = ""  # the walk the range belongs to (its pre-check gate)
    carried_attributes: tuple[str, ...] = ()  # the consent attributes membership messages carry


_engines: dict[tuple[tuple[AudienceDef, ...], int, tuple[str, ...]], SegmentEngine] = {}
_configs: dict[str, ProfileConfig] = {}


def _range(db: Rdict, lower: bytes, upper: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    it = db.iter()
    it.seek(lower)
    while it.valid():
        key = it.key()
        if upper is not None and key >= upper:
            return
        yield key, it.value()
        it.next()


def run_slice(task: SliceTask) -> SliceResult:
    """Runs in a worker process: open the store read-only, evaluate the range. The engine is compiled once
    per process and audience set (definitions can be reloaded while the worker runs)."""
    engine_key = (task.audiences, task.retention_ms, task.carried_attributes)
    engine = _engines.get(engine_key)
    if engine is None:
        _engines.clear()
        engine = _engines[engine_key] = SegmentEngine(list(task.audiences), history_retention_ms=task.retention_ms,
                                                      carried_attributes=task.carried_attributes)
    config = _configs.get(task.config_dir)
    if config is None:
        d = Path(task.config_dir)
        config = _configs[task.config_dir] = load_profile_config(d / "identity.yaml", d / "datasets.yaml")
    fixed = task.now_ms
    processor = ProfileProcessor(config, engine, time.time if fixed is None else lambda: fixed / 1000)
    opts = Options(raw_mode=True)
    opts.set_max_open_files(-1)  # every table file opened now: a compaction in the owner cannot remove one mid-walk
    db = Rdict(task.path, opts, access_type=AccessType.read_only())
    try:
        gate = _gates.get(task.walk_id)
        if gate is None:
            if len(_gates) > 64:
                _gates.clear()
            gate = _gates[task.walk_id] = PrecheckGate()
        return evaluate_items(processor, task.spec, _range(db, task.lower, task.upper), gate)
    finally:
        db.close()


def _init_process() -> None:
    from pipeline.observability.memory import tune_gc

    tune_gc()


class WalkPool:
    """The worker processes of a worker's walks: started by the first walk that needs them, stopped once
    idle for `idle_s` (each holds ~100-300 MB, and walks are rare: batch runs, definition changes)."""

    def __init__(self, processes: int, idle_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.processes = processes
        self.idle_s = idle_s
        self.clock = clock
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._in_flight = 0
        self._last_used = 0.0

    def _done(self, _fut: Any) -> None:
        self._in_flight -= 1
        self._last_used = self.clock()

    def close_if_idle(self) -> bool:
        """Called periodically by the owner: stop the processes when no task ran for `idle_s`."""
        if self._executor is None or self._in_flight or self.clock() - self._last_used < self.idle_s:
            return False
        log.info("walk processes: idle for %.0f s, stopping them", self.clock() - self._last_used)
        self.close()
        return True

    def submit(self, task: SliceTask) -> Awaitable[SliceResult]:
        """Called from the event loop; the awaitable fails if the process does (the caller falls back).
        A pool broken by a process that died (killed, out of memory) is replaced by a new one here."""
        for _ in range(2):
            if self._executor is None:
                # spawn, not fork: the worker has librdkafka and RocksDB threads that a fork would copy mid-state
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process)
            try:
                fut = self._executor.submit(run_slice, task)
            except concurrent.futures.process.BrokenProcessPool:
                log.warning("walk processes: a process died and broke the pool; starting new ones")
                self.close()
                continue
            self._in_flight += 1
            waiter = asyncio.wrap_future(fut)
            waiter.add_done_callback(self._done)  # on the event loop's thread, like the count above
            return waiter
        raise AssertionError("unreachable: a new pool accepts work")  # pragma: no cover

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


# ---- in the owner ----

@dataclass
class Walk:
    """One walk over one partition, driven by its owner. The callbacks are the owner's:
    `read(key)` the current stored value; `apply(outcome)` writes `raw` (if any) and publishes the result;
    `progress(seen, total)` reports; `dirty` is filled by the owner's store with every key written while
    the walk runs (it must be watching before `run` is called; a key written after its range was applied
    does no harm: that write is newer than the walk's)."""

    processor: ProfileProcessor
    spec: WalkSpec
    store: Any
    read: Callable[[bytes], bytes | None]
    apply: Callable[[Outcome], None]
    progress: Callable[[int, int], None]
    dirty: set[bytes]
    task_base: dict[str, Any] | None = None  # SliceTask fields but the range and spec; None: walk inline
    owner: Callable[[], bool] = lambda: True  # whether the partition is still ours to write (checked per step)
    aborted: bool = False  # the partition was revoked mid-walk: the rest was not evaluated
    seen: int = 0
    evaluated: int = 0
    prechecked: int = 0  # of `evaluated`, settled by the pre-check alone
    changes: int = 0
    gate: PrecheckGate = field(default_factory=PrecheckGate)  # the pre-check's pause, for ranges walked here

    async def _walk_inline(self, keys: list[bytes]) -> None:
        total = len(keys)
        for i in range(0, total, PROGRESS_EVERY):
            if not self.owner():
                self.aborted = True
                return
            self._inline(keys[i:i + PROGRESS_EVERY])
            self.seen = min(total, i + PROGRESS_EVERY)
            self.progress(self.seen, total)
            await asyncio.sleep(0)

    def _inline(self, keys: Iterable[bytes], count: bool = True) -> None:
        # read all, then apply: no await in between, so nothing is written meanwhile
        res = evaluate_items(self.processor, self.spec, [(k, self.read(k)) for k in keys], self.gate)
        if count:
            self.evaluated += res.evaluated
            self.prechecked += res.prechecked
        for o in res.outcomes:
            self._apply(o)

    def _apply(self, o: Outcome) -> None:
        self.changes += len(o.result.changes)
        self.apply(o)

    async def run(self, pool: WalkPool | None) -> None:
        """Walk the partition (see `_run`), then log what it did."""
        started = time.monotonic()
        await self._run(pool)
        log.info("walk (%s): %d profiles evaluated (%d settled by the pre-check), %d membership changes in "
                 "%.1f s%s", self.spec.kind, self.evaluated, self.prechecked, self.changes,
                 time.monotonic() - started, " (aborted: partition revoked)" if self.aborted else "")

    async def _run(self, pool: WalkPool | None) -> None:
        """1. snapshot the keys (with a pool, after flushing the store, so a read-only view holds every
        value written so far); 2. inline: visit each key, reading its current value; with a pool: one task
        per key range; per finished range, apply its outcomes except for keys written since the walk began,
        which are visited again, inline, from their current value; a range whose task failed is visited
        inline; 3. report progress every 2,000 keys (inline) or per finished range.
        Before each step, if the partition is no longer ours (`owner()`), stop without writing anything more:
        its new owner holds the state now. `aborted` tells the caller."""
        parallel = pool is not None and self.task_base is not None
        if parallel:
            self.store.flush()
        keys = profile_keys(self.store)
        total = len(keys)
        if not parallel or total <= 2 * PROGRESS_EVERY:
            await self._walk_inline(keys)
            return
        assert pool is not None and self.task_base is not None
        # at least 4 ranges per process, so they all finish close together
        size = max(PROGRESS_EVERY, min(SLICE_KEYS, total // (4 * pool.processes)))
        pending: dict[asyncio.Future[SliceResult], tuple[bytes, bytes | None, int]] = {}
        walk_id = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
        try:
            for lo, hi, n in slices(keys, size):
                task = SliceTask(lower=lo, upper=hi, spec=self.spec, walk_id=walk_id, **self.task_base)
                pending[asyncio.ensure_future(pool.submit(task))] = (lo, hi, n)
        except Exception as exc:  # noqa: BLE001 - no processes (cannot spawn): the walk still has to happen
            log.warning("walk: cannot use worker processes (%s: %s); walking in the event loop",
                        type(exc).__name__, exc)
            for fut in pending:
                fut.cancel()
            await self._walk_inline(keys)
            return
        log.info("walk (%s): %d keys in %d ranges on %d processes", self.spec.kind, total, len(pending),
                 pool.processes)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not self.owner():
                for fut in pending:
                    fut.cancel()
                self.aborted = True
                return
            for fut in done:
                lo, hi, n = pending.pop(fut)
                failure = asyncio.CancelledError("pool stopped") if fut.cancelled() else fut.exception()
                if failure is not None:
                    log.warning("walk: a worker process failed on a key range (%s: %s); evaluating it here",
                                type(failure).__name__, failure)
                    self._inline(k for k in keys if lo <= k and (hi is None or k < hi))
                else:
                    res: SliceResult = fut.result()
                    self.evaluated += res.evaluated
                    self.prechecked += res.prechecked
                    stale = {k for k in self.dirty if lo <= k and (hi is None or k < hi)}
                    for o in res.outcomes:
                        if o.key not in stale:
                            self._apply(o)
                    self._inline(sorted(stale), count=False)
                self.seen += n
                self.progress(self.seen, total)
