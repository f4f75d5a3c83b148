"""YAML loading that remembers line numbers, so a bad config stops start-up with the file, line and problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


class LineDict(dict[str, Any]):
    """A mapping that knows the 1-based line of itself and of each of its keys."""

    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list[Any]):
    """A sequence that knows its line and the line of each item."""

    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


def _map(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    d = LineDict()
    d.line = node.start_mark.line + 1
    d.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in d:
            raise ConfigError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        d[key] = loader.construct_object(value_node, deep=True)
        d.key_lines[str(key)] = key_node.start_mark.line + 1
    return d


def _seq(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    lst = LineList(loader.construct_object(n, deep=True) for n in node.value)
    lst.line = node.start_mark.line + 1
    lst.item_lines = [n.start_mark.line + 1 for n in node.value]
    return lst


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _seq)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file into LineDict/LineList values; ConfigError with file and line on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from exc
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(exc.problem, file=file, line=exc.line) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(f"invalid YAML: {exc.problem}", file=file,
                          line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from exc


def require(d: LineDict, key: str, types: type | tuple[type, ...], file: str, what: str = "") -> Any:
    """d[key], checked for presence and type, else a ConfigError pointing at the right line."""
    if key not in d:
        raise ConfigError(f"{what}missing required key {key!r}", file=file, line=d.line)
    value = d[key]
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"{what}{key!r} must be {names}, got {type(value).__name__}", file=file,
                          line=d.line_of(key))
    return value


def check_keys(d: LineDict, allowed: set[str], file: str, what: str = "") -> None:
    """Unknown keys are errors (a typo would otherwise be silently ignored)."""
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{what}unknown key {key!r}; valid: {', '.join(sorted(allowed))}", file=file,
                              line=d.line_of(key))
