"""The console's audience editing: a query checked as it is typed, and an audience put into the segments file."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.segments import load_segments_text
from pipeline.segments.editing import AudienceEdit, check_query, put_audience

RETENTION = 90 * 86_400_000
FILE = """# my audiences
audiences:
  - id: gold
    name: Gold
    query: loyalty.tier = "gold"   # the top tier

  # shoppers
  - id: shoes
    query: count(event productView where product.category = "shoes" within 7d) >= 3
"""


def current() -> list:  # type: ignore[type-arg]
    return load_segments_text(FILE)


def test_a_syntax_error_has_its_line_and_column_inside_the_query() -> None:
    check = check_query("x", 'loyalty.tier = "gold" and\n  foo(', current(), history_retention_ms=RETENTION)
    assert check.to_dict() == {
        "audience_id": "x", "valid": False, "streaming": False, "batch": False, "edge": False, "reason": "",
        "errors": [{"message": "unexpected end of query; expected ')', 'event', 'false', 'true', a duration like 7d, "
                               "a name/path, a number, a string", "line": 2, "column": 7}]}


def test_an_unknown_audience_and_a_cycle_are_problems_without_a_position() -> None:
    unknown = check_query("x", 'inSegment("nope")', current(), history_retention_ms=RETENTION)
    assert [(p.line, p.column) for p in unknown.problems] == [(None, None)]
    assert "inSegment('nope') names an unknown audience" in unknown.problems[0].message
    with_vip = load_segments_text(FILE + '  - id: vip\n    query: inSegment("gold")\n')
    cycle = check_query("gold", 'inSegment("vip")', with_vip, history_retention_ms=RETENTION)
    assert cycle.problems[0].message == "inSegment() cycle: gold -> vip -> gold"


def test_a_valid_query_says_its_evaluation_kind_and_why() -> None:
    events = check_query("x", "event pageView within 24h", current(), history_retention_ms=RETENTION).to_dict()
    assert (events["valid"], events["streaming"], events["batch"], events["edge"]) == (True, True, True, False)
    assert events["reason"] == ("streaming: every event window fits in the 90d event history; "
                                "not edge: reads event windows (pageView)")
    old = check_query("x", "event pageView within 200d", current(), history_retention_ms=RETENTION).to_dict()
    assert (old["streaming"], old["edge"]) == (False, False)
    assert old["reason"].startswith("batch only: window 200d of event pageView exceeds event-history retention 90d")
    edge = check_query("gold", 'inSegment("shoes") and loyalty.tier = "gold"', current(),
                       history_retention_ms=RETENTION)
    assert (edge.valid, edge.edge) == (True, True)


def test_putting_a_changed_audience_replaces_it_in_place_and_bumps_its_version() -> None:
    new, saved = put_audience(FILE, AudienceEdit("gold", 'loyalty.tier = "platinum"', "Platinum"))
    assert new == FILE.replace('''    name: Gold
    query: loyalty.tier = "gold"   # the top tier
''', '''    name: Platinum
    version: 2
    query: loyalty.tier = "platinum"
''')
    assert (saved.id, saved.version, saved.query) == ("gold", 2, 'loyalty.tier = "platinum"')
    # the same query again: the same version
    again, same = put_audience(new, AudienceEdit("gold", 'loyalty.tier = "platinum"'))
    assert (again, same.version) == (new, 2)


def test_putting_a_new_audience_appends_it() -> None:
    new, saved = put_audience(FILE, AudienceEdit("silver", 'loyalty.tier = "silver"', "Silver"))
    assert new == FILE + '\n  - id: silver\n    name: Silver\n    query: loyalty.tier = "silver"\n'
    assert saved.version == 1
    assert put_audience("", AudienceEdit("a", "loyalty.points > 1"))[0] == (
        "audiences:\n  - id: a\n    name: a\n    query: loyalty.points > 1\n")


def test_a_query_of_several_lines_is_written_as_a_literal_block() -> None:
    new, saved = put_audience(FILE, AudienceEdit("two", 'loyalty.tier = "gold" and\nloyalty.points > 5'))
    assert new.endswith('  - id: two\n    name: two\n    query: |-\n      loyalty.tier = "gold" and\n'
                        '      loyalty.points > 5\n')
    assert saved.query == 'loyalty.tier = "gold" and\nloyalty.points > 5'


def test_a_file_that_would_not_load_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown audience"):
        put_audience(FILE, AudienceEdit("gold", 'inSegment("nope")'))
