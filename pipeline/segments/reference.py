"""Reference evaluator (test oracle): a plain recursive interpreter over the AST that scans every event.

Deliberately shares nothing with the compiled engine but the AST and the operator registry that dispatches to
each node's reference part (written apart from its compile part): no closures, no bisect, no indexes.
Semantics are those documented in `pipeline.segments.parser`.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence

from pipeline.model import ProfileState, Scalar, StoredEvent
from pipeline.segments.config import AudienceDef
from pipeline.segments.nodes import (
    Aggregate,
    And,
    BirthdayWithin,
    Compare,
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
    Value,
    Within,
)
from pipeline.segments.nodes import (
    Sequence as SeqNode,
)
from pipeline.segments.operators import operator_of


def reference_evaluate(audiences: Sequence[AudienceDef], profile: ProfileState, now_ms: int) -> dict[str, bool]:
    """Whether the profile qualifies for each audience at now_ms.

    inSegment() of an audience in `audiences` evaluates that audience (at the same now_ms); of any other
    id it reads profile.memberships (status other than 'exited').
    """
    ref = Reference(audiences, profile, now_ms)
    return {a.id: ref.segment(a.id) for a in audiences}


class Reference:
    """One evaluation: the profile, the wall time and the audiences; operators' reference parts read it."""

    def __init__(self, audiences: Sequence[AudienceDef], profile: ProfileState, now_ms: int) -> None:
        self.by_id = {a.id: a for a in audiences}
        self.profile = profile
        self.now_ms = now_ms
        self.results: dict[str, bool] = {}

    def segment(self, aid: str) -> bool:
        if aid in self.results:
            return self.results[aid]
        if aid in self.by_id:
            self.results[aid] = self.holds(self.by_id[aid].ast)
            return self.results[aid]
        m = self.profile.memberships.get(aid)
        return m is not None and m.status != "exited"

    def attribute(self, path: str) -> Scalar:
        if path in self.profile.attributes:
            return self.profile.attributes[path].value
        return None

    def holds(self, node: Node) -> bool:
        op = operator_of(node)
        if op.value is not None:
            return op.value.reference(node, self.attribute(op.path(node)))  # type: ignore[arg-type]
        return op.reference(node, self)  # type: ignore[misc]  # registration guarantees the part

    def matching(self, spec: EventSpec) -> list[int]:
        """Positions of the events that match the spec and lie in its window at now_ms."""
        out = []
        for position, event in enumerate(self.profile.events):
            if event.event_type == spec.event_type and self.in_window(spec, event) and fields_hold(spec, event):
                out.append(position)
        return out

    def in_window(self, spec: EventSpec, event: StoredEvent) -> bool:
        if isinstance(spec.window, Within):
            return event.ts_ms >= self.now_ms - spec.window.duration.ms
        if isinstance(spec.window, Since):
            start = datetime.datetime.combine(datetime.date.fromordinal(spec.window.date.ordinal),
                                              datetime.time(), tzinfo=datetime.UTC)
            return event.ts_ms >= int(start.timestamp()) * 1000
        return True


# Reference parts of the built-in operators (registered in `pipeline.segments.builtin`).

def const_holds(node: Const, ref: Reference) -> bool:
    return node.value


def birthday_holds(node: BirthdayWithin, ref: Reference) -> bool:
    return birthday_within(ref.attribute(node.path), node.days, ref.now_ms)


def in_segment_holds(node: InSegment, ref: Reference) -> bool:
    return ref.segment(node.audience_id)


def and_holds(node: And, ref: Reference) -> bool:
    result = True
    for item in node.items:
        if not ref.holds(item):
            result = False
    return result


def or_holds(node: Or, ref: Reference) -> bool:
    result = False
    for item in node.items:
        if ref.holds(item):
            result = True
    return result


def not_holds(node: Not, ref: Reference) -> bool:
    return not ref.holds(node.item)


def event_exists_holds(node: EventExists, ref: Reference) -> bool:
    return len(ref.matching(node.spec)) > 0


def aggregate_holds(node: Aggregate, ref: Reference) -> bool:
    positions = ref.matching(node.spec)
    if node.func == "count":
        return compare(len(positions), node.op, node.value)
    numbers: list[float] = []
    for p in positions:
        x = ref.profile.events[p].fields.get(node.field or "")
        if isinstance(x, int | float) and not isinstance(x, bool):
            numbers.append(x)
    if node.func == "sum":
        total: float = math.fsum(numbers)
    elif not numbers:
        return False
    elif node.func == "avg":
        total = math.fsum(numbers) / len(numbers)
    elif node.func == "min":
        total = sorted(numbers)[0]
    else:
        total = sorted(numbers)[-1]
    return compare(total, node.op, node.value)


def sequence_holds(node: SeqNode, ref: Reference) -> bool:
    events = ref.profile.events
    for p in ref.matching(node.first):
        first = events[p]
        has_follower = False
        for q, later in enumerate(events):
            if (q > p and later.event_type == node.then.event_type and later.ts_ms <= first.ts_ms + node.gap.ms
                    and fields_hold(node.then, later)):
                has_follower = True
        if not node.negated and has_follower:
            return True
        # Absence counts only once the whole gap has passed.
        if node.negated and not has_follower and ref.now_ms > first.ts_ms + node.gap.ms:
            return True
    return False


def fields_hold(spec: EventSpec, event: StoredEvent) -> bool:
    if spec.where is None:
        return True
    return field_condition(spec.where, event.fields)


def field_condition(node: Node, fields: Mapping[str, Scalar]) -> bool:
    op = operator_of(node)
    if op.value is not None:
        return op.value.reference(node, fields.get(op.path(node)))  # type: ignore[arg-type]
    if op.where is None:
        raise TypeError(node)
    return op.where.reference(node, fields)


# Where-condition reference parts of the built-in operators.

def const_field_holds(node: Const, fields: Mapping[str, Scalar]) -> bool:
    return node.value


def and_field_holds(node: And, fields: Mapping[str, Scalar]) -> bool:
    return all(field_condition(i, fields) for i in node.items)


def or_field_holds(node: Or, fields: Mapping[str, Scalar]) -> bool:
    return any(field_condition(i, fields) for i in node.items)


def not_field_holds(node: Not, fields: Mapping[str, Scalar]) -> bool:
    return not field_condition(node.item, fields)


# Value-test reference parts of the built-in operators.

def exists_value(node: Exists, x: Scalar) -> bool:
    return x is not None


def starts_with_value(node: StartsWith, x: Scalar) -> bool:
    return isinstance(x, str) and x[:len(node.prefix)] == node.prefix


def contains_value(node: Contains, x: Scalar) -> bool:
    return isinstance(x, str) and node.needle in x


def in_list_value(node: InList, x: Scalar) -> bool:
    return any(equal(x, v) for v in node.values)


def compare_value(node: Compare, x: Scalar) -> bool:
    return value_compare(x, node.op, node.value)


def equal(x: Scalar, v: Value) -> bool:
    return value_compare(x, "=", v)


def value_compare(x: Scalar, op: str, v: Value) -> bool:
    """A comparison of an attribute/field value with a literal; false when types differ or x is missing."""
    if x is None:
        return False
    if isinstance(v, DateValue):
        if not isinstance(x, str):
            return False
        d = parse_date(x)
        if d is None:
            return False
        return compare(d.toordinal(), op, v.ordinal)
    if isinstance(v, bool) or isinstance(x, bool):
        if isinstance(v, bool) and isinstance(x, bool):
            return compare(x, op, v)
        return False
    if isinstance(v, str) != isinstance(x, str):
        return False
    return compare(x, op, v)


def compare(x: float | str | bool, op: str, v: float | str | bool) -> bool:
    if op == "=":
        return x == v
    if op == "!=":
        return x != v
    if op == "<":
        return x < v  # type: ignore[operator]
    if op == "<=":
        return x <= v  # type: ignore[operator]
    if op == ">":
        return x > v  # type: ignore[operator]
    if op == ">=":
        return x >= v  # type: ignore[operator]
    raise ValueError(op)


def parse_date(text: str) -> datetime.date | None:
    """The date in the first ten characters (YYYY-MM-DD), if any."""
    head = text[:10]
    if len(head) != 10 or head[4] != "-" or head[7] != "-":
        return None
    digits = head[:4] + head[5:7] + head[8:10]
    if any(c not in "0123456789" for c in digits):
        return None
    try:
        return datetime.date(int(head[:4]), int(head[5:7]), int(head[8:10]))
    except ValueError:
        return None


def birthday_within(x: Scalar, days: int, now_ms: int) -> bool:
    """Walk day by day from today (UTC) looking for the birthday's month/day."""
    if not isinstance(x, str):
        return False
    born = parse_date(x)
    if born is None:
        return False
    today = datetime.datetime.fromtimestamp(now_ms // 1000, tz=datetime.UTC).date()
    for offset in range(min(days, 400)):  # every anniversary comes within 366 days
        day = today + datetime.timedelta(days=offset)
        if (day.month, day.day) == (born.month, born.day):
            return True
        leap = day.year % 4 == 0 and (day.year % 100 != 0 or day.year % 400 == 0)
        if (born.month, born.day) == (2, 29) and not leap and (day.month, day.day) == (2, 28):
            return True
    return False
