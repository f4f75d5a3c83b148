"""The built-in operators of the audience language: one registration per node type, naming all its parts."""

from __future__ import annotations

from typing import Any, get_args

from pipeline.errors import ConfigError
from pipeline.segments import columnar as col
from pipeline.segments import engine as eng
from pipeline.segments import nodes as n
from pipeline.segments import reference as ref
from pipeline.segments.operators import (
    PER_VALUE,
    ArgumentError,
    Call,
    FieldParts,
    Operator,
    PathArg,
    Rule,
    ValueTest,
    register,
    registered,
)


def _text_call(cls: type[n.StartsWith] | type[n.Contains]) -> Any:
    def build(args: list[Any], pos: int) -> n.Node | None:
        if len(args) == 2 and isinstance(args[0], PathArg) and type(args[1]) is str:
            return cls(str(args[0]), args[1])
        return None
    return build


def _birthday_call(args: list[Any], pos: int) -> n.Node | None:
    if not (len(args) == 2 and isinstance(args[0], PathArg) and isinstance(args[1], n.Duration)):
        return None
    d = args[1]
    if d.ms % n.DAY_MS:
        raise ArgumentError(f"birthdayWithin() needs a whole number of days, got {d.text}")
    return n.BirthdayWithin(str(args[0]), d.ms // n.DAY_MS)


def _in_segment_call(args: list[Any], pos: int) -> n.Node | None:
    return n.InSegment(args[0], pos) if len(args) == 1 and type(args[0]) is str else None


def _compare_number(c: n.Compare) -> tuple[str, int | float] | None:
    return (c.op, c.value) if isinstance(c.value, int | float) and not isinstance(c.value, bool) else None


def _path(x: Any) -> str:
    return str(x.path)


# ---- conditions on one value (attributes; event fields inside where) ----

register(Operator(
    node=n.Compare, parse=Rule("compare"), text=n.compare_text, path=_path,
    value=ValueTest(predicate=eng.compare_pred, reference=ref.compare_value, columnar=PER_VALUE,
                    equals=eng.compare_equals, number=_compare_number)))
register(Operator(
    node=n.InList, parse=Rule("in_list"), text=n.in_list_text, path=_path,
    value=ValueTest(predicate=eng.in_list_pred, reference=ref.in_list_value, columnar=PER_VALUE)))
register(Operator(
    node=n.Exists, parse=Rule("exists"), text=n.exists_text, path=_path,
    value=ValueTest(predicate=eng.exists_pred, reference=ref.exists_value, columnar=PER_VALUE)))
register(Operator(
    node=n.StartsWith, parse=Call("startsWith", '(path, "text")', _text_call(n.StartsWith)), text=n.starts_with_text,
    path=_path, value=ValueTest(predicate=eng.starts_with_pred, reference=ref.starts_with_value, columnar=PER_VALUE)))
register(Operator(
    node=n.Contains, parse=Call("contains", '(path, "text")', _text_call(n.Contains)), text=n.contains_text,
    path=_path, value=ValueTest(predicate=eng.contains_pred, reference=ref.contains_value, columnar=PER_VALUE)))

# ---- profile-level conditions ----

register(Operator(
    node=n.BirthdayWithin, parse=Call("birthdayWithin", "(path, Nd)", _birthday_call), text=n.birthday_text,
    path=_path, compile=eng.compile_birthday, reference=ref.birthday_holds, columnar=col.birthday_tri))
register(Operator(
    node=n.InSegment, parse=Call("inSegment", '("audience-id")', _in_segment_call), text=n.in_segment_text,
    compile=eng.compile_in_segment, reference=ref.in_segment_holds, columnar=col.in_segment_tri))

# ---- logic (also inside where-conditions) ----

register(Operator(
    node=n.Const, parse=Rule("true_"), text=n.const_text,
    compile=eng.compile_const, reference=ref.const_holds, columnar=col.const_tri,
    where=FieldParts(compile=eng.const_field, reference=ref.const_field_holds, columnar=col.const_where)))
register(Operator(
    node=n.And, parse=Rule("and_expr"), text=n.and_text, grouped=True, children=lambda x: x.items,
    compile=eng.compile_bool, reference=ref.and_holds, columnar=col.bool_tri,
    where=FieldParts(compile=eng.and_field, reference=ref.and_field_holds, columnar=col.bool_where)))
register(Operator(
    node=n.Or, parse=Rule("or_expr"), text=n.or_text, grouped=True, children=lambda x: x.items,
    compile=eng.compile_bool, reference=ref.or_holds, columnar=col.bool_tri,
    where=FieldParts(compile=eng.or_field, reference=ref.or_field_holds, columnar=col.bool_where)))
register(Operator(
    node=n.Not, parse=Rule("not_"), text=n.not_text, children=lambda x: (x.item,),
    compile=eng.compile_not, reference=ref.not_holds, columnar=col.not_tri,
    where=FieldParts(compile=eng.not_field, reference=ref.not_field_holds, columnar=col.not_where)))

# ---- events ----

register(Operator(
    node=n.EventExists, parse=Rule("event_exists"), text=n.exists_event_text, grouped=True,
    specs=lambda x: (x.spec,),
    compile=eng.compile_event_exists, reference=ref.event_exists_holds, columnar=col.event_exists_tri))
register(Operator(
    node=n.Aggregate, parse=Rule("agg_compare"), text=n.aggregate_text,
    specs=lambda x: (x.spec,), event_fields=lambda x: () if x.field is None else (x.field,),
    compile=eng.compile_aggregate, reference=ref.aggregate_holds, columnar=col.aggregate_tri))
register(Operator(
    node=n.Sequence, parse=Rule("followed"), text=n.sequence_text, grouped=True,
    specs=lambda x: (x.first,), followers=lambda x: (x.then,), gaps=lambda x: (x.gap,),
    compile=eng.compile_sequence, reference=ref.sequence_holds, columnar=col.sequence_tri))

# A node type added to the language (`nodes.Node`) but not registered here fails on import, not on first use.
_unregistered = sorted(t.__name__ for t in set(get_args(n.Node)) - {op.node for op in registered()})
if _unregistered:
    raise ConfigError(f"segment node types without an operator: {', '.join(_unregistered)}; register each in "
                      "pipeline/segments/builtin.py")
