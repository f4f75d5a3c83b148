"""Walks over a partition's profile store (batch runs, definition checks): every profile is evaluated, in the
event loop or in worker processes over a read-only view, and a value written during the walk is evaluated
again from its current value."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Options, Rdict

from pipeline.model import AttributeValue, Membership, ProfileState
from pipeline.profiles.ops import ProfileProcessor
from pipeline.profiles.walk import (
    PRECHECK_PAUSE,
    Outcome,
    PrecheckGate,
    Walk,
    WalkPool,
    WalkSpec,
    needs_full,
    slices,
)
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments import AudienceDef, parse_query
from pipeline.stages.messages import Evaluate
from pipeline.state.codec import Forward, decode_profile, encode_forward, encode_profile


def audience(aid: str, query: str) -> AudienceDef:
    return AudienceDef(aid, aid, "", query, 1, (), parse_query(query))


EXAMPLE = EXAMPLE_CONFIG_DIR
NOW = 1_800_000_000_000
AUDIENCES = (audience("gold", 'loyalty.tier = "gold"'), audience("silver", 'loyalty.tier = "silver"'),
             audience("rich", "loyalty.points >= 1000"))
TIERS = ("gold", "silver", "bronze")
BATCH = WalkSpec("batch")


def stored(n: int, tier: str | None = None) -> ProfileState:
    """Profile n: tier cycles gold/silver/bronze, points n * 100; no memberships yet."""
    return ProfileState(f"p{n:05d}", 0, {"CRMID": {f"C{n}": 1}}, {
        "loyalty.tier": AttributeValue(tier or TIERS[n % 3], "crm", 1),
        "loyalty.points": AttributeValue(n * 100, "crm", 1)})


def expected(n: int, tier: str | None = None) -> list[tuple[str, str]]:
    """The memberships profile n enters when every audience is evaluated."""
    t = tier or TIERS[n % 3]
    return sorted([(f"p{n:05d}", a) for a, ok in (("gold", t == "gold"), ("silver", t == "silver"),
                                                  ("rich", n * 100 >= 1000)) if ok])


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[[int], Rdict]]:
    """Factory: a RocksDB store opened as Faust opens a table partition, holding profiles 0..n-1, a forward
    marker and a meta key."""
    opened: list[Rdict] = []

    def make(n: int) -> Rdict:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        db = Rdict(str(tmp_path / f"store-{len(opened)}"), opts)
        opened.append(db)
        for i in range(n):
            db.put(f"p{i:05d}".encode(), encode_profile(stored(i)))
        db.put(b"p99999-merged", encode_forward(Forward("p00000")))
        db.put(b"__faust\x00offset__", b"42")
        return db

    yield make
    for db in opened:
        db.close()


def processor() -> ProfileProcessor:
    from pipeline.profiles.config import load_profile_config
    from pipeline.segments import SegmentEngine

    cfg = load_profile_config(EXAMPLE / "identity.yaml", EXAMPLE / "datasets.yaml")
    return ProfileProcessor(cfg, SegmentEngine(list(AUDIENCES)), clock=lambda: NOW / 1000)


def run_walk(db: Rdict, *, pool: WalkPool | None = None, dirty: set[bytes] | None = None,
             current: dict[bytes, bytes] | None = None, path: str | None = None,
             spec: WalkSpec = BATCH, owner_for_steps: int | None = None) -> tuple[Walk, list[Outcome], list[tuple[int, int]]]:
    """Walk `db` like the profile agent: `current` overrides what the owner reads now (values written
    after the walk began, whose keys are in `dirty`); outcomes are written back to `db`."""
    outcomes: list[Outcome] = []
    reports: list[tuple[int, int]] = []
    current = current or {}

    def apply(o: Outcome) -> None:
        outcomes.append(o)
        if o.raw is not None:
            db.put(o.key, o.raw)

    task = {"path": path or db.path(), "audiences": AUDIENCES, "retention_ms": 90 * 86_400_000,
            "config_dir": str(EXAMPLE), "now_ms": NOW}
    steps = [0]

    def owner() -> bool:  # still the partition's owner for the first `owner_for_steps` checks
        steps[0] += 1
        return owner_for_steps is None or steps[0] <= owner_for_steps

    walk = Walk(processor(), spec, db, lambda k: current.get(k) or db.get(k), apply,
                lambda seen, total: reports.append((seen, total)), dirty if dirty is not None else set(),
                task_base=task if pool else None, owner=owner)
    asyncio.run(walk.run(pool))
    return walk, outcomes, reports


def entered(outcomes: list[Outcome]) -> list[tuple[str, str]]:
    return sorted((c.profile_id, c.audience_id) for o in outcomes for c in o.result.changes
                  if c.status == "realized")


def test_a_batch_op_without_audiences_evaluates_every_audience() -> None:
    # Given a gold profile with 2,000 points and no memberships
    p = stored(20, "gold")
    # When a batch run asks for "every audience" (no list, or an empty one)
    for audiences in (None, []):
        q = stored(20, "gold")
        res = processor().handle(q.profile_id, q, Evaluate(audiences=audiences, kind="batch"))
        # Then every audience is evaluated: it enters gold and rich
        assert sorted((c.audience_id, c.status, c.evaluation) for c in res.changes) == [
            ("gold", "realized", "batch"), ("rich", "realized", "batch")]
    assert p.memberships == {}


def test_an_inline_walk_evaluates_every_profile_and_writes_the_changed_ones(make_store: Any) -> None:
    # Given a store of 30 profiles without memberships, a forward marker and a meta key
    db = make_store(30)
    # When a batch run walks it in the event loop
    walk, outcomes, reports = run_walk(db)
    # Then every profile enters exactly the audiences it qualifies for, and nothing else is visited
    assert entered(outcomes) == sorted(x for n in range(30) for x in expected(n))
    assert (walk.seen, walk.evaluated, walk.changes) == (31, 30, len(entered(outcomes)))
    assert reports == [(31, 31)]
    # And each written profile holds its memberships; a second walk emits nothing but records that the new
    # members are now 'existing' ones; a third finds nothing to change
    assert sorted(decode_profile(db.get(b"p00010")).memberships) == ["rich", "silver"]
    _, again, _ = run_walk(db)
    assert [c for o in again for c in o.result.changes] == []
    assert sorted(o.profile_id for o in again if o.raw) == sorted({p for p, _ in entered(outcomes)})
    assert {a: m.status for a, m in decode_profile(db.get(b"p00010")).memberships.items()} == {
        "rich": "existing", "silver": "existing"}
    _, third, _ = run_walk(db)
    assert third == []


def test_the_pre_check_settles_unchanged_profiles_and_changes_what_the_full_walk_changes(make_store: Any) -> None:
    # Given two identical stores of 3,000 profiles that batch runs settled (members, then 'existing' ones),
    # where 4 profiles then changed tier in ways the stored memberships do not reflect yet
    stores = [make_store(3_000), make_store(3_000)]
    moved = {7: "gold", 8: "silver", 1500: "silver", 2999: "gold"}  # from silver, bronze, gold, bronze
    for db in stores:
        run_walk(db)
        run_walk(db)
        for n, tier in moved.items():
            p = decode_profile(db.get(f"p{n:05d}".encode()))
            p.attributes["loyalty.tier"] = AttributeValue(tier, "crm", 2)
            db.put(p.profile_id.encode(), encode_profile(p))
    # When one is walked with the column-wise pre-check and the other with every profile in full
    checked, with_check, _ = run_walk(stores[0])
    full, without, _ = run_walk(stores[1], spec=WalkSpec("batch", precheck=False))
    # Then both make the same changes to the same 4 profiles, and the pre-check settled all the others
    changes = [sorted((c.profile_id, c.audience_id, c.status) for o in out for c in o.result.changes)
               for out in (with_check, without)]
    assert changes[0] == changes[1] == [
        ("p00007", "gold", "realized"), ("p00007", "silver", "exited"), ("p00008", "silver", "realized"),
        ("p01500", "gold", "exited"), ("p01500", "silver", "realized"), ("p02999", "gold", "realized")]
    assert (checked.evaluated, checked.prechecked, full.evaluated, full.prechecked) == (3_000, 2_996, 3_000, 0)
    assert sorted(o.key for o in with_check if o.raw) == sorted(o.key for o in without if o.raw)


def test_the_pre_check_pauses_while_most_profiles_need_the_full_path() -> None:
    # Given ranges of profiles without memberships (a first pass: nearly every profile enters an audience)
    proc, gate = processor(), PrecheckGate()
    first_pass = [(f"p{n:05d}".encode(), encode_profile(stored(n + 10))) for n in range(200)]
    # When ranges of one walk are pre-checked one after another
    answers = [needs_full(proc, BATCH, first_pass, gate) for _ in range(PRECHECK_PAUSE + 2)]
    # Then the first finds every profile needs the full path, the pre-check then pauses for PRECHECK_PAUSE
    # ranges (None: all in full), and is tried again after; another walk's gate is not paused
    assert answers[0] == [True] * 200
    assert answers[1:-1] == [None] * PRECHECK_PAUSE
    assert answers[-1] == [True] * 200
    assert (gate.paused, needs_full(proc, BATCH, first_pass[:100], PrecheckGate())) == (PRECHECK_PAUSE, [True] * 100)


def test_a_walk_in_worker_processes_matches_the_inline_walk(make_store: Any) -> None:
    # Given two identical stores of 9,000 profiles
    inline_db, parallel_db = make_store(9_000), make_store(9_000)
    pool = WalkPool(2)
    try:
        # When one is walked in the event loop and the other by 2 worker processes, in key ranges
        _, inline, _ = run_walk(inline_db)
        walk, parallel, reports = run_walk(parallel_db, pool=pool)
    finally:
        pool.close()
    # Then both produce the same memberships and write the same profiles
    assert entered(parallel) == entered(inline) == sorted(x for n in range(9_000) for x in expected(n))
    assert sorted(o.key for o in parallel if o.raw) == sorted(o.key for o in inline if o.raw)
    assert (walk.seen, walk.evaluated) == (9_001, 9_000)
    # And progress is reported per finished range, up to the total
    assert len(reports) == len(slices(list(range(9_001)), 2_000)) and reports[-1] == (9_001, 9_001)


def test_a_profile_written_during_a_parallel_walk_is_evaluated_from_its_current_value(make_store: Any) -> None:
    # Given profiles 3 and 4 that the owner rewrote (gold) after the walk began: the processes see the old values
    db = make_store(6_000)
    current = {f"p{n:05d}".encode(): encode_profile(stored(n, "gold")) for n in (3, 4)}
    pool = WalkPool(2)
    try:
        # When the walk runs in worker processes
        _, outcomes, _ = run_walk(db, pool=pool, dirty=set(current), current=current)
    finally:
        pool.close()
    # Then those two are evaluated from their current value (gold), the others from the store
    want = sorted(x for n in range(6_000) for x in (expected(n, "gold") if n in (3, 4) else expected(n)))
    assert entered(outcomes) == want
    assert [o.key for o in outcomes].count(b"p00003") == 1


def test_a_range_whose_process_fails_is_evaluated_in_the_owner(make_store: Any, caplog: Any) -> None:
    # Given worker processes that cannot open the store (a wrong path)
    db = make_store(5_000)
    pool = WalkPool(1)
    try:
        # When a walk hands them its ranges
        walk, outcomes, _ = run_walk(db, pool=pool, path=str(Path(db.path()) / "missing"))
    finally:
        pool.close()
    # Then every range is evaluated inline instead, and the failure is logged
    assert entered(outcomes) == sorted(x for n in range(5_000) for x in expected(n))
    assert walk.evaluated == 5_000
    assert "evaluating it here" in caplog.text


def test_a_definitions_walk_exits_removed_audiences_and_evaluates_new_ones(make_store: Any) -> None:
    # Given profiles that are members of gold and of a since-removed audience
    db = make_store(0)
    for n in range(3):
        p = stored(n)
        processor().handle(p.profile_id, p, Evaluate(audiences=["gold"], kind="batch"))
        p.memberships["old"] = Membership("old", "realized", 0, 1, "seed", 0)
        db.put(p.profile_id.encode(), encode_profile(p))
    # When the definitions walk runs with "old" removed and "silver" new
    _, outcomes, _ = run_walk(db, spec=WalkSpec("definitions", ("silver",), removed=("old",),
                                                 evaluation="definition"))
    # Then each profile exits "old", and profile 1 enters silver; gold is untouched
    got = sorted((c.profile_id, c.audience_id, c.status, c.evaluation) for o in outcomes for c in o.result.changes)
    assert got == [("p00000", "old", "exited", "definition"), ("p00001", "old", "exited", "definition"),
                   ("p00001", "silver", "realized", "definition"), ("p00002", "old", "exited", "definition")]


@pytest.mark.parametrize("processes", [0, 2])
def test_a_walk_stops_writing_once_its_partition_is_revoked(make_store: Any, processes: int) -> None:
    # Given a store of 9,000 profiles and a partition revoked after the walk's first step
    db = make_store(9_000)
    pool = WalkPool(processes) if processes else None
    try:
        # When it is walked (inline: steps of 2,000 keys; in processes: finished ranges)
        walk, outcomes, reports = run_walk(db, pool=pool, owner_for_steps=1)
    finally:
        if pool:
            pool.close()
    # Then it stops, marked aborted: only the first step's profiles (one range, or two that finished
    # together) were written and reported
    assert walk.aborted
    assert 0 < len(outcomes) <= 4_000 and walk.seen <= 4_000 and len(reports) <= 2


def test_walk_processes_that_died_are_replaced(make_store: Any, caplog: Any) -> None:
    # Given a pool whose processes were killed after a walk (out of memory, an operator's kill)
    db = make_store(6_000)
    pool = WalkPool(2)
    try:
        run_walk(db, pool=pool)
        assert pool._executor is not None
        for proc in list(pool._executor._processes.values()):
            # (once one dies the executor may stop the others itself: the next may be gone already)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        # When walks run again
        _, second, _ = run_walk(make_store(6_000), pool=pool)
        caplog.clear()
        _, third, _ = run_walk(make_store(6_000), pool=pool)
    finally:
        pool.close()
    # Then each evaluates every profile, and by the third one new processes do the work (no range falls back)
    want = sorted(x for n in range(6_000) for x in expected(n))
    assert entered(second) == entered(third) == want
    assert "evaluating it here" not in caplog.text


class NoProcesses(WalkPool):
    def submit(self, task: Any) -> Any:
        raise OSError("cannot start a process")


def test_a_walk_without_worker_processes_runs_in_the_event_loop(make_store: Any, caplog: Any) -> None:
    # Given worker processes that cannot be started
    db = make_store(6_000)
    # When a walk asks for them
    walk, outcomes, _ = run_walk(db, pool=NoProcesses(2))
    # Then it walks in the event loop instead, and says so
    assert entered(outcomes) == sorted(x for n in range(6_000) for x in expected(n))
    assert walk.evaluated == 6_000 and "walking in the event loop" in caplog.text


def test_walk_processes_stop_once_idle(make_store: Any) -> None:
    # Given a pool (idle after 60 s on its clock) that ran a walk
    now = [1000.0]
    pool = WalkPool(2, idle_s=60, clock=lambda: now[0])
    try:
        run_walk(make_store(5_000), pool=pool)
        assert pool._executor is not None
        # When 59 s pass, Then the processes are kept; When 61 s have passed, Then they are stopped
        now[0] += 59
        assert not pool.close_if_idle() and pool._executor is not None
        now[0] += 2
        assert pool.close_if_idle() and pool._executor is None
        # And the next walk starts new ones
        _, outcomes, _ = run_walk(make_store(5_000), pool=pool)
        assert entered(outcomes) == sorted(x for n in range(5_000) for x in expected(n))
        assert pool._executor is not None
    finally:
        pool.close()
