"""Typed AST of the audience query language (frozen dataclasses) and a printer back to query text."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Literal

from pipeline.segments.operators import operator_of

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
    return operator_of(n).text(n)  # type: ignore[misc]  # registration guarantees the part


def grouped(n: Node) -> str:
    """A node's text inside and / or: nested boolean groups and event expressions (whose where-condition is
    greedy) get parentheses."""
    return f"({to_text(n)})" if operator_of(n).grouped else to_text(n)


# Text parts of the built-in operators (registered in `pipeline.segments.builtin`).

def const_text(n: Const) -> str:
    return "true" if n.value else "false"


def compare_text(n: Compare) -> str:
    return f"{n.path} {n.op} {value_text(n.value)}"


def in_list_text(n: InList) -> str:
    return f"{n.path} in [{', '.join(value_text(v) for v in n.values)}]"


def exists_text(n: Exists) -> str:
    return f"{n.path} exists"


def starts_with_text(n: StartsWith) -> str:
    return f"startsWith({n.path}, {value_text(n.prefix)})"


def contains_text(n: Contains) -> str:
    return f"contains({n.path}, {value_text(n.needle)})"


def birthday_text(n: BirthdayWithin) -> str:
    return f"birthdayWithin({n.path}, {n.days}d)"


def in_segment_text(n: InSegment) -> str:
    return f"inSegment({value_text(n.audience_id)})"


def and_text(n: And) -> str:
    return " and ".join(grouped(i) for i in n.items)


def or_text(n: Or) -> str:
    return " or ".join(grouped(i) for i in n.items)


def not_text(n: Not) -> str:
    return f"not ({to_text(n.item)})"


def exists_event_text(n: EventExists) -> str:
    return spec_text(n.spec)


def aggregate_text(n: Aggregate) -> str:
    inner = spec_text(n.spec) if n.field is None else f"{n.field} of {spec_text(n.spec)}"
    return f"{n.func}({inner}) {n.op} {value_text(n.value)}"


def sequence_text(n: Sequence) -> str:
    kw = "not followed by" if n.negated else "followed by"
    return f"{spec_text(n.first)} {kw} {spec_text(n.then, keyword=False)} within {n.gap.text}"


def walk(n: Node) -> list[Node]:
    """Every node of the tree (pre-order), including where-conditions."""
    op = operator_of(n)
    out: list[Node] = [n]
    for i in op.children(n):
        out.extend(walk(i))
    for s in (*op.specs(n), *op.followers(n)):
        if s.where is not None:
            out.extend(walk(s.where))
    return out


def event_specs(n: Node) -> list[EventSpec]:
    """The event specs a query reads (top level only: where-conditions cannot contain events)."""
    out: list[EventSpec] = []
    for x in walk(n):
        op = operator_of(x)
        out.extend((*op.specs(x), *op.followers(x)))
    return out


def attribute_paths(n: Node) -> set[str]:
    """Profile attribute paths a query reads (paths inside where-conditions are event fields)."""
    out: set[str] = set()

    def visit(x: Node) -> None:
        op = operator_of(x)
        path = op.path(x)
        if path is not None:
            out.add(path)
        for i in op.children(x):
            visit(i)

    visit(n)
    return out


def segment_refs(n: Node) -> list[InSegment]:
    """Every inSegment() in the query."""
    return [x for x in walk(n) if isinstance(x, InSegment)]
