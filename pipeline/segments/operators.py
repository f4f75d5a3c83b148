"""The segment-operator registry: every query node type declares all its parts in one `register` call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.model import Scalar
    from pipeline.segments.columnar import Bools, Columns, Precheck, Tri
    from pipeline.segments.engine import Evaluator, FieldPred
    from pipeline.segments.nodes import Duration, EventSpec, Node
    from pipeline.segments.reference import Reference

N = TypeVar("N")


class Unknown:
    """The columnar part of an operator the pre-check cannot decide: its profiles take the full path."""

    def __repr__(self) -> str:
        return "UNKNOWN"


class PerValue:
    """The columnar part of a value test: the engine's own predicate, run once per distinct value of the column."""

    def __repr__(self) -> str:
        return "PER_VALUE"


UNKNOWN = Unknown()
PER_VALUE = PerValue()


class PathArg(str):
    """A bare path given as a function argument (told apart from a string literal)."""


class ArgumentError(ValueError):
    """Raised by a `Call.build` whose arguments have the right shape but a wrong value; the message is shown."""


@dataclass(frozen=True)
class Call:
    """Parse hook: the operator is written `name(arg, ...)`. `build(args, pos)` makes the node, or returns None when
    the arguments do not have the documented `shape`; args are values, `PathArg`s and `Duration`s."""

    name: str
    shape: str
    build: Callable[[list[Any], int], Any]


@dataclass(frozen=True)
class Rule:
    """Parse hook: a fixed rule of the grammar (by its alias in `parser.GRAMMAR`) builds the node."""

    name: str


@dataclass(frozen=True, kw_only=True)
class ValueTest(Generic[N]):
    """The evaluation parts of a leaf that tests one value: a profile attribute at top level, an event field in a
    where-condition. Engine, reference and pre-check share the walk over the value; the operator gives the test."""

    predicate: Callable[[N], Callable[[Scalar], bool]]  # engine: built once per audience, called per value
    reference: Callable[[N, Scalar], bool]  # oracle: written apart from the predicate
    columnar: PerValue | Unknown
    equals: Callable[[N], str | None] | None = None  # the string an equality test needs, for the engine's fast path
    number: Callable[[N], tuple[str, int | float] | None] | None = None  # (op, n) for the pre-check's float64 path


@dataclass(frozen=True, kw_only=True)
class FieldParts(Generic[N]):
    """How a non-leaf node that may appear in a where-condition tests an event's fields."""

    compile: Callable[[N], FieldPred]
    reference: Callable[[N, Mapping[str, Scalar]], bool]
    columnar: Callable[[Precheck, N, Columns, int], Bools] | Unknown


def _no_nodes(_: Any) -> tuple[Node, ...]:
    return ()


def _no_specs(_: Any) -> tuple[EventSpec, ...]:
    return ()


def _no_path(_: Any) -> str | None:
    return None


def _no_names(_: Any) -> tuple[str, ...]:
    return ()


def _no_durations(_: Any) -> tuple[Duration, ...]:
    return ()


@dataclass(frozen=True, kw_only=True)
class Operator(Generic[N]):
    """One node type of the audience language and every part the evaluators need of it.

    Required: `parse`, `text`, and either `value` (a value test) or all of `compile`, `reference` and `columnar`
    (UNKNOWN when the pre-check cannot decide it). `where` makes a non-leaf node allowed in a where-condition.
    The structural parts default to "none": sub-conditions, event specs, the path read, and so on.
    """

    node: type[N]
    parse: Call | Rule | None = None
    text: Callable[[N], str] | None = None
    value: ValueTest[N] | None = None
    compile: Callable[[N, str], Evaluator] | None = None  # engine: (node, label) -> closure, once per audience
    reference: Callable[[N, Reference], bool] | None = None  # oracle evaluation
    columnar: Callable[[Precheck, N, Columns, int, dict[str, Tri]], Tri] | Unknown | None = None
    where: FieldParts[N] | None = None  # how it tests an event's fields; None: not allowed in a where-condition
    children: Callable[[N], tuple[Node, ...]] = _no_nodes  # sub-conditions at the same level (and / or / not)
    specs: Callable[[N], tuple[EventSpec, ...]] = _no_specs  # event specs whose window it reads
    followers: Callable[[N], tuple[EventSpec, ...]] = _no_specs  # event specs read without a window
    path: Callable[[N], str | None] = _no_path  # the attribute (or, in a where-condition, field) it reads
    event_fields: Callable[[N], tuple[str, ...]] = _no_names  # fields of its specs' events read besides `where`
    gaps: Callable[[N], tuple[Duration, ...]] = _no_durations  # lengths of history it reads beyond its windows
    grouped: bool = False  # parenthesised when printed inside and / or
    allowed_in_where: bool = field(init=False, default=False)


_REQUIRED = ("parse", "text", "compile", "reference", "columnar")
_BY_TYPE: dict[type, Operator[Any]] = {}
_BY_CALL: dict[str, Operator[Any]] = {}


def _missing(op: Operator[Any]) -> list[str]:
    """The required parts an operator lacks."""
    out = [p for p in ("parse", "text") if getattr(op, p) is None]
    if op.value is not None:
        extra = [p for p in ("compile", "reference", "columnar", "where") if getattr(op, p) is not None]
        if extra:
            raise ConfigError(f"segment operator {op.node.__name__} is a value test: its {', '.join(extra)} "
                              "come from `value` and cannot be given too")
        return out
    return out + [p for p in ("compile", "reference", "columnar") if getattr(op, p) is None]


def register(op: Operator[N]) -> Operator[N]:
    """Add an operator; refuses (ConfigError) one lacking a part, naming what is missing and the valid parts."""
    name = op.node.__name__
    missing = _missing(op)
    if missing:
        raise ConfigError(f"segment operator {name} lacks its {', '.join(missing)} part"
                          f"{'s' if len(missing) > 1 else ''}; every operator declares {', '.join(_REQUIRED)} "
                          "(columnar may be UNKNOWN), or parse, text and a `value` test")
    if op.value is not None and op.path is _no_path:
        raise ConfigError(f"segment operator {name} is a value test but declares no path part")
    if op.node in _BY_TYPE:
        raise ConfigError(f"segment operator {name} is already registered")
    if isinstance(op.parse, Call):
        if op.parse.name in _BY_CALL:
            raise ConfigError(f"segment operator {name}: function {op.parse.name}() is already "
                              f"{_BY_CALL[op.parse.name].node.__name__}")
        if op.parse.name in RESERVED_CALLS:
            raise ConfigError(f"segment operator {name}: {op.parse.name}() is a word of the language")
    else:
        from pipeline.segments.parser import grammar_rules  # the parser imports this module: read it late

        rules = grammar_rules()
        if op.parse is None or op.parse.name not in rules:  # None was refused above; this narrows it
            raise ConfigError(f"segment operator {name}: the parser has no rule {op.parse!r}; a new operator is "
                              f"written as a function, parse=Call(...), or one of {', '.join(sorted(rules))}")
    object.__setattr__(op, "allowed_in_where", op.value is not None or op.where is not None)
    _BY_TYPE[op.node] = op
    if isinstance(op.parse, Call):
        _BY_CALL[op.parse.name] = op
    return op


def unregister(node: type) -> None:
    """Remove an operator (tests that define one)."""
    op = _BY_TYPE.pop(node)
    if isinstance(op.parse, Call):
        del _BY_CALL[op.parse.name]


# Functions the grammar or the parser gives a meaning of their own.
RESERVED_CALLS = frozenset({"count", "sum", "avg", "min", "max", "date"})


def operator_of(node: object) -> Operator[Any]:
    """The operator of a node; TypeError for anything that is not a registered query node."""
    op = _BY_TYPE.get(type(node))
    if op is None:
        raise TypeError(f"not a query node: {node!r}; registered: "
                        f"{', '.join(sorted(t.__name__ for t in _BY_TYPE))}")
    return op


def operator_named(call: str) -> Operator[Any] | None:
    """The operator written as function `call`, if any."""
    return _BY_CALL.get(call)


def call_names() -> list[str]:
    """The functions of the language: operators in registration order, then the reserved words."""
    return [*_BY_CALL, "count", "sum", "avg", "min", "max", "date"]


def registered() -> list[Operator[Any]]:
    """Every registered operator."""
    return list(_BY_TYPE.values())


__all__ = ["PER_VALUE", "UNKNOWN", "ArgumentError", "Call", "FieldParts", "Operator", "PathArg", "Rule", "ValueTest",
           "call_names", "operator_named", "operator_of", "register", "registered", "unregister"]
