"""Why a profile is in an audience, for a lookup: the events, attributes and memberships its query reads, as text."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Sequence

from pipeline.model import ProfileState, Scalar, StoredEvent
from pipeline.segments.config import AudienceDef
from pipeline.segments.nodes import (
    Aggregate,
    Duration,
    EventSpec,
    InSegment,
    Node,
    Since,
    Within,
    to_text,
)
from pipeline.segments.nodes import Sequence as SeqNode
from pipeline.segments.operators import operator_of
from pipeline.segments.reference import Reference, fields_hold

MAX_DATES = 10  # the most recent days listed per condition; older ones are counted
HIDDEN = "(an identity value, not shown)"
_UNITS = ((86_400_000, "day"), (3_600_000, "hour"), (60_000, "minute"), (1000, "second"))


def membership_evidence(audience: AudienceDef, profile: ProfileState, now_ms: int) -> list[str]:
    """The evidence for the profile's current membership of the audience; none for an exited (or no) membership:
    the query then no longer holds, and what it would have needed is the audience's own text."""
    m = profile.memberships.get(audience.id)
    if m is None or m.status == "exited":
        return []
    return evidence(audience.ast, profile, now_ms)


def evidence(ast: Node, profile: ProfileState, now_ms: int) -> list[str]:
    """One line per condition of the query that reads the profile (events, attributes, other audiences), in query
    order, each said once. Read-only, at request time: it scans the events like the reference evaluator does."""
    ref = Reference([], profile, now_ms)  # no audiences: inSegment() reads the stored memberships
    hidden = {i.casefold() for ids in profile.identities.values() for i in ids}
    out: list[str] = []
    for node in _conditions(ast):
        for line in _lines(node, ref, hidden):
            if line not in out:
                out.append(line)
    return out


def _conditions(n: Node) -> Iterable[Node]:
    """The top-level conditions in query order (not those inside where: they filter events, read no profile)."""
    yield n
    for child in operator_of(n).children(n):
        yield from _conditions(child)


def _lines(n: Node, ref: Reference, hidden: set[str]) -> list[str]:
    op = operator_of(n)
    if isinstance(n, InSegment):
        return [_segment_line(n.audience_id, ref.profile)]
    if isinstance(n, SeqNode):
        return _sequence_lines(n, ref)
    if isinstance(n, Aggregate):
        return [_aggregate_line(n, ref)]
    specs = op.specs(n)
    if specs:
        return [_events_line(s, _events(ref, s), "") for s in specs]
    path = op.path(n)
    return [_attribute_line(path, ref.profile, hidden)] if path is not None else []


def _events(ref: Reference, spec: EventSpec) -> list[StoredEvent]:
    return [ref.profile.events[i] for i in ref.matching(spec)]


def _segment_line(audience_id: str, p: ProfileState) -> str:
    m = p.memberships.get(audience_id)
    if m is None:
        return f"audience {audience_id}: not a member"
    if m.status == "exited":
        return f"audience {audience_id}: exited on {day_text(m.since_ms)}"
    return f"audience {audience_id}: member ({m.status}) since {day_text(m.since_ms)}"


def _attribute_line(path: str, p: ProfileState, hidden: set[str]) -> str:
    av = p.attributes.get(path)
    if av is None or av.value is None:
        return f"{path}: not set"
    return f"{path} is {_value_text(av.value, hidden)} (dataset {av.dataset}, {time_text(av.ts_ms)})"


def _value_text(v: Scalar, hidden: set[str]) -> str:
    # An attribute holding one of the profile's identity values (an e-mail copied into a custom attribute, say)
    # is not repeated: evidence is shown to support agents and identities are personal data.
    if isinstance(v, str) and v.strip().casefold() in hidden:
        return HIDDEN
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _number(v)
    return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v)


def _aggregate_line(n: Aggregate, ref: Reference) -> str:
    events = _events(ref, n.spec)
    if n.func == "count":
        return _events_line(n.spec, events, f" (needs count {n.op} {_number(n.value)})")
    fld = n.field or ""
    used = [e for e in events if type(e.fields.get(fld)) in (int, float)]
    nums: list[float] = [e.fields[fld] for e in used]  # type: ignore[misc]  # filtered to numbers above
    if not nums:
        total = "none"
    elif n.func == "sum":
        total = _number(math.fsum(nums))
    elif n.func == "avg":
        total = _number(math.fsum(nums) / len(nums))
    else:
        total = _number(min(nums) if n.func == "min" else max(nums))
    line = f"{n.func} of {fld} over {_counted(n.spec, len(used))} is {total} (needs {n.func} {n.op} {_number(n.value)})"
    return line + (f": {dates_text([e.ts_ms for e in used])}" if used else "")


def _sequence_lines(n: SeqNode, ref: Reference) -> list[str]:
    events = ref.profile.events
    firsts = ref.matching(n.first)
    hits: list[int] = []
    for p in firsts:
        a = events[p]
        followed = any(q > p and b.event_type == n.then.event_type and b.ts_ms <= a.ts_ms + n.gap.ms
                       and fields_hold(n.then, b) for q, b in enumerate(events))
        if followed != n.negated and (not n.negated or ref.now_ms > a.ts_ms + n.gap.ms):
            hits.append(a.ts_ms)
    kw = "not followed" if n.negated else "followed"
    return [_events_line(n.first, [events[p] for p in firsts], ""),
            f"{len(hits)} of them {kw} by {_typed(n.then)} within {duration_text(n.gap)}"
            + (f": {dates_text(hits)}" if hits else "")]


def _events_line(spec: EventSpec, events: Sequence[StoredEvent], needs: str) -> str:
    line = _counted(spec, len(events)) + needs
    return line + (f": {dates_text([e.ts_ms for e in events])}" if events else "")


def _counted(spec: EventSpec, n: int) -> str:
    """`3 productView (product.category = "shoes") in the last 7 days`."""
    return f"{n} {_typed(spec)} {window_text(spec)}"


def _typed(spec: EventSpec) -> str:
    return spec.event_type + (f" ({to_text(spec.where)})" if spec.where is not None else "")


def window_text(spec: EventSpec) -> str:
    w = spec.window
    if isinstance(w, Within):
        return f"in the last {duration_text(w.duration)}"
    if isinstance(w, Since):
        return f"since {day_text(w.ms)}"
    return "in the stored history"


def duration_text(d: Duration) -> str:
    for size, unit in _UNITS:
        if d.ms % size == 0:
            k = d.ms // size
            return f"{k} {unit}{'' if k == 1 else 's'}"
    return d.text


def day_text(ms: int) -> str:
    """A UTC date like `12 Nov 2026`."""
    d = _utc(ms)
    return f"{d.day} {d:%b %Y}"


def time_text(ms: int) -> str:
    """A UTC time like `12 Nov 2026 09:30 UTC`."""
    return f"{day_text(ms)} {_utc(ms):%H:%M} UTC"


def dates_text(stamps: Sequence[int]) -> str:
    """The most recent MAX_DATES distinct days, oldest first, like `30 Oct, 12, 14 Nov (×2) and 15 Nov 2026, and 3
    more` (the month and year said once per run of days that share them; the events on older days counted)."""
    counts: dict[_dt.date, int] = {}
    for ts in stamps:
        d = _utc(ts).date()
        counts[d] = counts.get(d, 0) + 1
    days = sorted(counts)
    shown, older = days[-MAX_DATES:], days[:-MAX_DATES]
    parts: list[str] = []
    for i, d in enumerate(shown):
        text = f"{d.day}"
        nxt = shown[i + 1] if i + 1 < len(shown) else None
        if nxt is None or (nxt.year, nxt.month) != (d.year, d.month) or counts[d] > 1:
            text += f" {d:%b}"  # a repeated day names its month: "14 (×2) Nov" would read as a day "(×2)"
            if nxt is None or nxt.year != d.year:
                text += f" {d.year}"
        parts.append(text + (f" (×{counts[d]})" if counts[d] > 1 else ""))
    out = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    more = sum(counts[d] for d in older)
    return out + (f", and {more} more" if more else "")


def _utc(ms: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC)


def _number(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)
