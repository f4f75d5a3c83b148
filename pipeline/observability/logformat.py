"""How every process logs (PIPELINE_LOG_FORMAT): text lines, or one JSON object a line with the worker's name and,
where a message is being handled, its topic, partition, offset and event / record id (never a personal value)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

# The message being handled in this task (ingest record, stage message): what a JSON line says it is about.
# Only ids: topic, partition, offset, event_id, record_id, profile_id (generated), never an identity value.
_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("cdp_log_context", default=None)


@contextlib.contextmanager
def message_context(**fields: Any) -> Iterator[None]:
    """Within the block, log records carry these fields (added to those of an enclosing block)."""
    outer = _CONTEXT.get()
    token = _CONTEXT.set({**outer, **fields} if outer else fields)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def add_to_context(**fields: Any) -> None:
    """Add fields to the current block's (known only once the message is decoded, e.g. its event id)."""
    current = _CONTEXT.get()
    if current is not None:
        current.update(fields)


class ContextFilter(logging.Filter):
    """Puts the process's name (`worker`) and the current message's ids on every record it sees."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        for key, value in (_CONTEXT.get() or {}).items():
            setattr(record, key, value)
        return True


def json_formatter() -> logging.Formatter:
    """`time`, `level`, `logger`, `message`, then the filter's fields (and `exc_info` as text, if any)."""
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         datefmt="%Y-%m-%dT%H:%M:%S%z")


def configure(log_format: str, worker: str, level: int | str = logging.INFO) -> None:
    """The root logger of a CLI command or the destination runner: one handler on stderr in this format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def faust_logging_config(log_format: str, worker: str, level: str) -> dict[str, Any] | None:
    """The `logging_config` for faust.Worker (it sets logging up again when it starts), None for its own text
    format. JSON lines go to stdout, where Faust's text would."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter, "worker": worker}},
        "formatters": {"json": {"()": json_formatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                                 "formatter": "json", "filters": ["context"], "level": level.upper()}},
        "root": {"level": level.upper(), "handlers": ["default"]},
    }
