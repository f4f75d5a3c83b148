"""Typed AST of the audience query language (frozen dataclasses) and a printer back to query text."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Literal

CompareOp = Literal["=", "!=", "<", "<=", ">", ">="]
AggFunc = Literal["count", "sum", "avg", "min", "max"]

UNIT_MS: dict[str, int] = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
DAY_MS = UNIT_MS["d"]


@dataclass(frozen=True)
class DateValue:
    """An ISO calendar date literal; compared by day ordinal (`date.toordinal()`)."""

    ordinal: int

    @property
    def text(self) -> str:
        return _dt.date.fromordinal(self.ordinal).isoformat()


# A literal on the right of a comparison. Booleans compare only with = and != (checked by the parser).
Value = bool | int | float | str | DateValue


@dataclass(frozen=True)
class Duration:
    """A relative length written like `30m`; `text` keeps the original spelling for messages."""

    ms: int
    text: str


@dataclass(frozen=True)
class Within:
    """Window `within D`: events with ts >= now - D (no upper bound: slightly-future events count)."""

    duration: Duration


@dataclass(frozen=True)
class Since:
    """Window `since "YYYY-MM-DD"`: events with ts >= that UTC midnight."""

    date: DateValue

    @property
    def ms(self) -> int:
        return (self.date.ordinal - _EPOCH_ORDINAL) * DAY_MS


Window = Within | Since | None

_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()


# ---- conditions (on profile attributes at top level, on event fields inside `where`) ----


@dataclass(frozen=True)
class Const:
    """`true` / `false`."""

    value: bool


@dataclass(frozen=True)
class Compare:
    """`path op value`."""

    path: str
    op: CompareOp
    value: Value


@dataclass(frozen=True)
class InList:
    """`path in [v1, v2]`."""

    path: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Exists:
    """`path exists`: the value is present and not null."""

    path: str


@dataclass(frozen=True)
class StartsWith:
    """`startsWith(path, "x")` on string values."""

    path: str
    prefix: str


@dataclass(frozen=True)
class Contains:
    """`contains(path, "x")` on string values (substring)."""

    path: str
    needle: str


@dataclass(frozen=True)
class BirthdayWithin:
    """`birthdayWithin(path, Nd)`: the next (month, day) anniversary is 0..N-1 days from today (UTC)."""

    path: str
    days: int


@dataclass(frozen=True)
class InSegment:
    """`inSegment("id")`: the profile is (or was just computed to be) in that audience."""

    audience_id: str
    pos: int = field(default=-1, compare=False)  # char offset in the query, for error messages


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


# ---- events ----


@dataclass(frozen=True)
class EventSpec:
    """`event TYPE [where COND] [WINDOW]`; COND reads the event's flattened fields."""

    event_type: str
    where: Node | None = None
    window: Window = None


@dataclass(frozen=True)
class EventExists:
    """At least one matching event in the window."""

    spec: EventSpec


@dataclass(frozen=True)
class Aggregate:
    """`count(SPEC) op N` or `sum|avg|min|max(FIELD of SPEC) op N`."""

    func: AggFunc
    field: str | None  # None for count
    spec: EventSpec
    op: CompareOp
    value: int | float


@dataclass(frozen=True)
class Sequence:
    """`SPEC [not] followed by TYPE [where COND] within GAP`.

    `then` has no window: a follower is any later event (after it in history order) within `gap`.
    Negated (absence): qualifies only once the gap has fully passed with no follower.
    """

    first: EventSpec
    then: EventSpec
    gap: Duration
    negated: bool


Node = (Const | Compare | InList | Exists | StartsWith | Contains | BirthdayWithin | InSegment | And | Or | Not
        | EventExists | Aggregate | Sequence)

FIELD_NODES = (Const, Compare, InList, Exists, StartsWith, Contains, And, Or, Not)


# ---- printer ----


def value_text(v: Value) -> str:
    """Query text of a literal."""
    if isinstance(v, DateValue):
        return f'date("{v.text}")'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def window_text(w: Window) -> str:
    if isinstance(w, Within):
        return f" within {w.duration.text}"
    if isinstance(w, Since):
        return f' since "{w.date.text}"'
    return ""


def spec_text(s: EventSpec, *, keyword: bool = True) -> str:
    out = f"event {s.event_type}" if keyword else s.event_type
    if s.where is not None:
        out += f" where ({to_text(s.where)})"
    return out + window_text(s.window)


def to_text(n: Node) -> str:
    """Print a node back to query text that parses to an equal node."""
    if isinstance(n, Const):
        return "true" if n.value else "false"
    if isinstance(n, Compare):
        return f"{n.path} {n.op} {value_text(n.value)}"
    if isinstance(n, InList):
        return f"{n.path} in [{', '.join(value_text(v) for v in n.values)}]"
    if isinstance(n, Exists):
        return f"{n.path} exists"
    if isinstance(n, StartsWith):
        return f"startsWith({n.path}, {value_text(n.prefix)})"
    if isinstance(n, Contains):
        return f"contains({n.path}, {value_text(n.needle)})"
    if isinstance(n, BirthdayWithin):
        return f"birthdayWithin({n.path}, {n.days}d)"
    if isinstance(n, InSegment):
        return f"inSegment({value_text(n.audience_id)})"
    if isinstance(n, And | Or):
        sep = " and " if isinstance(n, And) else " or "
        return sep.join(_grouped(i) for i in n.items)
    if isinstance(n, Not):
        return f"not ({to_text(n.item)})"
    if isinstance(n, EventExists):
        return spec_text(n.spec)
    if isinstance(n, Aggregate):
        inner = spec_text(n.spec) if n.field is None else f"{n.field} of {spec_text(n.spec)}"
        return f"{n.func}({inner}) {n.op} {value_text(n.value)}"
    if isinstance(n, Sequence):
        kw = "not followed by" if n.negated else "followed by"
        return f"{spec_text(n.first)} {kw} {spec_text(n.then, keyword=False)} within {n.gap.text}"
    raise TypeError(f"not a query node: {n!r}")


def _grouped(n: Node) -> str:
    # Nested boolean groups and event expressions (whose where-condition is greedy) get parentheses.
    if isinstance(n, And | Or | EventExists | Sequence):
        return f"({to_text(n)})"
    return to_text(n)


def walk(n: Node) -> list[Node]:
    """Every node of the tree (pre-order), including where-conditions."""
    out: list[Node] = [n]
    if isinstance(n, And | Or):
        for i in n.items:
            out.extend(walk(i))
    elif isinstance(n, Not):
        out.extend(walk(n.item))
    elif isinstance(n, EventExists | Aggregate):
        if n.spec.where is not None:
            out.extend(walk(n.spec.where))
    elif isinstance(n, Sequence):
        for s in (n.first, n.then):
            if s.where is not None:
                out.extend(walk(s.where))
    return out


def event_specs(n: Node) -> list[EventSpec]:
    """The event specs a query reads (top level only: where-conditions cannot contain events)."""
    out: list[EventSpec] = []
    for x in walk(n):
        if isinstance(x, EventExists | Aggregate):
            out.append(x.spec)
        elif isinstance(x, Sequence):
            out.extend((x.first, x.then))
    return out


def attribute_paths(n: Node) -> set[str]:
    """Profile attribute paths a query reads (paths inside where-conditions are event fields)."""
    out: set[str] = set()

    def visit(x: Node) -> None:
        if isinstance(x, Compare | InList | Exists | StartsWith | Contains | BirthdayWithin):
            out.add(x.path)
        elif isinstance(x, And | Or):
            for i in x.items:
                visit(i)
        elif isinstance(x, Not):
            visit(x.item)

    visit(n)
    return out


def segment_refs(n: Node) -> list[InSegment]:
    """Every inSegment() in the query."""
    return [x for x in walk(n) if isinstance(x, InSegment)]
