"""Consent at activation: what a destination's consent rule says of a value, and which attributes every
membership message must carry so that each destination can check its rule on every message."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.errors import ConfigError
from pipeline.model import Scalar

if TYPE_CHECKING:  # pipeline.destinations imports this module (its mapping decides with it)
    from pipeline.destinations.config import ConsentConfig, DestinationConfig

log = logging.getLogger(__name__)

Verdict = Literal["granted", "denied", "unknown"]
Flip = Literal["withdrawn", "granted"]

# Payload reasons of the membership changes a consent change causes at one destination.
REASON_WITHDRAWN = "consent_withdrawn"
REASON_GRANTED = "consent_granted"


def verdict(rule: ConsentConfig, value: Scalar) -> Verdict:
    """A value's meaning to the rule: no value (absent or null) is `unknown`, a deny value `denied`."""
    if value is None:
        return "unknown"
    return "denied" if rule.denies(value) else "granted"


def permits(rule: ConsentConfig, value: Scalar) -> bool:
    """Whether a membership may be activated: granted, or unknown where the rule allows a missing value."""
    v = verdict(rule, value)
    return v == "granted" or (v == "unknown" and rule.on_missing == "allow")


def flip(rule: ConsentConfig, attributes: Mapping[str, Scalar], changed: Iterable[str],
         previous: Mapping[str, Scalar] | None) -> Flip | None:
    """Whether a profile change withdrew or granted consent for the rule's destination.

    Only a change of the rule's attribute can; `previous` holds the values before the change of the changed
    consent attributes. Without it (a message from a worker that did not know the rule) the change is taken
    as a flip to what the new value says, so withdrawal is never missed (a redundant exit is harmless)."""
    if rule.attribute not in set(changed):
        return None
    now = permits(rule, attributes.get(rule.attribute))
    if previous is not None and rule.attribute in previous and permits(rule, previous[rule.attribute]) == now:
        return None
    return "granted" if now else "withdrawn"


def carried_attributes(destinations: Iterable[DestinationConfig]) -> tuple[str, ...]:
    """The attributes the destinations' consent rules read, sorted, each once."""
    return tuple(sorted({d.consent.attribute for d in destinations if d.consent is not None}))


class ConsentAttributes:
    """The consent attributes of a destinations file (none while it is missing), read again when it changes.
    A file that does not load is logged with file and line, and the attributes loaded before stay."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.attributes: tuple[str, ...] = ()
        self._stamp: tuple[int, int] | None = None

    def refresh(self, *, strict: bool = False) -> bool:
        """Read the file if it changed since the last call; True when the attributes changed. `strict` (at
        start-up): a file that does not load raises its ConfigError."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        from pipeline.destinations.config import load_destinations

        try:
            # The worker never sends to a destination: header secrets (${VAR}) are not resolved.
            new = carried_attributes(load_destinations(self.path, resolve_env=False)) if stamp else ()
        except (ConfigError, OSError) as exc:
            if strict:
                raise
            log.error("consent rules not reloaded, keeping %s: %s", list(self.attributes), exc)
            return False
        changed, self.attributes = new != self.attributes, new
        return changed
