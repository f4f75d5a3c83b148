"""Compiled audience evaluation: AST -> Python closures, the SegmentEngine, decisions and eligibility."""

from __future__ import annotations

import datetime as _dt
import math
import operator
import re
from bisect import bisect_left
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from pipeline.errors import ConfigError, UnknownNameError
from pipeline.model import AttributeValue, Membership, ProfileState, Scalar, StoredEvent
from pipeline.segments.config import AudienceDef, dependency_order
from pipeline.segments.nodes import (
    DAY_MS,
    Aggregate,
    And,
    BirthdayWithin,
    Compare,
    CompareOp,
    Const,
    Contains,
    DateValue,
    EventExists,
    EventSpec,
    Exists,
    InList,
    InSegment,
    Node,
    Not,
    Or,
    Since,
    StartsWith,
    Within,
    attribute_paths,
    event_specs,
    segment_refs,
    to_text,
    walk,
)
from pipeline.segments.nodes import (
    Sequence as SeqNode,
)
from pipeline.segments.operators import operator_of

_EPOCH = _dt.date(1970, 1, 1).toordinal()


class Decision(NamedTuple):
    """The outcome of evaluating one audience for one profile at one wall time (a tuple: every event makes
    one per affected audience, and a frozen dataclass costs several times more to build)."""

    audience_id: str
    qualified: bool
    label: str  # the rule that decided (query text of the deciding node)
    cause_event_id: str | None  # the event that made it qualify, when one did
    next_check_ms: int | None  # earliest wall time the result could change without new data; None if never

    @property
    def reason(self) -> str:
        """Which rule matched or failed, and the event id when one decided it. Built on demand: only a
        decision that changes a membership needs it, and a batch run makes millions that do not."""
        if not self.qualified:
            return f"not qualified: {self.label}"
        return f"qualified: {self.label}" + (f" (event {self.cause_event_id})" if self.cause_event_id else "")


@dataclass(frozen=True)
class Explanation:
    """Which evaluation modes an audience is eligible for, and why."""

    audience_id: str
    streaming: bool
    batch: bool
    edge: bool
    reason: str


# ---- evaluation context ----


class _TypeIndex:
    """The events of one type: parallel lists of events, timestamps (for bisect) and history positions."""

    __slots__ = ("events", "ts", "pos")

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.ts: list[int] = []
        self.pos: list[int] = []


_NO_EVENTS = _TypeIndex()


class _Ctx:
    """Per-evaluate() state: the profile's data, wall time, and results computed so far in this call."""

    __slots__ = ("attrs", "events", "now", "seg", "seg_next", "members", "index")

    def __init__(self, profile: ProfileState, now: int) -> None:
        self.attrs: dict[str, AttributeValue] = profile.attributes
        self.events: list[StoredEvent] = profile.events
        self.now = now
        self.seg: dict[str, bool] = {}
        self.seg_next: dict[str, int | None] = {}
        self.members: dict[str, Membership] = profile.memberships
        # Events by type: built on first use (`(ctx.index or ctx.build_index()).get(t, _NO_EVENTS)`, inline in
        # the closures: a method call per lookup costs more) and shared by every audience of the call.
        self.index: dict[str, _TypeIndex] | None = None

    def build_index(self) -> dict[str, _TypeIndex]:
        idx: dict[str, _TypeIndex] = {}
        for i, e in enumerate(self.events):
            t = idx.get(e.event_type)
            if t is None:
                t = idx[e.event_type] = _TypeIndex()
            t.events.append(e)
            t.ts.append(e.ts_ms)
            t.pos.append(i)
        self.index = idx
        return idx


# (value, next_check_ms, cause_event_id, label of the deciding rule)
_Res = tuple[bool, int | None, str | None, str]
_Fn = Callable[[_Ctx], _Res]
_Pred = Callable[[Scalar], bool]
_FieldPred = Callable[[dict[str, Scalar]], bool]
Evaluator = _Fn  # what an operator's compile part returns
FieldPred = _FieldPred  # what an operator's where-condition compile part returns

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}

_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_date_cache: dict[str, int | None] = {}


def date_ordinal(s: str) -> int | None:
    """Day ordinal of a string whose first 10 characters are YYYY-MM-DD, else None (cached)."""
    try:
        return _date_cache[s]
    except KeyError:
        pass
    head = s[:10]
    d: int | None = None
    if _DATE_RE.fullmatch(head):
        try:
            d = _dt.date.fromisoformat(head).toordinal()
        except ValueError:
            d = None
    if len(_date_cache) > 100_000:  # bound memory; dates repeat a lot so a reset is cheap
        _date_cache.clear()
    _date_cache[s] = d
    return d


def compare_pred(n: Compare) -> _Pred:
    """A comparison of one scalar with the literal (missing/other-typed values never match)."""
    op, v = _OPS[n.op], n.value
    if isinstance(v, DateValue):
        o = v.ordinal

        def p_date(x: Scalar) -> bool:
            if type(x) is not str:
                return False
            d = date_ordinal(x)
            return d is not None and op(d, o)
        return p_date
    if isinstance(v, bool):
        return lambda x: type(x) is bool and op(x, v)
    if isinstance(v, int | float):
        return lambda x: (type(x) is int or type(x) is float) and op(x, v)
    if n.op == "=":
        return lambda x: x == v  # only a str equals a str: no type check needed
    return lambda x: type(x) is str and op(x, v)


def compare_equals(n: Compare) -> str | None:
    """The string of the common `tier = "gold"`, which the closures inline."""
    return n.value if n.op == "=" and type(n.value) is str else None


def in_list_pred(n: InList) -> _Pred:
    strs = frozenset(v for v in n.values if type(v) is str)
    nums = frozenset(v for v in n.values if type(v) is int or type(v) is float)
    bools = frozenset(v for v in n.values if type(v) is bool)
    dates = frozenset(v.ordinal for v in n.values if isinstance(v, DateValue))

    def p_in(x: Scalar) -> bool:
        t = type(x)
        if t is str:
            if x in strs:
                return True
            if dates:
                d = date_ordinal(x)  # type: ignore[arg-type]
                return d is not None and d in dates
            return False
        if t is bool:
            return x in bools
        if t is int or t is float:
            return x in nums
        return False
    return p_in


def exists_pred(_: Exists) -> _Pred:
    return lambda x: x is not None


def starts_with_pred(n: StartsWith) -> _Pred:
    pre = n.prefix
    return lambda x: type(x) is str and x.startswith(pre)


def contains_pred(n: Contains) -> _Pred:
    needle = n.needle
    return lambda x: type(x) is str and needle in x


def _value_pred(n: Node) -> _Pred:
    """A predicate on one scalar for a value test (an attribute or an event field)."""
    test = operator_of(n).value
    if test is None:
        raise TypeError(f"not a value condition: {n!r}")
    return test.predicate(n)


def _field_pred(n: Node) -> _FieldPred:
    """Compile a where-condition over an event's fields."""
    op = operator_of(n)
    if op.value is not None:
        fpath: str = op.path(n)  # type: ignore[assignment]  # registration guarantees a value test's path
        fv = op.value.equals(n) if op.value.equals is not None else None
        if fv is not None:
            return lambda f: f.get(fpath) == fv  # the common `category = "shoes"`, inlined
        p = op.value.predicate(n)
        return lambda f: p(f.get(fpath))
    if op.where is None:
        raise TypeError(f"not allowed in a where-condition: {n!r}")
    return op.where.compile(n)


def const_field(n: Const) -> _FieldPred:
    c = n.value
    return lambda f: c


def not_field(n: Not) -> _FieldPred:
    inner = _field_pred(n.item)
    return lambda f: not inner(f)


def and_field(n: And) -> _FieldPred:
    ps = tuple(_field_pred(i) for i in n.items)
    return lambda f: all(p(f) for p in ps)


def or_field(n: Or) -> _FieldPred:
    ps = tuple(_field_pred(i) for i in n.items)
    return lambda f: any(p(f) for p in ps)


def _filter(where: Node | None) -> Callable[[list[StoredEvent]], list[StoredEvent]]:
    """The events of a window that match a where-condition, as one call per window (not one per event)."""
    if where is None:
        return lambda evs: evs
    op = operator_of(where)
    fv = op.value.equals(where) if op.value is not None and op.value.equals is not None else None
    if fv is not None:
        fpath: str = op.path(where)  # type: ignore[assignment]  # a value test's path is guaranteed
        return lambda evs: [e for e in evs if e.fields.get(fpath) == fv]  # `category = "shoes"`, inlined
    pred = _field_pred(where)
    return lambda evs: [e for e in evs if pred(e.fields)]


def _window(spec: EventSpec) -> tuple[int | None, int | None]:
    """(within ms, since ms) of an event spec."""
    w = spec.window
    if isinstance(w, Within):
        return w.duration.ms, None
    if isinstance(w, Since):
        return None, w.ms
    return None, None


def _start(ix: _TypeIndex, now: int, within: int | None, since: int | None) -> int:
    """First index of ix inside the window (events are sorted by ts)."""
    if within is not None:
        return bisect_left(ix.ts, now - within)
    if since is not None:
        return bisect_left(ix.ts, since)
    return 0


def _follower(apos: int, ats: int, ib: _TypeIndex, where: _FieldPred | None, gap: int) -> StoredEvent | None:
    """The first event of ib after history position apos with ts <= ats + gap that matches where."""
    ts, evs = ib.ts, ib.events
    j, n, lim = bisect_left(ts, ats), len(ts), ats + gap
    while j < n and ts[j] <= lim:
        if ib.pos[j] > apos and (where is None or where(evs[j].fields)):
            return evs[j]
        j += 1
    return None


def _birthday(today: _dt.date, month: int, day: int) -> _dt.date:
    """The next anniversary on or after today (29 Feb falls on 28 Feb in non-leap years)."""
    for year in (today.year, today.year + 1):
        try:
            d = _dt.date(year, month, day)
        except ValueError:
            d = _dt.date(year, 2, 28)
        if d >= today:
            return d
    raise AssertionError("unreachable")  # pragma: no cover


def _agg_value(func: str, vals: Sequence[float]) -> float | None:
    if func == "sum":
        return math.fsum(vals)  # exactly rounded, so order never changes the result
    if not vals:
        return None
    if func == "avg":
        return math.fsum(vals) / len(vals)
    return min(vals) if func == "min" else max(vals)


def _compile(n: Node) -> _Fn:
    """Compile a query node to a closure ctx -> (value, next_check_ms, cause_event_id, label), through its
    operator's compile part (dispatched here, once per audience: never per evaluation)."""
    label = to_text(n)
    op = operator_of(n)
    if op.value is None:
        return op.compile(n, label)  # type: ignore[misc]  # registration guarantees the part
    T: _Res = (True, None, None, label)
    F: _Res = (False, None, None, label)
    path: str = op.path(n)  # type: ignore[assignment]  # registration guarantees a value test's path
    eq_value = op.value.equals(n) if op.value.equals is not None else None
    if eq_value is not None:
        def attr_eq(ctx: _Ctx) -> _Res:  # the common `tier = "gold"`, without a predicate call
            av = ctx.attrs.get(path)
            return T if av is not None and av.value == eq_value else F
        return attr_eq
    p = op.value.predicate(n)

    def attr(ctx: _Ctx) -> _Res:
        av = ctx.attrs.get(path)
        return T if p(av.value if av is not None else None) else F
    return attr


# Compile parts of the built-in operators (registered in `pipeline.segments.builtin`).

def compile_const(n: Const, label: str) -> _Fn:
    r: _Res = (n.value, None, None, label)
    return lambda ctx: r


def compile_birthday(n: BirthdayWithin, label: str) -> _Fn:
    bpath, days = n.path, n.days
    F: _Res = (False, None, None, label)

    def birthday(ctx: _Ctx) -> _Res:
        av = ctx.attrs.get(bpath)
        x = av.value if av is not None else None
        if type(x) is not str or date_ordinal(x) is None:
            return F
        born = _dt.date.fromisoformat(x[:10])
        today_n = ctx.now // DAY_MS
        nb = _birthday(_dt.date.fromordinal(_EPOCH + today_n), born.month, born.day)
        until = nb.toordinal() - _EPOCH - today_n
        if until < days:  # true until the day after the birthday starts
            return (True, (nb.toordinal() + 1 - _EPOCH) * DAY_MS, None, label)
        return (False, (nb.toordinal() - (days - 1) - _EPOCH) * DAY_MS, None, label)
    return birthday


def compile_in_segment(n: InSegment, label: str) -> _Fn:
    sid = n.audience_id
    T: _Res = (True, None, None, label)
    F: _Res = (False, None, None, label)

    def in_segment(ctx: _Ctx) -> _Res:
        r = ctx.seg.get(sid)
        if r is not None:  # computed earlier in this call: it changes when that audience does
            return (r, ctx.seg_next.get(sid), None, label)
        m = ctx.members.get(sid)
        return T if m is not None and m.status != "exited" else F
    return in_segment


def compile_not(n: Not, label: str) -> _Fn:
    inner = _compile(n.item)

    def not_(ctx: _Ctx) -> _Res:
        v, nxt, _, _ = inner(ctx)
        return (not v, nxt, None, label)
    return not_


def compile_event_exists(n: EventExists, label: str) -> _Fn:
    return _compile_exists(n.spec, label)


def compile_bool(n: And | Or, label: str) -> _Fn:
    fns = tuple(_compile(i) for i in n.items)
    # For `and`, a false child decides (short-circuit) and, while it stays false, so does the whole;
    # `or` is the mirror image. When no child decides, the result can change when any child does.
    decider = isinstance(n, Or)
    if len(fns) == 2:
        first, second = fns

        def bool_pair(ctx: _Ctx) -> _Res:  # most `and`/`or` have two operands: no loop
            a = first(ctx)
            if a[0] is decider:
                return a
            b = second(ctx)
            if b[0] is decider:
                return b
            na, nb = a[1], b[1]
            nxt = na if nb is None or (na is not None and na < nb) else nb
            return (not decider, nxt, a[2] if a[2] is not None else b[2], label)
        return bool_pair

    def bool_op(ctx: _Ctx) -> _Res:
        nxt: int | None = None
        cause: str | None = None
        for fn in fns:
            v, c_next, c_cause, c_label = fn(ctx)
            if v is decider:
                return (v, c_next, c_cause, c_label)
            if c_next is not None and (nxt is None or c_next < nxt):
                nxt = c_next
            if cause is None:
                cause = c_cause
        return (not decider, nxt, cause, label)
    return bool_op


def _compile_exists(spec: EventSpec, label: str) -> _Fn:
    etype, within, since = spec.event_type, *_window(spec)
    where = _field_pred(spec.where) if spec.where is not None else None
    F: _Res = (False, None, None, label)

    def exists(ctx: _Ctx) -> _Res:
        ix = (ctx.index or ctx.build_index()).get(etype, _NO_EVENTS)
        evs = ix.events
        lo = _start(ix, ctx.now, within, since)
        for i in range(len(evs) - 1, lo - 1, -1):  # latest first: it is the last to leave the window
            e = evs[i]
            if where is None or where(e.fields):
                return (True, e.ts_ms + within + 1 if within is not None else None, e.event_id, label)
        return F
    return exists


def _count_change(matches: Sequence[StoredEvent], cur: bool, op: CompareOp, value: float,
                  cmp: Callable[[Any, Any], bool]) -> int | None:
    """Index k of the first in-window match whose leaving flips `count op value` (matches ts-ascending)."""
    c = len(matches)
    if op in ("=", "!="):
        for k in range(c):
            if k + 1 < c and matches[k + 1].ts_ms == matches[k].ts_ms:
                continue
            if cmp(c - k - 1, value) != cur:
                return k
        return None
    # Monotone in the remaining count, which only falls: `>`/`>=` can only turn false, `<`/`<=` only true.
    if cur is (op in ("<", "<=")):
        return None
    # The first k whose remaining count r = c - k - 1 flips it: r < value for >= and <, r <= value for > and <=.
    k = c - math.ceil(value) if op in (">=", "<") else c - 1 - math.floor(value)
    return max(k, 0) if k < c else None


def compile_aggregate(n: Aggregate, label: str) -> _Fn:
    etype, within, since = n.spec.event_type, *_window(n.spec)
    where = _field_pred(n.spec.where) if n.spec.where is not None else None
    cmp, value, op, func, fld = _OPS[n.op], n.value, n.op, n.func, n.field

    # With no event of the type at all, the result is that of an empty window, and stays so until one arrives.
    empty_value = 0 if func == "count" else _agg_value(func, [])
    empty: _Res = (empty_value is not None and cmp(empty_value, value), None, None, label)

    if func == "count":
        matching = _filter(n.spec.where)

        def count(ctx: _Ctx) -> _Res:
            ix = (ctx.index or ctx.build_index()).get(etype, _NO_EVENTS)
            ts = ix.ts
            if not ts:
                return empty
            if within is not None:
                matches = matching(ix.events[bisect_left(ts, ctx.now - within):])
            else:
                matches = matching(ix.events[_start(ix, ctx.now, within, since):])
            cur = cmp(len(matches), value)
            if not matches:
                return (cur, None, None, label)
            nxt = None
            if within is not None:
                k = _count_change(matches, cur, op, value, cmp)
                if k is not None:
                    nxt = matches[k].ts_ms + within + 1
            return (cur, nxt, matches[-1].event_id if cur else None, label)
        return count

    assert fld is not None

    def aggregate(ctx: _Ctx) -> _Res:
        ix = (ctx.index or ctx.build_index()).get(etype, _NO_EVENTS)
        if not ix.ts:
            return empty
        lo = _start(ix, ctx.now, within, since)
        stamps: list[int] = []
        vals: list[float] = []
        cause = None
        for e in ix.events[lo:]:
            if where is None or where(e.fields):
                x = e.fields.get(fld)
                if type(x) is int or type(x) is float:
                    stamps.append(e.ts_ms)
                    vals.append(x)
                    cause = e.event_id
        a = _agg_value(func, vals)
        cur = a is not None and cmp(a, value)
        nxt = None
        if within is not None:
            m = len(vals)
            for k in range(m):  # events leave the window oldest first: recompute on each suffix
                if k + 1 < m and stamps[k + 1] == stamps[k]:
                    continue
                b = _agg_value(func, vals[k + 1:])
                if (b is not None and cmp(b, value)) != cur:
                    nxt = stamps[k] + within + 1
                    break
        return (cur, nxt, cause if cur else None, label)
    return aggregate


def compile_sequence(n: SeqNode, label: str) -> _Fn:
    ta, within, since = n.first.event_type, *_window(n.first)
    tb, gap = n.then.event_type, n.gap.ms
    wa = _field_pred(n.first.where) if n.first.where is not None else None
    wb = _field_pred(n.then.where) if n.then.where is not None else None
    F: _Res = (False, None, None, label)

    if not n.negated:
        def followed(ctx: _Ctx) -> _Res:
            idx = ctx.index or ctx.build_index()
            ia, ib = idx.get(ta, _NO_EVENTS), idx.get(tb, _NO_EVENTS)
            if not ib.events:
                return F
            lo = _start(ia, ctx.now, within, since)
            for i in range(len(ia.events) - 1, lo - 1, -1):  # latest first (last to leave the window)
                a = ia.events[i]
                if wa is not None and not wa(a.fields):
                    continue
                b = _follower(ia.pos[i], a.ts_ms, ib, wb, gap)
                if b is not None:
                    return (True, a.ts_ms + within + 1 if within is not None else None, b.event_id, label)
            return F
        return followed

    def not_followed(ctx: _Ctx) -> _Res:
        # Each unfollowed A qualifies during [A.ts + gap + 1, A.ts + within]; the result can only
        # change at an edge of one of these intervals.
        idx = ctx.index or ctx.build_index()
        ia = idx.get(ta, _NO_EVENTS)
        if not ia.ts:
            return F
        ib, now = idx.get(tb, _NO_EVENTS), ctx.now
        lo = _start(ia, now, within, since)
        hit: str | None = None
        nxt: int | None = None
        for i in range(lo, len(ia.events)):
            a = ia.events[i]
            if wa is not None and not wa(a.fields):
                continue
            begin = a.ts_ms + gap + 1
            end = a.ts_ms + within if within is not None else None
            if end is not None and end < begin:
                continue
            if _follower(ia.pos[i], a.ts_ms, ib, wb, gap) is not None:
                continue
            if begin <= now:
                hit = a.event_id
            elif nxt is None or begin < nxt:
                nxt = begin
            if end is not None and end + 1 > now and (nxt is None or end + 1 < nxt):
                nxt = end + 1
        if hit is not None:
            return (True, nxt, hit, label)
        return (False, nxt, None, label)
    return not_followed


# ---- the engine ----


class Affected(list[str]):
    """Audience ids returned by `SegmentEngine.affected`: known ids, in evaluation order, so `evaluate`
    need not check and sort them again (it runs on every event)."""


class SegmentEngine:
    """Evaluates a set of audiences against profiles; audiences are compiled once at construction."""

    def __init__(self, audiences: Sequence[AudienceDef], *, history_retention_ms: int = 90 * 86400_000,
                 carried_attributes: Sequence[str] = ()) -> None:
        by_id: dict[str, AudienceDef] = {}
        for a in audiences:
            if a.id in by_id:
                raise ConfigError(f"duplicate audience id {a.id!r}", file=a.file, line=a.line)
            by_id[a.id] = a
        self.audiences: Mapping[str, AudienceDef] = MappingProxyType(by_id)
        self.history_retention_ms = history_retention_ms
        # Carried by every membership message besides its audience's own attributes: those the destinations'
        # consent rules read (pipeline.consent), so each destination can check its rule on every message.
        # Set again when the destinations file changes.
        self.carried_attributes: tuple[str, ...] = tuple(carried_attributes)
        self._order = dependency_order(list(audiences))
        self._rank = {aid: i for i, aid in enumerate(self._order)}
        self._versions = {a.id: a.version for a in audiences}
        self._fns: dict[str, _Fn] = {a.id: _compile(a.ast) for a in audiences}
        self._by_event: dict[str, set[str]] = {}
        self._by_attr: dict[str, set[str]] = {}
        self._dependents: dict[str, set[str]] = {}
        self._affected_memo: dict[tuple[frozenset[str], frozenset[str], frozenset[str]], tuple[str, ...]] = {}
        for a in audiences:
            for spec in event_specs(a.ast):
                self._by_event.setdefault(spec.event_type, set()).add(a.id)
            for path in attribute_paths(a.ast):
                self._by_attr.setdefault(path, set()).add(a.id)
            for ref in segment_refs(a.ast):
                self._dependents.setdefault(ref.audience_id, set()).add(a.id)

    @property
    def order(self) -> list[str]:
        """All audience ids in evaluation order (dependencies first)."""
        return list(self._order)

    def _check(self, audience_ids: Collection[str]) -> None:
        for aid in audience_ids:
            if aid not in self.audiences:
                raise UnknownNameError("audience", aid, set(self.audiences))

    def affected(self, *, event_types: Collection[str] = (), attributes: Collection[str] = (),
                 segments: Collection[str] = (), all_: bool = False) -> Affected:
        """Audience ids a change can affect, in evaluation order (dependencies first).

        Indexed by the event types and attribute paths each audience reads, plus transitively every
        audience that reads inSegment() of an affected one (or of a changed segment in `segments`).
        """
        if all_:
            return Affected(self._order)
        # Every event asks this; the combinations of event types and attributes an event changes are few.
        memo_key = (frozenset(event_types), frozenset(attributes), frozenset(segments))
        memo = self._affected_memo.get(memo_key)
        if memo is None:
            if len(self._affected_memo) >= 4096:
                self._affected_memo.clear()
            memo = self._affected_memo[memo_key] = tuple(self._affected(event_types, attributes, segments))
        return Affected(memo)

    def _affected(self, event_types: Collection[str], attributes: Collection[str],
                  segments: Collection[str]) -> list[str]:
        hit: set[str] = set()
        for t in event_types:
            hit |= self._by_event.get(t, set())
        for p in attributes:
            hit |= self._by_attr.get(p, set())
        todo = list(hit) + list(segments)
        while todo:
            for dep in self._dependents.get(todo.pop(), ()):
                if dep not in hit:
                    hit.add(dep)
                    todo.append(dep)
        return sorted(hit, key=self._rank.__getitem__)

    def _ids(self, audience_ids: Sequence[str] | None) -> Sequence[str]:
        """The audiences to evaluate, in evaluation order (None: all)."""
        if audience_ids is None:
            return self._order
        if isinstance(audience_ids, Affected):  # from affected(): known ids, already in evaluation order
            return audience_ids
        self._check(audience_ids)
        return sorted(set(audience_ids), key=self._rank.__getitem__)

    def evaluate(self, profile: ProfileState, now_ms: int, audience_ids: Sequence[str] | None = None,
                 *, kind: str = "streaming") -> list[Decision]:
        """Evaluate audiences (default: all) for one profile at wall time now_ms, dependencies first.

        inSegment() sees results computed earlier in this call, else profile.memberships (not exited).
        `kind` is accepted for symmetry with apply_decisions; evaluation does not depend on it.
        """
        ids = self._ids(audience_ids)
        ctx = _Ctx(profile, now_ms)
        fns, seg, seg_next = self._fns, ctx.seg, ctx.seg_next
        out: list[Decision] = []
        new = tuple.__new__  # Decision's generated __new__ is a Python function; this is the same tuple
        for aid in ids:
            v, nxt, cause, label = fns[aid](ctx)
            seg[aid] = v
            seg_next[aid] = nxt
            out.append(new(Decision, (aid, v, label, cause if v else None, nxt)))
        return out

    def decide(self, profile: ProfileState, now_ms: int,
               audience_ids: Sequence[str] | None = None) -> tuple[list[Decision], int | None]:
        """`evaluate`, keeping only the decisions that change the profile's memberships (a new member, one
        that leaves, a 'realized' one becoming 'existing', a new audience version), plus the earliest
        next_check_ms of all of them: what `apply_decisions` and the deadline need. Most evaluations change
        nothing (every audience of a batch run, most of an event's), and skipping their decisions here
        saves building and re-reading them."""
        ids = self._ids(audience_ids)
        ctx = _Ctx(profile, now_ms)
        fns, seg, seg_next, versions = self._fns, ctx.seg, ctx.seg_next, self._versions
        members = profile.memberships
        out: list[Decision] = []
        new = tuple.__new__
        first: int | None = None
        for aid in ids:
            v, nxt, cause, label = fns[aid](ctx)
            seg[aid] = v
            seg_next[aid] = nxt
            if nxt is not None and (first is None or nxt < first):
                first = nxt
            m = members.get(aid)
            if m is None or m.status == "exited":
                if not v:
                    continue
            elif v and m.status == "existing" and m.version == versions[aid]:
                continue
            out.append(new(Decision, (aid, v, label, cause if v else None, nxt)))
        return out, first

    def next_deadline(self, decisions: Sequence[Decision]) -> int | None:
        """The earliest next_check_ms of the decisions, or None."""
        times = [d.next_check_ms for d in decisions if d.next_check_ms is not None]
        return min(times) if times else None

    def explain(self, audience_id: str | None = None) -> list[Explanation]:
        """Streaming / batch / edge eligibility of one audience (or all, in evaluation order)."""
        if audience_id is not None:
            self._check([audience_id])
            ids = [audience_id]
        else:
            ids = list(self._order)
        return [self._explain_one(aid) for aid in ids]

    def _explain_one(self, aid: str) -> Explanation:
        ast = self.audiences[aid].ast
        retention = self.history_retention_ms
        ret_text = _fmt_ms(retention)
        problems: list[str] = []
        specs = event_specs(ast)
        for x in walk(ast):
            op = operator_of(x)
            for spec in op.specs(x):
                w = spec.window
                if isinstance(w, Within):
                    if w.duration.ms > retention:
                        problems.append(f"window {w.duration.text} of event {spec.event_type} exceeds "
                                        f"event-history retention {ret_text}")
                elif isinstance(w, Since):
                    problems.append(f"event {spec.event_type} since {w.date.text} has a fixed start that the "
                                    f"{ret_text} event history cannot guarantee")
                else:
                    problems.append(f"event {spec.event_type} has no window (all time) but event history "
                                    f"keeps only {ret_text}")
            for gap in op.gaps(x):
                if gap.ms > retention:
                    problems.append(f"gap {gap.text} exceeds event-history retention {ret_text}")
        streaming = not problems
        edge = not specs
        parts: list[str] = []
        if streaming:
            parts.append("streaming: " + ("every event window fits in the " + ret_text + " event history"
                                          if specs else "reads only profile attributes/segments"))
        else:
            parts.append("batch only: " + "; ".join(problems))
        if edge:
            parts.append("edge: only profile attributes and inSegment(), evaluable on request")
        else:
            types = sorted({s.event_type for s in specs})
            parts.append(f"not edge: reads event windows ({', '.join(types)})")
        batch_only_deps = sorted(r.audience_id for r in segment_refs(ast)
                                 if not self._explain_one(r.audience_id).streaming)
        if batch_only_deps and streaming:
            parts.append(f"uses the last batch membership of {', '.join(batch_only_deps)}")
        return Explanation(aid, streaming, True, edge, "; ".join(parts))


def _fmt_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
