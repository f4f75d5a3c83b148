"""Column-wise pre-check of a batch walk: which profiles of a key range could change a membership at all.

A batch run evaluates every audience on every profile; on a store that streaming keeps current almost nothing
changes, and decoding each profile into objects and running the engine on it costs ~250 µs. The pre-check reads
the raw bodies of a whole key range into numpy columns (only the event types, fields, attributes and
memberships the audiences read) and evaluates every audience for all of them at once, in three-valued logic:
per profile and audience, qualified, not qualified, or unknown. A profile whose audiences are all known and all
agree with its stored memberships is one `SegmentEngine.decide` would return nothing for, so the walk skips it;
every other profile takes the full path (decode + engine), which alone decides what changes.

Unknown is the safe answer wherever float64 or the data could make the columns disagree with the engine: a sum
or average too close to its threshold, integers beyond 2**53 or non-finite values in an aggregate, a history not
in time order. Leaf conditions (attribute comparisons, where-conditions, birthdays) are decided by the engine's
own compiled predicates once per distinct value, so the two cannot differ on types, dates or strings.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.model import AttributeValue
from pipeline.segments.engine import SegmentEngine, _compile, _field_pred, _window
from pipeline.segments.nodes import (
    DAY_MS,
    Aggregate,
    And,
    BirthdayWithin,
    Const,
    EventExists,
    EventSpec,
    InSegment,
    Node,
    Not,
    Or,
    attribute_paths,
    event_specs,
    walk,
)
from pipeline.segments.nodes import Sequence as SeqNode
from pipeline.segments.operators import PER_VALUE, UNKNOWN, operator_of
from pipeline.state.codec import BODY_ATTRIBUTES, BODY_EVENTS, BODY_MEMBERSHIPS, BODY_STRINGS, STATUS_CODES

Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

_REALIZED, _EXISTING = STATUS_CODES["realized"], STATUS_CODES["existing"]
_NO_STATUS = -1
_EXACT = 2.0 ** 53  # float64 holds every integer up to here exactly
_REL_TOL = 1e-9  # a float64 sum of n <= 10**6 terms is within n * 2**-53 * sum|x| of the exact one: far inside
_NP_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _window_start(within: int | None, since: int | None, now: int) -> int | None:
    """The earliest event time a window (`engine._window`'s pair) takes at `now`; None: no bound."""
    return now - within if within is not None else since


@dataclass(frozen=True)
class Tri:
    """Three-valued results per profile: `value` counts only where `known`."""

    known: Bools
    value: Bools


def _factorize(values: list[Any]) -> tuple[Ints, list[Any]]:
    """(code per value, distinct values). True and 1 (and False and 0) are equal in Python but not to the
    predicates, so when booleans and numbers share a column, booleans are keyed apart."""
    kinds = set(map(type, values))
    if bool in kinds and (int in kinds or float in kinds):
        index: dict[Any, int] = {}
        setdefault = index.setdefault
        codes = [setdefault((v,) if v.__class__ is bool else v, len(index)) for v in values]
        return np.asarray(codes, dtype=np.int64), [k[0] if k.__class__ is tuple else k for k in index]
    uniques = list(dict.fromkeys(values))
    position = {v: i for i, v in enumerate(uniques)}
    return np.fromiter(map(position.__getitem__, values), dtype=np.int64, count=len(values)), uniques


class Column:
    """One attribute (per row) or event field (per kept event) over `size` items: `values` at the positions `at`
    (every position when None), None elsewhere. Its distinct values and its numbers are derived on first use."""

    __slots__ = ("size", "at", "values", "_factors", "_numbers")

    def __init__(self, values: list[Any], size: int | None = None, at: Ints | None = None) -> None:
        self.size = len(values) if size is None else size
        self.at = at
        self.values = values
        self._factors: tuple[Ints, list[Any]] | None = None
        self._numbers: tuple[Bools, Floats, Bools] | None = None

    def factors(self) -> tuple[Ints, list[Any]]:
        """(code per item into the distinct values, the distinct values)."""
        if self._factors is None:
            if self.at is None:
                self._factors = _factorize(self.values)
            else:
                codes, uniques = _factorize([None, *self.values])  # None first: code 0 for the other positions
                full = np.zeros(self.size, dtype=np.int64)
                full[self.at] = codes[1:]
                self._factors = (full, uniques)
        return self._factors

    def numbers(self) -> tuple[Bools, Floats, Bools]:
        """Per item: whether the engine takes it as a number (int or float, not bool), its float64 value (0 if
        not), and whether float64 cannot stand in for it exactly (not finite, or beyond 2**53)."""
        if self._numbers is None:
            values = self.values
            if set(map(type, values)) <= {int, float}:  # the usual numeric field: straight to float64
                vals = np.asarray(values, dtype=np.float64) if values else np.zeros(0, dtype=np.float64)
                num = np.ones(len(values), dtype=bool)
            else:
                codes, u = _factorize(values)
                num_u = np.fromiter((type(x) is int or type(x) is float for x in u), dtype=bool, count=len(u))
                vals_u = np.asarray([float(x) if ok else 0.0 for x, ok in zip(u, num_u.tolist(), strict=True)],
                                    dtype=np.float64)
                num, vals = num_u[codes], vals_u[codes]
            odd = num & ~(np.abs(vals) < _EXACT)  # also catches inf and nan
            if self.at is not None:
                full_num, full_vals, full_odd = (np.zeros(self.size, dtype=bool), np.zeros(self.size),
                                                 np.zeros(self.size, dtype=bool))
                full_num[self.at], full_vals[self.at], full_odd[self.at] = num, vals, odd
                num, vals, odd = full_num, full_vals, full_odd
            self._numbers = (num, vals, odd)
        return self._numbers

    def matches(self, pred: Callable[[Any], bool], number: tuple[str, int | float] | None = None) -> Bools:
        """Per item: `pred` (the engine's own test of one value) on its value, called once per distinct value;
        a comparison with a number (`number`: op and literal) is made on the float64 values where they are exact."""
        if number is not None and type(number[1]) is not bool and abs(number[1]) < _EXACT:
            op, literal = number
            num, vals, odd = self.numbers()
            hits: Bools = num & _NP_OPS[op](vals, literal)
            if odd.any():
                codes, u = self.factors()
                for i in np.flatnonzero(odd).tolist():
                    hits[i] = pred(u[codes[i]])
            return hits
        codes, u = self.factors()
        hits_u = np.fromiter(map(pred, u), dtype=bool, count=len(u))
        return hits_u[codes] if len(codes) else np.zeros(0, dtype=bool)


class Columns:
    """What the audiences read of n profiles, as columns. Events are those of the audiences' event types only,
    grouped by profile (row) and in history order, so a larger global index is a later history position."""

    def __init__(self, bodies: Sequence[list[Any]], *, types: Sequence[str], audience_ids: Sequence[str],
                 attribute_paths: Sequence[str]) -> None:
        n = self.n = len(bodies)
        tcode = {t: i for i, t in enumerate(types)}
        acode = self.audience_index = {a: i for i, a in enumerate(audience_ids)}
        # Whole-range passes over the bodies' flat arrays (no per-profile Python loop): each array's items are
        # concatenated, then taken apart with one stride slice per column.
        strings, attrs, events, members = ([b[i] for b in bodies] for i in (BODY_STRINGS, BODY_ATTRIBUTES,
                                                                            BODY_EVENTS, BODY_MEMBERSHIPS))
        sizes = [np.fromiter(map(len, x), dtype=np.int64, count=n) for x in (strings, attrs, events, members)]
        s_len, a_len, e_len, m_len = sizes
        if (a_len % 4).any() or (e_len % 5).any() or (m_len % 7).any():
            raise ValueError("malformed profile body: a truncated attribute, event or membership array")
        all_rows = np.arange(n, dtype=np.int64)
        flat = list(chain.from_iterable(events))
        type_refs, deltas, fields = flat[1::5], flat[2::5], flat[4::5]
        per_row = e_len // 5
        table = list(map(tcode.get, chain.from_iterable(strings), repeat(-1)))  # per body string: type code or -1
        shift = np.cumsum(s_len) - s_len  # where each body's strings start in `table`
        row = np.repeat(all_rows, per_row)
        code = np.asarray(table, dtype=np.int64)[np.asarray(type_refs, dtype=np.int64) + np.repeat(shift, per_row)]
        # ts is delta-coded per profile, the first delta absolute: a running sum restarted at each profile
        total = np.cumsum(np.asarray(deltas, dtype=np.int64))
        starts = np.cumsum(per_row) - per_row
        before = np.where(starts > 0, total[np.maximum(starts - 1, 0)] if len(total) else 0, 0)
        ts = total - np.repeat(before, per_row)
        keep = code >= 0
        self.row: Ints = row[keep]
        self.type: Ints = code[keep]
        self.ts: Ints = ts[keep]
        self._fields = list(compress(fields, keep.tolist()))
        self._field_cols: dict[tuple[str, int | None], Column] = {}
        # rows whose (kept) history is not in time order: the engine's windows assume it is
        back = (np.diff(self.ts) < 0) & (self.row[1:] == self.row[:-1])
        self.ordered: Bools = np.ones(n, dtype=bool)
        self.ordered[self.row[1:][back]] = False
        # attributes: a sparse column per path the audiences read (rows without it hold None)
        flat = list(chain.from_iterable(attrs))
        a_paths, a_values, a_rows = flat[0::4], flat[1::4], np.repeat(all_rows, a_len // 4)
        pcode = {p: i for i, p in enumerate(attribute_paths)}
        a_code = np.fromiter(map(pcode.get, a_paths, repeat(-1)), dtype=np.int64, count=len(a_paths))
        self.attributes: dict[str, Column] = {}
        for p, i in pcode.items():
            at = np.flatnonzero(a_code == i)
            self.attributes[p] = Column(list(map(a_values.__getitem__, at.tolist())), n, a_rows[at])
        # memberships: status code and version per (audience, row); -1 where there is none
        flat = list(chain.from_iterable(members))
        m_aud, m_status, m_version, m_rows = flat[0::7], flat[2::7], flat[4::7], np.repeat(all_rows, m_len // 7)
        self.status: Ints = np.full((len(audience_ids), n), _NO_STATUS, dtype=np.int64)
        self.version: Ints = np.zeros((len(audience_ids), n), dtype=np.int64)
        aud = np.fromiter(map(acode.get, m_aud, repeat(-1)), dtype=np.int64, count=len(m_aud))
        known = aud >= 0
        self.status[aud[known], m_rows[known]] = np.asarray(m_status, dtype=np.int64)[known]
        self.version[aud[known], m_rows[known]] = np.asarray(m_version, dtype=np.int64)[known]

    def field(self, path: str, types: Sequence[int], since: int | None) -> Column:
        """One event field over the kept events, read only from the events of `types` at or after `since` (the
        events some condition reads it of; None elsewhere and where absent); built on first use."""
        col = self._field_cols.get((path, since))
        if col is None:
            wanted = np.isin(self.type, types)
            if since is not None:
                wanted &= self.ts >= since
            at = np.flatnonzero(wanted)
            events = map(self._fields.__getitem__, at.tolist())
            col = Column(list(map(dict.get, events, repeat(path))), len(self.type), at)
            self._field_cols[(path, since)] = col
        return col


class _LeafCtx:
    """What the engine's compiled attribute leaves read of a profile: its attributes and the wall time."""

    __slots__ = ("attrs", "now")

    def __init__(self, now: int) -> None:
        self.attrs: dict[str, AttributeValue] = {}
        self.now = now


class Precheck:
    """The audiences of one engine, ready to evaluate column-wise (built once per engine)."""

    def __init__(self, engine: SegmentEngine) -> None:
        self.engine = engine
        self.audience_ids = list(engine.order)
        self._acode = {a: i for i, a in enumerate(self.audience_ids)}
        self._versions = {a: engine.audiences[a].version for a in self.audience_ids}
        asts = [engine.audiences[a].ast for a in self.audience_ids]
        self.types = sorted({s.event_type for ast in asts for s in event_specs(ast)})
        self._tcode = {t: i for i, t in enumerate(self.types)}
        # per event field: the event types whose conditions read it, and the windows (within, since) they read it
        # in (a column holds only the values of those events)
        self._field_types: dict[str, list[int]] = {}
        self._field_reach: dict[str, list[tuple[int | None, int | None]]] = {}
        for ast in asts:
            for x in walk(ast):
                op = operator_of(x)
                # a follower has no window: any later event counts
                reaches = [(s, _window(s)) for s in op.specs(x)] + [(s, (None, None)) for s in op.followers(x)]
                for spec, reach in reaches:
                    paths = set(op.event_fields(x))
                    if spec.where is not None:
                        paths |= {p for y in walk(spec.where) if (p := operator_of(y).path(y)) is not None}
                    for p in paths:
                        self._field_reach.setdefault(p, []).append(reach)
                        codes = self._field_types.setdefault(p, [])
                        if self._tcode[spec.event_type] not in codes:
                            codes.append(self._tcode[spec.event_type])
        self.attribute_paths = sorted({p for ast in asts for p in attribute_paths(ast)})
        self._leaves: dict[int, Callable[[Any], Any]] = {}
        self._memos: dict[tuple[int, int], dict[Any, bool]] = {}

    def columns(self, bodies: Sequence[list[Any]], removed: Sequence[str] = ()) -> Columns:
        """The columns of raw profile bodies (`codec.profile_body`), with the memberships of the audiences and of
        `removed` ones; raises ValueError, TypeError, IndexError, KeyError or AttributeError on a malformed body
        (the caller then takes the full path for all)."""
        return Columns(bodies, types=self.types, audience_ids=[*self.audience_ids, *removed],
                       attribute_paths=self.attribute_paths)

    def may_change(self, cols: Columns, now_ms: int, audience_ids: Sequence[str] | None = None,
                   removed: Sequence[str] = ()) -> Bools:
        """Per row: whether evaluating `audience_ids` (None: all) at now_ms, after exiting the members of
        `removed`, could change the profile's memberships. False is a guarantee (decide() returns nothing);
        True means only "evaluate it fully"."""
        n = cols.n
        if audience_ids is not None and not set(audience_ids) <= self._acode.keys():
            return np.ones(n, dtype=bool)  # an unknown id: the full path reports it
        out = np.zeros(n, dtype=bool)
        for aid, tri in self.evaluate(cols, now_ms, audience_ids).items():
            st = cols.status[cols.audience_index[aid]]
            member = (st == _REALIZED) | (st == _EXISTING)
            settled = (st == _EXISTING) & (cols.version[cols.audience_index[aid]] == self._versions[aid])
            stays = tri.known & ((~member & ~tri.value) | (member & tri.value & settled))
            out |= ~stays
        for aid in removed:
            row = cols.audience_index.get(aid)
            if row is None:  # the columns were built without it
                return np.ones(n, dtype=bool)
            st = cols.status[row]
            out |= (st == _REALIZED) | (st == _EXISTING)
        return out

    def evaluate(self, cols: Columns, now_ms: int, audience_ids: Sequence[str] | None = None) -> dict[str, Tri]:
        """Each audience of `audience_ids` (None: all; unknown ids are ignored) for every row, in evaluation
        order: inSegment() reads results computed earlier here, else the stored membership, as the engine does."""
        wanted = None if audience_ids is None else set(audience_ids)
        results: dict[str, Tri] = {}
        for aid in self.audience_ids:
            if wanted is None or aid in wanted:
                results[aid] = self._eval(self.engine.audiences[aid].ast, cols, now_ms, results)
        return results

    # ---- evaluation: dispatched to each operator's columnar part ----

    def _eval(self, node: Node, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
        op = operator_of(node)
        if op.value is not None:
            if op.value.columnar is not PER_VALUE:
                return _unknown(cols.n)
            return self.attribute_leaf(node, cols, now, date_dependent=False)
        part = op.columnar
        if part is UNKNOWN or part is None:
            return _unknown(cols.n)
        try:
            return part(self, node, cols, now, results)  # type: ignore[operator]
        except _Undecided:  # a where-condition the pre-check cannot decide
            return _unknown(cols.n)

    def attribute_leaf(self, node: Node, cols: Columns, now: int, *, date_dependent: bool) -> Tri:
        """A leaf on one attribute, decided by the engine's compiled leaf once per distinct value (per day when
        its result depends on the date)."""
        op = operator_of(node)
        fn, path, ctx = self._leaf(node), op.path(node), _LeafCtx(now)
        assert path is not None

        def attr_pred(u: Any) -> bool:
            ctx.attrs = {} if u is None else {path: AttributeValue(u, "", 0)}
            return bool(fn(ctx)[0])
        day = now // DAY_MS if date_dependent else 0
        number = op.value.number(node) if op.value is not None and op.value.number is not None else None
        return Tri(np.ones(cols.n, dtype=bool), cols.attributes[path].matches(self._memo(node, day, attr_pred), number))

    def _field(self, cols: Columns, path: str, now: int) -> Column:
        """The column of an event field, over the events any condition at `now` reads it of."""
        starts = [_window_start(within, since, now) for within, since in self._field_reach[path]]
        earliest = None if None in starts else min(s for s in starts if s is not None)
        return cols.field(path, self._field_types[path], earliest)

    def _memo(self, node: Node, day: int, fn: Callable[[Any], bool]) -> Callable[[Any], bool]:
        """`fn` remembered per distinct value across calls (the same values recur in every key range); `day`
        is part of the key for a leaf whose result depends on the date."""
        key = (id(node), day)
        memo = self._memos.get(key)
        if memo is None:
            if len(self._memos) > 1_000:
                self._memos.clear()
            memo = self._memos[key] = {}

        def remembered(u: Any) -> bool:
            k = (u,) if u.__class__ is bool else u  # True == 1 to a dict, not to the predicates
            r = memo.get(k)
            if r is None:
                if len(memo) > 200_000:
                    memo.clear()
                r = memo[k] = fn(u)
            return r
        return remembered

    def _leaf(self, node: Node) -> Callable[[Any], Any]:
        fn = self._leaves.get(id(node))
        if fn is None:
            fn = self._leaves[id(node)] = _compile(node)
        return fn

    @staticmethod
    def ordered(cols: Columns, value: Bools) -> Tri:
        """Known where the profile's history is in time order (what the event parts assume)."""
        return Tri(cols.ordered.copy(), value)

    def where(self, cond: Node, cols: Columns, now: int) -> Bools:
        """Per kept event: whether its fields match a where-condition (raises _Undecided for an operator whose
        columnar part is UNKNOWN)."""
        op = operator_of(cond)
        if op.value is None:
            if op.where is None or op.where.columnar is UNKNOWN:
                raise _Undecided
            return op.where.columnar(self, cond, cols, now)  # type: ignore[operator]
        if op.value.columnar is not PER_VALUE:
            raise _Undecided
        path: str = op.path(cond)  # type: ignore[assignment]
        fp = _field_pred(cond)
        pred = self._memo(cond, 0, lambda u: bool(fp({} if u is None else {path: u})))
        number = op.value.number(cond) if op.value.number is not None else None
        return self._field(cols, path, now).matches(pred, number)

    def events(self, spec: EventSpec, cols: Columns, now: int, *, windowed: bool) -> Bools:
        """Per kept event: of the spec's type, matching its where-condition and (if `windowed`) in its window."""
        m = cols.type == self._tcode[spec.event_type]
        start = _window_start(*_window(spec), now) if windowed else None
        if start is not None:
            m &= cols.ts >= start
        if spec.where is not None:
            m &= self.where(spec.where, cols, now)
        return m

    def field_numbers(self, cols: Columns, path: str, now: int) -> tuple[Bools, Floats, Bools]:
        """`Column.numbers` of an event field read by an operator (its `event_fields` part)."""
        return self._field(cols, path, now).numbers()


class _Undecided(Exception):
    """A where-condition holds an operator whose columnar part is UNKNOWN."""


def _unknown(n: int) -> Tri:
    return Tri(np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))


# Columnar parts of the built-in operators (registered in `pipeline.segments.builtin`).

def const_tri(check: Precheck, node: Const, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    return Tri(np.ones(cols.n, dtype=bool), np.full(cols.n, node.value, dtype=bool))


def birthday_tri(check: Precheck, node: BirthdayWithin, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    return check.attribute_leaf(node, cols, now, date_dependent=True)


def in_segment_tri(check: Precheck, node: InSegment, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    done = results.get(node.audience_id)
    if done is not None:
        return done
    st = cols.status[cols.audience_index[node.audience_id]]
    return Tri(np.ones(cols.n, dtype=bool), (st == _REALIZED) | (st == _EXISTING))


def not_tri(check: Precheck, node: Not, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    inner = check._eval(node.item, cols, now, results)
    return Tri(inner.known, ~inner.value)


def bool_tri(check: Precheck, node: And | Or, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    n = cols.n
    parts = [check._eval(i, cols, now, results) for i in node.items]
    decider = isinstance(node, Or)  # the value one known child needs to decide the whole
    decided = np.zeros(n, dtype=bool)
    rest = np.ones(n, dtype=bool)
    for p in parts:
        decided |= p.known & (p.value == decider)
        rest &= p.known & (p.value != decider)
    return Tri(decided | rest, decided if decider else ~decided)


def event_exists_tri(check: Precheck, node: EventExists, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    m = check.events(node.spec, cols, now, windowed=True)
    return check.ordered(cols, np.bincount(cols.row[m], minlength=cols.n) > 0)


def const_where(check: Precheck, cond: Const, cols: Columns, now: int) -> Bools:
    return np.full(len(cols.row), cond.value, dtype=bool)


def not_where(check: Precheck, cond: Not, cols: Columns, now: int) -> Bools:
    return ~check.where(cond.item, cols, now)


def bool_where(check: Precheck, cond: And | Or, cols: Columns, now: int) -> Bools:
    masks = [check.where(i, cols, now) for i in cond.items]
    out = masks[0].copy()
    for m in masks[1:]:
        out = out | m if isinstance(cond, Or) else out & m
    return out


def aggregate_tri(check: Precheck, node: Aggregate, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    n = cols.n
    m = check.events(node.spec, cols, now, windowed=True)
    cmp, value = _NP_OPS[node.op], node.value
    big_value = abs(value) > _EXACT
    if node.func == "count":
        return check.ordered(cols, cmp(np.bincount(cols.row[m], minlength=n), value))
    assert node.field is not None
    num, numbers, odd = check.field_numbers(cols, node.field, now)
    m = m & num  # numbers as the engine takes them; other values are left out
    rows, vals = cols.row[m], numbers[m]
    count = np.bincount(rows, minlength=n)
    known = cols.ordered & (np.bincount(rows[odd[m]], minlength=n) == 0)
    if big_value:
        known &= False
    has = count > 0
    if node.func in ("sum", "avg"):
        total = np.asarray(np.bincount(rows, weights=vals, minlength=n), dtype=np.float64)
        size = np.asarray(np.bincount(rows, weights=np.abs(vals), minlength=n), dtype=np.float64)
        agg: Floats
        if node.func == "sum":
            agg, tol = total, _REL_TOL * size
        else:
            safe = np.maximum(count, 1)
            agg, tol = total / safe, _REL_TOL * size / safe
        near = has & (np.abs(agg - value) <= tol + _REL_TOL * abs(value))
        value_ok = cmp(agg, value) if node.func == "sum" else has & cmp(agg, value)
        return Tri(known & ~near, value_ok)
    # min / max: exact on float64 (every value is an integer below 2**53 or a finite float)
    agg = np.zeros(n, dtype=np.float64)
    if len(rows):
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        reduce = np.minimum if node.func == "min" else np.maximum
        agg[rows[first]] = reduce.reduceat(vals, first)
    return Tri(known, has & cmp(agg, value))


def sequence_tri(check: Precheck, node: SeqNode, cols: Columns, now: int, results: dict[str, Tri]) -> Tri:
    n = cols.n
    a_idx = np.flatnonzero(check.events(node.first, cols, now, windowed=True))
    b_idx = np.flatnonzero(check.events(node.then, cols, now, windowed=False))
    # an A is followed when the first matching B after it in history is in the same profile and within
    # the gap (histories are in time order, so no later B can be earlier than that one)
    if len(b_idx) and len(a_idx):
        nb = b_idx[np.minimum(np.searchsorted(b_idx, a_idx, side="right"), len(b_idx) - 1)]
        followed = (nb > a_idx) & (cols.row[nb] == cols.row[a_idx]) & (cols.ts[nb] <= cols.ts[a_idx] + node.gap.ms)
    else:
        followed = np.zeros(len(a_idx), dtype=bool)
    a_rows = cols.row[a_idx]
    if not node.negated:
        return check.ordered(cols, np.bincount(a_rows[followed], minlength=n) > 0)
    # an unfollowed A qualifies from A.ts + gap + 1 until A.ts + within
    within, _ = _window(node.first)
    begin = cols.ts[a_idx] + node.gap.ms + 1
    hit = ~followed & (begin <= now)
    if within is not None:
        hit &= cols.ts[a_idx] + within >= begin
    return check.ordered(cols, np.bincount(a_rows[hit], minlength=n) > 0)
