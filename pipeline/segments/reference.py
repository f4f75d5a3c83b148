"""Reference evaluator (test oracle): a plain recursive interpreter over the AST that scans every event.

Deliberately shares nothing with the compiled engine but the AST: no closures, no bisect, no indexes.
Semantics are those documented in `pipeline.segments.parser`.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

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


def reference_evaluate(audiences: Sequence[AudienceDef], profile: ProfileState, now_ms: int) -> dict[str, bool]:
    """Whether the profile qualifies for each audience at now_ms.

    inSegment() of an audience in `audiences` evaluates that audience (at the same now_ms); of any other
    id it reads profile.memberships (status other than 'exited').
    """
    by_id = {a.id: a for a in audiences}
    results: dict[str, bool] = {}

    def segment(aid: str) -> bool:
        if aid in results:
            return results[aid]
        if aid in by_id:
            results[aid] = holds(by_id[aid].ast)
            return results[aid]
        m = profile.memberships.get(aid)
        return m is not None and m.status != "exited"

    def attribute(path: str) -> Scalar:
        if path in profile.attributes:
            return profile.attributes[path].value
        return None

    def holds(node: Node) -> bool:
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Compare | InList | Exists | StartsWith | Contains):
            return leaf_holds(node, attribute(node.path))
        if isinstance(node, BirthdayWithin):
            return birthday_within(attribute(node.path), node.days, now_ms)
        if isinstance(node, InSegment):
            return segment(node.audience_id)
        if isinstance(node, And):
            result = True
            for item in node.items:
                if not holds(item):
                    result = False
            return result
        if isinstance(node, Or):
            result = False
            for item in node.items:
                if holds(item):
                    result = True
            return result
        if isinstance(node, Not):
            return not holds(node.item)
        if isinstance(node, EventExists):
            return len(matching(node.spec)) > 0
        if isinstance(node, Aggregate):
            return aggregate_holds(node)
        if isinstance(node, SeqNode):
            return sequence_holds(node)
        raise TypeError(node)

    def matching(spec: EventSpec) -> list[int]:
        """Positions of the events that match the spec and lie in its window at now_ms."""
        out = []
        for position, event in enumerate(profile.events):
            if event.event_type == spec.event_type and in_window(spec, event) and fields_hold(spec, event):
                out.append(position)
        return out

    def in_window(spec: EventSpec, event: StoredEvent) -> bool:
        if isinstance(spec.window, Within):
            return event.ts_ms >= now_ms - spec.window.duration.ms
        if isinstance(spec.window, Since):
            start = datetime.datetime.combine(datetime.date.fromordinal(spec.window.date.ordinal),
                                              datetime.time(), tzinfo=datetime.UTC)
            return event.ts_ms >= int(start.timestamp()) * 1000
        return True

    def aggregate_holds(node: Aggregate) -> bool:
        positions = matching(node.spec)
        if node.func == "count":
            return compare(len(positions), node.op, node.value)
        numbers: list[float] = []
        for p in positions:
            x = profile.events[p].fields.get(node.field or "")
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

    def sequence_holds(node: SeqNode) -> bool:
        for p in matching(node.first):
            first = profile.events[p]
            has_follower = False
            for q, later in enumerate(profile.events):
                if (q > p and later.event_type == node.then.event_type and later.ts_ms <= first.ts_ms + node.gap.ms
                        and fields_hold(node.then, later)):
                    has_follower = True
            if not node.negated and has_follower:
                return True
            # Absence counts only once the whole gap has passed.
            if node.negated and not has_follower and now_ms > first.ts_ms + node.gap.ms:
                return True
        return False

    return {a.id: segment(a.id) for a in audiences}


def fields_hold(spec: EventSpec, event: StoredEvent) -> bool:
    if spec.where is None:
        return True
    return field_condition(spec.where, event.fields)


def field_condition(node: Node, fields: dict[str, Scalar]) -> bool:
    if isinstance(node, Const):
        return node.value
    if isinstance(node, And):
        return all(field_condition(i, fields) for i in node.items)
    if isinstance(node, Or):
        return any(field_condition(i, fields) for i in node.items)
    if isinstance(node, Not):
        return not field_condition(node.item, fields)
    if isinstance(node, Compare | InList | Exists | StartsWith | Contains):
        return leaf_holds(node, fields.get(node.path))
    raise TypeError(node)


def leaf_holds(node: Compare | InList | Exists | StartsWith | Contains, x: Scalar) -> bool:
    if isinstance(node, Exists):
        return x is not None
    if isinstance(node, StartsWith):
        return isinstance(x, str) and x[:len(node.prefix)] == node.prefix
    if isinstance(node, Contains):
        return isinstance(x, str) and node.needle in x
    if isinstance(node, InList):
        return any(equal(x, v) for v in node.values)
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
