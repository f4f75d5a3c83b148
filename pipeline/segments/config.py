"""Audience definitions: the segments YAML file, its validation and the inSegment() dependency order."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.segments.nodes import Node, segment_refs
from pipeline.segments.parser import parse_query_mapped

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_KEYS = ("id", "name", "description", "version", "query", "attributes")


@dataclass(frozen=True)
class AudienceDef:
    """One audience: its query (text and parsed AST) and the attributes carried in membership messages."""

    id: str
    name: str
    description: str
    query: str
    version: int
    attributes: tuple[str, ...]
    ast: Node
    # Where it was defined, for error messages; not part of equality.
    file: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)


def load_segments(path: str | pathlib.Path) -> list[AudienceDef]:
    """Load and validate a segments YAML file; ConfigError (file, line) on any problem."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read segments file: {e.strerror}", file=str(p)) from None
    return load_segments_text(text, file=str(p))


def load_segments_text(text: str, file: str = "<string>") -> list[AudienceDef]:
    """Load and validate segments YAML given as text."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"invalid YAML: {e.problem or e.context}", file=file,
                          line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", file=file) from None
    finally:
        loader.dispose()
    if root is None or not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise ConfigError("expected a mapping with an 'audiences' list", file=file, line=_line(root))
    if set(data) - {"audiences"}:
        extra = sorted(str(k) for k in set(data) - {"audiences"})
        raise ConfigError(f"unknown top-level key(s) {extra}; valid: audiences", file=file, line=_line(root))
    seq_node = _child(root, "audiences")
    items = data.get("audiences")
    if seq_node is None or not isinstance(seq_node, yaml.SequenceNode) or not isinstance(items, list):
        raise ConfigError("'audiences' must be a list", file=file, line=_line(seq_node or root))

    out: list[AudienceDef] = []
    seen: dict[str, int] = {}
    for node, item in zip(seq_node.value, items, strict=True):
        a = _audience(node, item, text, file)
        if a.id in seen:
            raise ConfigError(f"duplicate audience id {a.id!r} (first defined at line {seen[a.id]})",
                              file=file, line=_line(node))
        seen[a.id] = _line(node) or 0
        out.append(a)
    dependency_order(out)
    return out


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _child(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None


def _audience(node: yaml.Node, item: Any, text: str, file: str) -> AudienceDef:
    line = _line(node)
    if not isinstance(node, yaml.MappingNode) or not isinstance(item, dict):
        raise ConfigError("each audience must be a mapping with id and query", file=file, line=line)
    unknown = sorted(str(k) for k in item if k not in _KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; valid: {', '.join(_KEYS)}", file=file, line=line)

    def where(key: str) -> int | None:
        return _line(_child(node, key)) or line

    aid = item.get("id")
    if not isinstance(aid, str) or not _ID.fullmatch(aid):
        raise ConfigError(f"audience id must be a non-empty string of letters, digits, '_', '.', '-'; got {aid!r}",
                          file=file, line=where("id"))
    query = item.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"audience {aid!r} has no query", file=file, line=where("query"))
    name = item.get("name", aid)
    description = item.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ConfigError(f"audience {aid!r}: name and description must be strings", file=file, line=line)
    version = item.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"audience {aid!r}: version must be an integer >= 1, got {version!r}",
                          file=file, line=where("version"))
    attrs = item.get("attributes", [])
    if not isinstance(attrs, list) or not all(isinstance(x, str) and x for x in attrs):
        raise ConfigError(f"audience {aid!r}: attributes must be a list of attribute paths",
                          file=file, line=where("attributes"))
    qnode = _child(node, "query")
    assert qnode is not None
    ast = parse_query_mapped(query, _locator(text, qnode, query), file)
    return AudienceDef(aid, name, description, query, version, tuple(attrs), ast, file=file,
                       line=_line(qnode))


def _locator(text: str, qnode: yaml.Node, value: str) -> Callable[[int], tuple[int, int]]:
    """Map a char offset of a YAML scalar's value to its (line, column) in the file.

    Walks the raw source of the scalar matching the value's characters in order, so plain, quoted and
    block scalars all work (positions inside escape sequences or folded line breaks are approximate).
    """
    start, end = qnode.start_mark.index, qnode.end_mark.index

    def locate(pos: int) -> tuple[int, int]:
        j = start
        for ch in value[:pos]:
            k = text.find(ch, j, end)
            if k >= 0:
                j = k + 1
        # Skip raw-only characters (quotes, block header, indentation) up to the offending character.
        if pos < len(value):
            k = text.find(value[pos], j, end)
            if k >= 0:
                j = k
        line = text.count("\n", 0, j) + 1
        return line, j - (text.rfind("\n", 0, j) + 1) + 1

    return locate


def dependency_order(audiences: Sequence[AudienceDef]) -> list[str]:
    """Audience ids with every inSegment() dependency first (stable in definition order).

    ConfigError for an unknown audience in inSegment() or a cycle.
    """
    by_id = {a.id: a for a in audiences}
    for a in audiences:
        for ref in segment_refs(a.ast):
            if ref.audience_id not in by_id:
                raise ConfigError(f"audience {a.id!r}: inSegment({ref.audience_id!r}) names an unknown audience; "
                                  f"valid: {', '.join(sorted(by_id)) or '(none)'}", file=a.file, line=a.line)
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(aid: str, path: list[str]) -> None:
        st = state.get(aid)
        if st == 2:
            return
        if st == 1:
            cycle = path[path.index(aid):] + [aid]
            a = by_id[path[-1]]
            raise ConfigError(f"inSegment() cycle: {' -> '.join(cycle)}", file=a.file, line=a.line)
        state[aid] = 1
        for ref in segment_refs(by_id[aid].ast):
            visit(ref.audience_id, path + [aid])
        state[aid] = 2
        order.append(aid)

    for a in audiences:
        visit(a.id, [])
    return order
