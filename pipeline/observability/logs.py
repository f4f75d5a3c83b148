"""Client-library log lines that repeat during an outage (librdkafka, aiokafka, Faust's transport) are throttled here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.backoff import Backoff

# A repeated line is let through once, then once per window: 10 s, 20 s, 40 s ... at most every 5 min.
FIRST_WINDOW_S = 10.0
MAX_WINDOW_S = 300.0
# Every library logger under these names reports broker connections (each failed attempt, fetch, heartbeat...).
THROTTLED_PREFIXES = ("aiokafka", "faust.transport", "pipeline.librdkafka")
# What every confluent-kafka client of the pipeline logs through (`client_config`).
LIBRDKAFKA = logging.getLogger("pipeline.librdkafka")


@dataclass
class _Window:
    backoff: Backoff
    until: float  # repeats are dropped until then
    opened: float
    last_seen: float
    dropped: int = 0


class Throttle(logging.Filter):
    """At most one record (WARNING and above) per logger and message template per window; the window grows
    while the same line keeps coming and starts over after a quiet window. The record let through at the end
    of a window says how many were dropped. Below WARNING everything passes."""

    def __init__(self, first_s: float = FIRST_WINDOW_S, max_s: float = MAX_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.first_s, self.max_s, self._clock = first_s, max_s, clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self.dropped = 0  # in all, since start

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self._clock()
        key = (record.name, _template(record))
        w = self._windows.get(key)
        if w is not None and now < w.until:
            w.dropped += 1
            w.last_seen = now
            self.dropped += 1
            return False
        if w is not None and w.dropped:
            record.msg = f"{record.getMessage()} [{w.dropped} more like this in {now - w.opened:.0f} s not logged]"
            record.args = ()  # (not None: mode's formatter would wrap it in a tuple and format again)
        if w is None or now - w.last_seen > w.until - w.opened:  # new, or quiet for a window: start over
            backoff = Backoff(self.first_s, self.max_s)
            self._windows[key] = _Window(backoff, now + backoff.next(), now, now)
        else:
            w.opened, w.until, w.last_seen, w.dropped = now, now + w.backoff.next(), now, 0
        return True


def _template(record: logging.LogRecord) -> str:
    """What makes two records 'the same line': the unformatted message, and for librdkafka (which logs every
    line as '%s [%s] %s' % (facility, client, text)) the facility, e.g. FAIL for a failed connection."""
    if record.name == LIBRDKAFKA.name and isinstance(record.args, tuple) and record.args:
        return str(record.args[0])
    return record.msg if isinstance(record.msg, str) else type(record.msg).__name__


THROTTLE = Throttle()
LIBRDKAFKA.addFilter(THROTTLE)


def throttle_library_loggers(prefixes: tuple[str, ...] = THROTTLED_PREFIXES) -> int:
    """Put THROTTLE on every existing logger under `prefixes` (a logger's filter sees only its own records,
    not its children's, so each one needs it). Idempotent; call it once the libraries are imported.
    Returns the number of loggers throttled."""
    n = 0
    for name in list(logging.root.manager.loggerDict):
        logger = logging.root.manager.loggerDict[name]
        if isinstance(logger, logging.Logger) and name.startswith(prefixes):
            if THROTTLE not in logger.filters:
                logger.addFilter(THROTTLE)
            n += 1
    return n


def log_client_error(err: Any) -> None:
    """The default `error_cb` of the pipeline's confluent-kafka clients: through the throttled logger, one
    template per error code (a connection failure does not hide a different error)."""
    if err.fatal():
        LIBRDKAFKA.error(f"fatal client error {err.name()}: %s", err.str())
    else:
        LIBRDKAFKA.warning(f"client error {err.name()}: %s", err.str())
