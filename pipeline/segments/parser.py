"""Audience query language: lark LALR grammar and parser to the typed AST in `nodes`.

Syntax (keywords are lower case; paths are flattened dotted names such as `person.birthDate`):

Profile attributes
    loyalty.tier = "gold"                  comparisons: = != < <= > >=
    loyalty.points >= 1000                 numbers: 12, -3, 4.5
    consents.email != "no"                 strings: "..." with JSON escapes
    person.birthDate < date("2000-01-01")  dates: date("YYYY-MM-DD"); a plain string literal that is an ISO
    crm.customerSince >= "2020-01-01"      date (YYYY-MM-DD) is also compared as a date
    consents.sms = true                    booleans (only = and !=)
    loyalty.tier in ["gold", "silver"]     membership in a list of literals
    person.city exists                     present and not null
    startsWith(web.page.url, "https://")   contains(person.city, "York")
    birthdayWithin(person.birthDate, 7d)   the next birthday (month/day, UTC) is 0..6 days from today

Events (conditions after `where` read the event's flattened fields)
    event productView where product.category = "shoes" within 30m     units: s m h d
    event purchase since "2026-01-01"                                   since a UTC date
    event login                                                         ever (in the kept history)
    count(event productView where product.category = "shoes" within 7d) >= 3
    sum(commerce.order.total of event purchase within 30d) > 500       also avg / min / max
    event productView followed by cartAdd within 10m                    A, then B at most 10m after it
    event cartAdd within 7d not followed by purchase within 1h          absence: qualifies once the hour
                                                                        has passed with no purchase
Segments and logic
    inSegment("gold") and not inSegment("churned")
    (a or b) and not c                     precedence: not > and > or

Semantics worth knowing
  * A comparison on a missing value, or on a value of another type, is false for every operator
    (including !=); use `not x = "a"` to include profiles without x. Numbers never equal booleans.
  * `within D` keeps events with ts >= now - D (inclusive edge; later-than-now events count too).
  * A where-condition extends as far as it can: `event A where x = 1 and inSegment("g")` is an error;
    write a window after it or parenthesise: `(event A where x = 1) and inSegment("g")`.
  * `B` follows `A` when it comes after A in the (time-sorted) history and B.ts <= A.ts + gap.
  * sum of no events is 0; avg/min/max of no events is undefined, so their comparisons are false;
    non-numeric field values are ignored by aggregates.
  * Keywords (and or not in exists event where within since followed by of true false) are read as
    names wherever a keyword cannot appear, so `count = 1` or `product.in = 2` still work.

Errors: SegmentSyntaxError (a ConfigError) with file, line and column and what was expected, for
unexpected tokens/characters, unterminated strings, bad window units, bad dates, unknown functions and
misplaced conditions. Unknown audiences in inSegment() and cycles are ConfigErrors raised when a segments
file is loaded (see `pipeline.segments.config`).

Functions (startsWith, contains, birthdayWithin, inSegment, and any operator registered with a `Call` hook) are
built by the operator registry (`pipeline.segments.operators`); the grammar has one rule for all of them.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable
from typing import Any, NoReturn, cast

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from pipeline.errors import SegmentSyntaxError
from pipeline.segments.nodes import (
    UNIT_MS,
    Aggregate,
    And,
    CompareOp,
    Const,
    DateValue,
    Duration,
    EventExists,
    EventSpec,
    Exists,
    InList,
    Node,
    Not,
    Or,
    Sequence,
    Since,
    Value,
    Window,
    Within,
    walk,
)
from pipeline.segments.nodes import Compare as CompareNode
from pipeline.segments.operators import (
    RESERVED_CALLS,
    ArgumentError,
    Call,
    PathArg,
    call_names,
    operator_named,
    operator_of,
)

GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr ("or" and_expr)*
?and_expr: not_expr ("and" not_expr)*
?not_expr: "not" not_expr -> not_
         | atom
?atom: "(" or_expr ")"
     | "true" -> true_
     | "false" -> false_
     | PATH COMPOP value -> compare
     | PATH "in" vlist -> in_list
     | PATH "exists" -> exists
     | PATH "(" [arg ("," arg)*] ")" -> call
     | aggcall COMPOP NUMBER -> agg_compare
     | event_spec -> event_exists
     | event_spec "followed" "by" follower "within" DURATION -> followed
     | event_spec "not" "followed" "by" follower "within" DURATION -> not_followed
event_spec: "event" PATH [where] [window]
follower: ["event"] PATH [where]
where: "where" or_expr
?window: "within" DURATION -> within
       | "since" STRING -> since
aggcall: PATH "(" event_spec ")" -> agg_count
       | PATH "(" PATH "of" event_spec ")" -> agg_field
vlist: "[" [value ("," value)*] "]"
?value: STRING -> string
      | NUMBER -> number
      | "true" -> vtrue
      | "false" -> vfalse
      | PATH "(" STRING ")" -> value_call
?arg: value
    | PATH -> path_arg
    | DURATION -> duration_arg
COMPOP: "!=" | "<=" | ">=" | "=" | "<" | ">"
PATH: /[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*/
STRING: /"([^"\\\n]|\\.)*"/
NUMBER: /-?\d+(\.\d+)?([eE][-+]?\d+)?/
DURATION.2: /\d+[A-Za-z]+/
%ignore /[ \t\r\n]+/
"""

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# Friendly names for the "expected ..." part of syntax errors.
_TERMINAL_NAMES = {
    "PATH": "a name/path", "STRING": "a string", "NUMBER": "a number", "DURATION": "a duration like 7d",
    "COMPOP": "a comparison operator", "$END": "end of query",
}


class _QueryError(Exception):
    """Internal: a problem at a char offset of the query text; mapped to file positions by the caller."""

    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos
        self.message = message


_LARK = Lark(GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _fail(pos: int, message: str) -> NoReturn:
    raise _QueryError(pos, message)


def _date(text: str, pos: int) -> DateValue:
    if not _ISO_DATE.fullmatch(text):
        _fail(pos, f"bad date {text!r}: expected YYYY-MM-DD")
    try:
        return DateValue(_dt.date.fromisoformat(text).toordinal())
    except ValueError:
        _fail(pos, f"bad date {text!r}: no such day")


def _string(tok: Token) -> str:
    try:
        return cast(str, json.loads(str(tok)))
    except ValueError:
        _fail(tok.start_pos or 0, f"bad escape in string {tok}")


def _duration(tok: Token) -> Duration:
    m = re.fullmatch(r"(\d+)([A-Za-z]+)", str(tok))
    assert m is not None
    n, unit = int(m.group(1)), m.group(2)
    if unit not in UNIT_MS:
        _fail(tok.start_pos or 0, f"bad window unit {unit!r} in {tok}: expected one of s, m, h, d")
    if n <= 0:
        _fail(tok.start_pos or 0, f"window {tok} must be positive")
    return Duration(n * UNIT_MS[unit], str(tok))


class _ToAst(Transformer[Token, Node]):
    """Builds nodes; raises _QueryError with the offending offset for semantic problems."""

    @v_args(inline=True)
    def not_(self, item: Node) -> Node:
        return Not(item)

    def or_expr(self, items: list[Node]) -> Node:
        return Or(tuple(items))

    def and_expr(self, items: list[Node]) -> Node:
        return And(tuple(items))

    def true_(self, _: list[Any]) -> Const:
        return Const(True)

    def false_(self, _: list[Any]) -> Const:
        return Const(False)

    # values
    def vtrue(self, _: list[Any]) -> Value:
        return True

    def vfalse(self, _: list[Any]) -> Value:
        return False

    @v_args(inline=True)
    def string(self, tok: Token) -> Value:
        s = _string(tok)
        # An ISO date written as a plain string literal is compared as a date.
        return _date(s, tok.start_pos or 0) if _ISO_DATE.fullmatch(s) else s

    @v_args(inline=True)
    def number(self, tok: Token) -> Value:
        text = str(tok)
        return float(text) if any(c in text for c in ".eE") else int(text)

    @v_args(inline=True)
    def value_call(self, name: Token, arg: Token) -> Value:
        if str(name) != "date":
            _fail(name.start_pos or 0, f"unknown function {str(name)!r} in a value: expected date(\"YYYY-MM-DD\")")
        return _date(_string(arg), arg.start_pos or 0)

    @v_args(inline=True)
    def path_arg(self, tok: Token) -> PathArg:
        return PathArg(str(tok))

    @v_args(inline=True)
    def duration_arg(self, tok: Token) -> Duration:
        return _duration(tok)

    def vlist(self, items: list[Value | None]) -> tuple[Value, ...]:
        return tuple(v for v in items if v is not None)

    # attribute conditions
    @v_args(inline=True)
    def compare(self, path: Token, op: Token, value: Value) -> Node:
        if isinstance(value, bool) and str(op) not in ("=", "!="):
            _fail(op.start_pos or 0, f"booleans only support = and !=, not {op}")
        return CompareNode(str(path), cast(CompareOp, str(op)), value)

    @v_args(inline=True)
    def in_list(self, path: Token, values: tuple[Value, ...]) -> Node:
        return InList(str(path), values)

    @v_args(inline=True)
    def exists(self, path: Token) -> Node:
        return Exists(str(path))

    @v_args(meta=True)
    def call(self, meta: Any, children: list[Any]) -> Node:
        name_tok: Token = children[0]
        name = str(name_tok)
        args = [a for a in children[1:] if a is not None]
        pos = name_tok.start_pos or 0
        kinds = [type(a).__name__ for a in args]

        def need(shape: str, ok: bool) -> None:
            if not ok:
                _fail(pos, f"{name}() expects {shape}, got ({', '.join(kinds) or 'nothing'})")

        op = operator_named(name)
        if op is not None:
            hook = cast(Call, op.parse)
            try:
                node = hook.build(args, pos)
            except ArgumentError as e:
                _fail(pos, str(e))
            need(hook.shape, node is not None)
            return cast(Node, node)
        if name in RESERVED_CALLS:
            _fail(pos, f"{name}() cannot be used here: " + (
                "aggregates must be compared, e.g. count(event x within 7d) >= 3" if name != "date"
                else "date() is a value, e.g. person.birthDate < date(\"2000-01-01\")"))
        _fail(pos, f"unknown function {name!r}: expected one of {', '.join(call_names())}")

    # events
    @v_args(meta=True)
    def where(self, meta: Any, children: list[Node]) -> Node:
        cond = children[0]
        for n in walk(cond):
            op = operator_of(n)
            if not op.allowed_in_where:
                what = f"{op.parse.name}()" if isinstance(op.parse, Call) else "an event expression"
                pos = getattr(n, "pos", -1)  # a node that keeps its offset (inSegment) is pointed at
                pos = pos if pos >= 0 else meta.start_pos
                _fail(pos, f"{what} is not allowed inside a where-condition (it reads event fields); "
                                      "end the where-condition with a window or parenthesise the event "
                                      "expression, e.g. (event x where a = 1) and inSegment(\"g\")")
        return cond

    @v_args(inline=True)
    def within(self, tok: Token) -> Window:
        return Within(_duration(tok))

    @v_args(inline=True)
    def since(self, tok: Token) -> Window:
        return Since(_date(_string(tok), tok.start_pos or 0))

    @v_args(inline=True)
    def event_spec(self, etype: Token, where: Node | None, window: Window) -> EventSpec:
        return EventSpec(str(etype), where, window)

    @v_args(inline=True)
    def follower(self, etype: Token, where: Node | None) -> EventSpec:
        return EventSpec(str(etype), where, None)

    @v_args(inline=True)
    def event_exists(self, spec: EventSpec) -> Node:
        return EventExists(spec)

    @v_args(inline=True)
    def followed(self, first: EventSpec, then: EventSpec, gap: Token) -> Node:
        return Sequence(first, then, _duration(gap), negated=False)

    @v_args(inline=True)
    def not_followed(self, first: EventSpec, then: EventSpec, gap: Token) -> Node:
        return Sequence(first, then, _duration(gap), negated=True)

    @v_args(inline=True)
    def agg_count(self, name: Token, spec: EventSpec) -> tuple[str, str | None, EventSpec]:
        if str(name) != "count":
            _fail(name.start_pos or 0, f"unknown aggregate {str(name)!r}(event ...): expected count(event ...)")
        return ("count", None, spec)

    @v_args(inline=True)
    def agg_field(self, name: Token, fld: Token, spec: EventSpec) -> tuple[str, str | None, EventSpec]:
        if str(name) not in ("sum", "avg", "min", "max"):
            _fail(name.start_pos or 0,
                  f"unknown aggregate {str(name)!r}(field of event ...): expected sum, avg, min or max")
        return (str(name), str(fld), spec)

    @v_args(inline=True)
    def agg_compare(self, agg: tuple[Any, str | None, EventSpec], op: Token, num: Token) -> Node:
        value = cast(int | float, self.number(num))
        return Aggregate(agg[0], agg[1], agg[2], cast(CompareOp, str(op)), value)


_TRANSFORMER = _ToAst()


def grammar_rules() -> frozenset[str]:
    """The grammar's rules that build a condition node (alternatives of or_expr, and_expr, not_expr and atom with a
    transformer method; `call` is the `Call` hooks' rule): what a `Rule` parse hook may name."""
    names = {str(r.alias or r.origin.name) for r in _LARK.rules
             if str(r.origin.name) in ("or_expr", "and_expr", "not_expr", "atom")}
    return frozenset(n for n in names if n != "call" and callable(getattr(_ToAst, n, None)))


def _expected(names: set[str] | frozenset[str]) -> str:
    out = set()
    for n in names:
        if n in _TERMINAL_NAMES:
            out.add(_TERMINAL_NAMES[n])
            continue
        try:
            pat = _LARK.get_terminal(n).pattern
            out.add(repr(pat.value) if pat.type == "str" else n)
        except KeyError:
            out.add(n)
    return ", ".join(sorted(out)) or "nothing"


def _parse_raw(text: str) -> Node:
    """Parse, raising _QueryError(char offset, message)."""
    try:
        tree = _LARK.parse(text)
    except UnexpectedCharacters as e:
        pos = e.pos_in_stream or 0
        ch = text[pos] if pos < len(text) else ""
        if ch == '"':
            _fail(pos, "unterminated string (missing closing \")")
        _fail(pos, f"unexpected character {ch!r}; expected {_expected(e.allowed or set())}")
    except UnexpectedEOF as e:
        _fail(len(text), f"unexpected end of query; expected {_expected(set(e.expected))}")
    except UnexpectedToken as e:
        tok = e.token
        pos = len(text) if tok.type == "$END" else (tok.start_pos or 0)
        got = "end of query" if tok.type == "$END" else repr(str(tok))
        _fail(pos, f"unexpected {got}; expected {_expected(e.expected)}")
    except UnexpectedInput as e:  # pragma: no cover - lark raises one of the above
        _fail(getattr(e, "pos_in_stream", 0) or 0, str(e))
    try:
        return _TRANSFORMER.transform(cast(Tree[Token], tree))
    except VisitError as e:
        if isinstance(e.orig_exc, _QueryError):
            raise e.orig_exc from None
        raise


def _line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of a char offset."""
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def parse_query(text: str, *, file: str | None = None, line_offset: int = 0, col_offset: int = 0) -> Node:
    """Parse query text to its AST; SegmentSyntaxError(file, line, column) says where and what was expected.

    line_offset/col_offset shift positions when the text sits inside a bigger file (column offset applies
    to the first line only).
    """
    try:
        return _parse_raw(text)
    except _QueryError as e:
        line, col = _line_col(text, e.pos)
        if line == 1:
            col += col_offset
        raise SegmentSyntaxError(e.message, file=file, line=line + line_offset, column=col) from None


def parse_query_mapped(text: str, locate: Callable[[int], tuple[int, int]], file: str | None) -> Node:
    """Parse text whose char offsets map to file (line, column) through `locate` (used for YAML scalars)."""
    try:
        return _parse_raw(text)
    except _QueryError as e:
        line, col = locate(e.pos)
        raise SegmentSyntaxError(e.message, file=file, line=line, column=col) from None
