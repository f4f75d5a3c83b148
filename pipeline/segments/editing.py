"""Audience editing for the console: check a query as it is typed, and put an audience into the segments file."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.segments.config import _ID, AudienceDef, load_segments_text
from pipeline.segments.engine import SegmentEngine
from pipeline.segments.parser import parse_query

MAX_QUERY_CHARS = 8192


@dataclass(frozen=True)
class QueryProblem:
    """What is wrong with a query; line and column inside the query text (1-based), None when not positional."""

    message: str
    line: int | None = None
    column: int | None = None


@dataclass
class QueryCheck:
    """A checked query: its problems, or the evaluation modes it is eligible for and why."""

    audience_id: str
    problems: list[QueryProblem] = field(default_factory=list)
    streaming: bool = False
    batch: bool = False
    edge: bool = False
    reason: str = ""
    engine: SegmentEngine | None = None  # the current audiences with this one, when it is valid

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"audience_id": self.audience_id, "valid": self.valid,
                "errors": [{"message": p.message, "line": p.line, "column": p.column} for p in self.problems],
                "streaming": self.streaming, "batch": self.batch, "edge": self.edge, "reason": self.reason}


def check_query(audience_id: str, query: str, current: Sequence[AudienceDef], *,
                history_retention_ms: int) -> QueryCheck:
    """Parse `query` as the audience `audience_id` next to the `current` audiences (replacing one of the same id)
    and explain its evaluation kind; every problem is returned, never raised."""
    out = QueryCheck(audience_id)
    if not _ID.fullmatch(audience_id):
        out.problems.append(QueryProblem("an audience id is letters, digits, '_', '.', '-' (a letter or digit first)"))
    if len(query) > MAX_QUERY_CHARS:
        out.problems.append(QueryProblem(f"the query is over {MAX_QUERY_CHARS} characters"))
    if not query.strip():
        out.problems.append(QueryProblem("the query is empty", 1, 1))
    if out.problems:
        return out
    try:
        ast = parse_query(query)
    except ConfigError as exc:
        out.problems.append(QueryProblem(exc.problem, exc.line, exc.column))
        return out
    old = next((a for a in current if a.id == audience_id), None)
    version = old.version + (old.query != query) if old else 1
    mine = AudienceDef(audience_id, old.name if old else audience_id, old.description if old else "", query,
                       version, old.attributes if old else (), ast)
    audiences = [mine if a.id == audience_id else a for a in current] + ([] if old else [mine])
    try:
        engine = SegmentEngine(audiences, history_retention_ms=history_retention_ms)
    except ConfigError as exc:  # an unknown inSegment() audience, a cycle
        out.problems.append(QueryProblem(exc.problem))
        return out
    e = engine.explain(audience_id)[0]
    out.streaming, out.batch, out.edge, out.reason, out.engine = e.streaming, e.batch, e.edge, e.reason, engine
    return out


@dataclass(frozen=True)
class AudienceEdit:
    """An audience as the console saves it."""

    id: str
    query: str
    name: str = ""
    description: str = ""
    attributes: tuple[str, ...] = ()


def put_audience(text: str, edit: AudienceEdit, file: str = "segments.yaml") -> tuple[str, AudienceDef]:
    """The segments file `text` with `edit` added (at the end) or replacing the audience of its id (in place, the
    rest of the file, comments included, as it was); its version goes up by one when its query changes.
    ConfigError (file, line) when the result would not load: nothing is written from an invalid file."""
    current = {a.id: a for a in load_segments_text(text, file=file)} if text.strip() else {}
    old = current.get(edit.id)
    version = (old.version + (old.query != edit.query)) if old else 1
    item: dict[str, Any] = {"id": edit.id, "name": edit.name or (old.name if old else edit.id)}
    description = edit.description or (old.description if old else "")
    if description:
        item["description"] = description
    if version > 1:
        item["version"] = version
    item["query"] = edit.query
    attributes = edit.attributes or (old.attributes if old else ())
    if attributes:
        item["attributes"] = list(attributes)
    block = yaml.dump([item], Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    if old is None:
        body = text if text.endswith("\n") or not text else text + "\n"
        new = body + ("\n" if body.strip() else "audiences:\n") + _indent(block, "  ")
    else:
        start, end, indent = _item_span(text, edit.id)
        new = text[:start] + _indent(block, indent).lstrip(" ") + text[end:]
    saved = {a.id: a for a in load_segments_text(new, file=file)}[edit.id]
    return new, saved


class _Dumper(yaml.SafeDumper):
    """A query of several lines as a literal block (`|-`), as a person writes it, not a quoted one-liner."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _indent(block: str, indent: str) -> str:
    return "".join(indent + line if line.strip() else line for line in block.splitlines(keepends=True))


def _item_span(text: str, audience_id: str) -> tuple[int, int, str]:
    """Where the audience's item of the `audiences` list is in `text`: start (its '-'), end (the end of its last
    line) and the indentation of its '-'."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    assert isinstance(root, yaml.MappingNode)
    seq = next(v for k, v in root.value if k.value == "audiences")
    for node in seq.value:
        ids = [v.value for k, v in node.value if k.value == "id"]
        if ids == [audience_id]:
            line_start = text.rfind("\n", 0, node.start_mark.index) + 1
            dash = text.rfind("-", line_start, node.start_mark.index)
            end = node.end_mark.index
            # the end mark of a block mapping is the start of what follows: keep the blank lines and comments
            tail = re.search(r"\n(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*(?:#[^\n]*)?\Z", text[:end])
            if tail is not None:
                end = tail.start() + 1
            return dash, end, text[line_start:dash]
    raise ConfigError(f"no audience {audience_id!r}")
