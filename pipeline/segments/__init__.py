"""Audiences: the segment query language, its compiled evaluation and membership transitions."""

from pipeline.segments.config import AudienceDef, dependency_order, load_segments, load_segments_text
from pipeline.segments.engine import Decision, Explanation, SegmentEngine
from pipeline.segments.membership import apply_decisions, exit_all, idempotency_key
from pipeline.segments.nodes import Node, to_text
from pipeline.segments.parser import parse_query

# Registers the built-in operators: every use of the language goes through this package first.
import pipeline.segments.builtin  # noqa: E402, F401  # isort: skip

__all__ = [
    "AudienceDef",
    "Decision",
    "Explanation",
    "Node",
    "SegmentEngine",
    "apply_decisions",
    "dependency_order",
    "exit_all",
    "idempotency_key",
    "load_segments",
    "load_segments_text",
    "parse_query",
    "to_text",
]
