"""Small helpers to read YAML config through PyYAML's node tree, so every error names file and line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from pipeline.errors import ConfigError

_CONSTRUCTOR = SafeConstructor()
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


@dataclass(frozen=True)
class Doc:
    """The file a node tree came from, used to build located ConfigErrors."""

    file: str

    def error(self, problem: str, node: yaml.Node | None = None) -> ConfigError:
        if node is None:
            return ConfigError(problem, file=self.file)
        # PyYAML marks are 0-based; editors and humans count from 1.
        return ConfigError(problem, file=self.file, line=node.start_mark.line + 1,
                           column=node.start_mark.column + 1)

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping node as {key: (key node, value node)}; rejects non-string and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"{what} must be a mapping", node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(f"{what}: keys must be plain strings", key_node)
            key = str(key_node.value)
            if key in out:
                # PyYAML would silently keep the last one; a duplicate key is almost always a mistake.
                raise self.error(f"{what}: duplicate key {key!r}", key_node)
            out[key] = (key_node, value_node)
        return out

    def check_keys(self, fields: dict[str, tuple[yaml.Node, yaml.Node]], what: str,
                   required: set[str], optional: set[str], node: yaml.Node) -> None:
        for key, (key_node, _) in fields.items():
            if key not in required and key not in optional:
                valid = ", ".join(sorted(required | optional))
                raise self.error(f"{what}: unknown key {key!r}; valid: {valid}", key_node)
        missing = sorted(required - fields.keys())
        if missing:
            raise self.error(f"{what}: missing key(s) {', '.join(missing)}", node)

    def sequence(self, node: yaml.Node, what: str) -> Iterator[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(f"{what} must be a list", node)
        yield from node.value

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(f"{what} must be a single value", node)
        return _CONSTRUCTOR.construct_object(node, deep=True)

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{what} must be a non-empty string", node)
        return value.strip()

    def integer(self, node: yaml.Node, what: str, *, minimum: int | None = None) -> int:
        value = self.scalar(node, what)
        # bool is an int subclass in Python; `yes` must not be accepted as 1.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(f"{what} must be an integer", node)
        if minimum is not None and value < minimum:
            raise self.error(f"{what} must be >= {minimum}", node)
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.error(f"{what} must be true or false", node)
        return value

    def duration_ms(self, node: yaml.Node, what: str) -> int:
        value = self.scalar(node, what)
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None:
            raise self.error(f"{what} must be a duration like 90d, 12h, 30m, 45s or 500ms", node)
        amount = int(match.group(1))
        if amount <= 0:
            raise self.error(f"{what} must be positive", node)
        return amount * _UNIT_MS[match.group(2)]


def compose_file(path: str | Path) -> tuple[Doc, yaml.Node]:
    """Parse a YAML file into its node tree; syntax errors become ConfigErrors with the mark."""
    file = str(path)
    doc = Doc(file)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from exc
    return doc, compose_text(text, file)


def compose_text(text: str, file: str) -> yaml.Node:
    """Parse YAML text (named `file` in errors) into its node tree."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(f"invalid YAML: {exc.problem}", file=file,
                          line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from exc
    if node is None:
        raise ConfigError("the file is empty", file=file)
    return node
