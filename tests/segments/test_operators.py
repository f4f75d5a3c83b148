"""The operator registry: a new operator is declared in one place and works in the parser, the engine, the
reference and the pre-check; one lacking a part is refused when it registers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.model import Scalar
from pipeline.segments import SegmentEngine, parse_query, to_text
from pipeline.segments.columnar import Precheck
from pipeline.segments.nodes import value_text
from pipeline.segments.operators import (
    PER_VALUE,
    UNKNOWN,
    Call,
    Operator,
    PathArg,
    Rule,
    ValueTest,
    register,
    unregister,
)
from pipeline.segments.reference import reference_evaluate
from pipeline.state.codec import encode_profile, profile_body

from .helpers import DAY, audience, make_profile

NOW = 100 * DAY


# ---- the whole of a new operator: `endsWith(path, "text")` ----

@dataclass(frozen=True)
class EndsWith:
    """`endsWith(path, "x")` on string values."""

    path: str
    suffix: str


def _build(args: list[Any], pos: int) -> EndsWith | None:
    if len(args) == 2 and isinstance(args[0], PathArg) and type(args[1]) is str:
        return EndsWith(str(args[0]), args[1])
    return None


def _predicate(n: EndsWith) -> Any:
    suffix = n.suffix
    return lambda x: type(x) is str and x.endswith(suffix)


def _reference(n: EndsWith, x: Scalar) -> bool:
    return isinstance(x, str) and len(x) >= len(n.suffix) and x[len(x) - len(n.suffix):] == n.suffix


ENDS_WITH = Operator(
    node=EndsWith, parse=Call("endsWith", '(path, "text")', _build),
    text=lambda n: f"endsWith({n.path}, {value_text(n.suffix)})", path=lambda n: n.path,
    value=ValueTest(predicate=_predicate, reference=_reference, columnar=PER_VALUE))


@pytest.fixture
def ends_with() -> Iterator[None]:
    register(ENDS_WITH)
    try:
        yield
    finally:
        unregister(EndsWith)


def _profiles() -> list[Any]:
    return [
        make_profile({"web.page": "/docs/a.pdf"}, [("download", NOW - DAY, {"file": "b.pdf"})]),
        make_profile({"web.page": "/docs/a.html"}, [("download", NOW - DAY, {"file": "b.pdf"})]),
        make_profile({"web.page": "/x.pdf"}, [("download", NOW - DAY, {"file": "b.zip"})]),
        make_profile({"web.page": 7}, [("download", NOW - 9 * DAY, {"file": "old.pdf"})]),
    ]


def _everywhere(auds: list[Any], profiles: list[Any]) -> tuple[list[list[bool]], list[list[bool]], list[Any]]:
    """(engine, reference, pre-check (known, value)) per audience, over the profiles."""
    engine = SegmentEngine(auds)
    compiled = [[d.qualified for d in engine.evaluate(p, NOW)] for p in profiles]
    ref = [[reference_evaluate(auds, p, NOW)[a.id] for a in auds] for p in profiles]
    check = Precheck(engine)
    bodies = [profile_body(encode_profile(p)) for p in profiles]
    tri = check.evaluate(check.columns(bodies), NOW)  # type: ignore[arg-type]
    return compiled, ref, [(tri[a.id].known.tolist(), tri[a.id].value.tolist()) for a in auds]


def test_an_operator_declared_in_one_place_works_in_every_evaluator(ends_with: None) -> None:
    # Given endsWith(), declared only above, in an attribute condition and in a where-condition
    query = 'endsWith(web.page, ".pdf") and event download where endsWith(file, ".pdf") within 7d'
    auds = [audience("pdf", query)]
    # When the query is parsed and printed, and evaluated by the engine, the reference and the pre-check
    ast = parse_query(query)
    compiled, ref, columnar = _everywhere(auds, _profiles())
    # Then it round-trips, and all three agree: only the first profile has a .pdf page and a recent .pdf download
    assert to_text(ast) == 'endsWith(web.page, ".pdf") and (event download where (endsWith(file, ".pdf")) within 7d)'
    assert parse_query(to_text(ast)) == ast
    assert compiled == ref == [[True], [False], [False], [False]]
    assert columnar == [([True, True, True, True], [True, False, False, False])]


def test_an_operator_the_precheck_cannot_decide_sends_its_profiles_to_the_full_path() -> None:
    # Given the same operator with columnar UNKNOWN, at top level and inside a where-condition
    register(Operator(node=EndsWith, parse=Call("endsWith", '(path, "text")', _build), text=ENDS_WITH.text,
                      path=ENDS_WITH.path,
                      value=ValueTest(predicate=_predicate, reference=_reference, columnar=UNKNOWN)))
    try:
        auds = [audience("page", 'endsWith(web.page, ".pdf")'),
                audience("file", 'event download where endsWith(file, ".pdf") within 7d'),
                audience("either", 'loyalty.tier = "gold" or endsWith(web.page, ".pdf")')]
        # When the three evaluators run
        compiled, ref, columnar = _everywhere(auds, _profiles())
    finally:
        unregister(EndsWith)
    # Then engine and reference agree, and the pre-check knows none of them (no profile has the gold tier)
    assert compiled == ref == [[True, True, True], [False, True, False], [True, False, True], [False, False, False]]
    assert columnar == [([False] * 4, [False] * 4)] * 3


@pytest.mark.parametrize(("parts", "missing"), [
    ({"reference": None}, "lacks its reference part"),
    ({"columnar": None}, "lacks its columnar part"),
    ({"compile": None, "columnar": None}, "lacks its compile, columnar parts"),
    ({"parse": None}, "lacks its parse part"),
    ({"text": None}, "lacks its text part"),
])
def test_an_operator_lacking_a_part_is_refused_at_registration(parts: dict[str, Any], missing: str) -> None:
    # Given a node type that declares every part but some
    full: dict[str, Any] = {
        "parse": Call("endsWith", '(path, "text")', _build), "text": ENDS_WITH.text, "path": ENDS_WITH.path,
        "compile": lambda n, label: (lambda ctx: (False, None, None, label)),
        "reference": lambda n, ref: False, "columnar": UNKNOWN}
    # When it registers
    with pytest.raises(ConfigError) as err:
        register(Operator(node=EndsWith, **{**full, **parts}))
    # Then it is refused, naming what is missing and what every operator declares; nothing was registered
    assert str(err.value) == (f"segment operator EndsWith {missing}; every operator declares parse, text, compile, "
                              "reference, columnar (columnar may be UNKNOWN), or parse, text and a `value` test")
    with pytest.raises(ConfigError, match="unknown function 'endsWith'"):
        parse_query('endsWith(a, "b")')


def test_an_operator_the_parser_does_not_know_is_refused() -> None:
    # Given an operator whose parse hook names no rule of the grammar
    op = Operator(node=EndsWith, parse=Rule("ends_with"), text=ENDS_WITH.text, path=ENDS_WITH.path,
                  value=ENDS_WITH.value)
    # When it registers, Then it is refused with the rules there are
    with pytest.raises(ConfigError) as err:
        register(op)
    assert str(err.value) == (
        "segment operator EndsWith: the parser has no rule Rule(name='ends_with'); a new operator is written as a "
        "function, parse=Call(...), or one of agg_compare, and_expr, compare, event_exists, exists, false_, followed, "
        "in_list, not_, not_followed, or_expr, true_")


def test_a_function_name_is_taken_once() -> None:
    # Given startsWith() and count(), taken by the language
    for name, why in (("startsWith", "is already StartsWith"), ("count", "is a word of the language")):
        op = Operator(node=EndsWith, parse=Call(name, "(path)", _build), text=ENDS_WITH.text, path=ENDS_WITH.path,
                      value=ENDS_WITH.value)
        # When another operator claims the name, Then it is refused
        with pytest.raises(ConfigError, match=why):
            register(op)
