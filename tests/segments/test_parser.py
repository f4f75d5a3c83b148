"""Parser and segments-file loading: every construct, and each class of error with its position."""

from __future__ import annotations

import pathlib

import pytest

from pipeline.errors import ConfigError, SegmentSyntaxError
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments import load_segments, load_segments_text, parse_query, to_text
from pipeline.segments.nodes import (
    Aggregate,
    And,
    BirthdayWithin,
    Compare,
    Contains,
    DateValue,
    Duration,
    EventExists,
    EventSpec,
    Exists,
    InList,
    InSegment,
    Not,
    Or,
    Sequence,
    Since,
    StartsWith,
    Within,
)

EXAMPLE = EXAMPLE_CONFIG_DIR / "segments.yaml"


@pytest.mark.parametrize("query", [
    'loyalty.tier = "gold"',
    "loyalty.points >= 1000",
    "loyalty.points < -2.5",
    'person.birthDate < date("2000-01-01")',
    "consents.sms != true",
    'loyalty.tier in ["gold", "silver"]',
    "person.city exists",
    'startsWith(web.page.url, "https://")',
    'contains(person.city, "York")',
    "birthdayWithin(person.birthDate, 7d)",
    'event productView where product.category = "shoes" within 30m',
    'event purchase since "2026-01-01"',
    "event login",
    'count(event productView where product.category = "shoes" within 7d) >= 3',
    "sum(commerce.order.total of event purchase within 30d) > 500",
    "avg(commerce.order.total of event purchase within 30d) > 50",
    "min(product.price of event cartAdd within 1h) <= 10",
    "max(product.price of event cartAdd within 12h) = 99.5",
    "event cartAdd within 7d not followed by purchase within 1h",
    "event productView followed by event cartAdd within 10m",
    'inSegment("gold") and not inSegment("churned")',
    '(a = 1 or b = 2) and not (c exists or d = "x")',
])
def test_every_construct_round_trips(query: str) -> None:
    # Given a query, When it is parsed, printed and parsed again, Then the ASTs are equal.
    ast = parse_query(query)
    assert parse_query(to_text(ast)) == ast


def test_asts_of_the_brief_examples() -> None:
    week = Within(Duration(7 * 86_400_000, "7d"))
    assert parse_query('count(event productView where product.category = "shoes" within 7d) >= 3') == Aggregate(
        "count", None, EventSpec("productView", Compare("product.category", "=", "shoes"), week), ">=", 3)
    assert parse_query("event cartAdd within 7d not followed by purchase within 1h") == Sequence(
        EventSpec("cartAdd", None, week), EventSpec("purchase"), Duration(3_600_000, "1h"), negated=True)
    assert parse_query('inSegment("gold") and not inSegment("churned")') == And(
        (InSegment("gold"), Not(InSegment("churned"))))


def test_literals_and_precedence() -> None:
    # not > and > or
    assert parse_query("a = 1 or b = 2 and not c = 3") == Or(
        (Compare("a", "=", 1), And((Compare("b", "=", 2), Not(Compare("c", "=", 3))))))
    # an ISO date string literal is a date
    assert parse_query('d >= "2020-01-31"') == Compare("d", ">=", DateValue(737455))
    assert parse_query('x in ["a", 2, true]') == InList("x", ("a", 2, True))
    assert parse_query('startsWith(u, "h")') == StartsWith("u", "h")
    assert parse_query('contains(u, "h")') == Contains("u", "h")
    assert parse_query("u exists") == Exists("u")
    assert parse_query("birthdayWithin(b, 2d)") == BirthdayWithin("b", 2)
    assert isinstance(parse_query('event p since "2026-01-01"').spec.window, Since)  # type: ignore[union-attr]


def test_where_condition_is_greedy_until_a_window() -> None:
    ast = parse_query("event a where x = 1 and y = 2 within 1h and z = 3")
    assert isinstance(ast, And) and isinstance(ast.items[0], EventExists)
    assert ast.items[0].spec.where == And((Compare("x", "=", 1), Compare("y", "=", 2)))


@pytest.mark.parametrize(("query", "column", "fragment"), [
    ('loyalty.tier = ', 16, "unexpected end of query; expected"),
    ('loyalty.tier == "gold"', 15, "unexpected '='"),
    ('loyalty.tier = "gold', 16, "unterminated string"),
    ("event pageView within 7w", 23, "bad window unit 'w'"),
    ("frobnicate(loyalty.tier)", 1, "unknown function 'frobnicate'"),
    ("count(event a within 1d)", 25, "expected a comparison operator"),
    ("a < true", 3, "booleans only support = and !="),
    ('event a where x = 1 and inSegment("g")', 25, "not allowed inside a where-condition"),
    ('a = date("2021-02-30")', 10, "no such day"),
    ("birthdayWithin(b, 36h)", 1, "whole number of days"),
    ("total(x of event a) > 1", 1, "unknown aggregate 'total'"),
])
def test_syntax_errors_say_where_and_what(query: str, column: int, fragment: str) -> None:
    # Given a bad query at line 10, column 5 of a file, When parsed, Then the error names the position.
    with pytest.raises(SegmentSyntaxError) as info:
        parse_query(query, file="seg.yaml", line_offset=9, col_offset=4)
    err = info.value
    assert fragment in err.problem
    assert (err.file, err.line, err.column) == ("seg.yaml", 10, column + 4)
    assert str(err).startswith(f"seg.yaml:10:{column + 4}: ")


def test_syntax_error_position_inside_yaml_file() -> None:
    # Given a query on line 4 of a YAML file, When it has a bad unit, Then the file position points at it.
    text = 'audiences:\n  - id: a\n    name: A\n    query: event pageView within 7w\n'
    with pytest.raises(SegmentSyntaxError) as info:
        load_segments_text(text, file="segments.yaml")
    assert (info.value.line, info.value.column) == (4, 34)


def test_syntax_error_position_in_quoted_and_block_scalars() -> None:
    quoted = 'audiences:\n  - id: a\n    query: "a = 1 and b = "\n'
    with pytest.raises(SegmentSyntaxError) as info:
        load_segments_text(quoted)
    assert (info.value.line, info.value.column) == (3, 27)
    block = 'audiences:\n  - id: a\n    query: |\n      a = 1 and\n      frob(x)\n'
    with pytest.raises(SegmentSyntaxError) as info:
        load_segments_text(block)
    assert (info.value.line, info.value.column) == (5, 7)


@pytest.mark.parametrize(("text", "fragment", "line"), [
    ('audiences:\n  - id: a\n    query: inSegment("nope")\n', "unknown audience", 3),
    ('audiences:\n  - id: a\n    query: inSegment("b")\n  - id: b\n    query: inSegment("a")\n',
     "cycle: ", None),
    ('audiences:\n  - id: a\n    query: a = 1\n  - id: a\n    query: b = 1\n', "duplicate audience id 'a'", 4),
    ("audiences:\n  - id: a\n    name: A\n", "has no query", 2),
    ("audiences:\n  - id: a\n    query: a = 1\n    version: zero\n", "version must be", 4),
    ("audiences:\n  - id: a\n    query: a = 1\n    qeury: b\n", "unknown key(s) ['qeury']", 2),
    ("audiences: [\n", "invalid YAML", None),
    ("other: 1\n", "unknown top-level key", 1),
])
def test_semantic_errors_are_config_errors_with_file_and_line(text: str, fragment: str, line: int | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_segments_text(text, file="s.yaml")
    assert fragment in info.value.problem
    assert info.value.file == "s.yaml"
    if line is not None:
        assert info.value.line == line
    else:
        assert info.value.line is not None


def test_defaults_and_example_file_loads() -> None:
    [a] = load_segments_text("audiences:\n  - id: x\n    query: a = 1\n")
    assert (a.name, a.description, a.version, a.attributes) == ("x", "", 1, ())
    audiences = load_segments(EXAMPLE)
    ids = [x.id for x in audiences]
    assert len(ids) >= 20 and {"shoe-lovers", "cart-abandoners", "big-spenders", "vip"} <= set(ids)
    assert next(x for x in audiences if x.id == "vip").version == 2


def test_missing_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_segments(tmp_path / "nope.yaml")
