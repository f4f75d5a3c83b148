"""The one backoff policy: exponential delays with full jitter (retries) or without (periodic reports)."""

from __future__ import annotations

import random


def full_jitter_s(attempt: int, base_ms: float, max_ms: float, rng: random.Random | None = None) -> float:
    """The delay before retry `attempt` (1-based): uniform(0, min(max, base * 2**(attempt-1))) milliseconds,
    in seconds. Full jitter spreads the retries of many clients that failed together (AWS's analysis)."""
    cap = min(float(max_ms), base_ms * (2.0 ** max(0, attempt - 1)))
    return (rng or random).uniform(0.0, cap) / 1000.0


class Backoff:
    """Successive delays `first_s`, `first_s * factor`, ... capped at `max_s`; `jitter` draws each one
    uniformly from [delay / 2, delay] instead (retries of a shared dependency). `reset()` starts over."""

    def __init__(self, first_s: float, max_s: float, factor: float = 2.0, jitter: bool = False,
                 rng: random.Random | None = None) -> None:
        self.first_s, self.max_s, self.factor, self.jitter = first_s, max_s, factor, jitter
        self._rng = rng or random.Random()
        self._next = first_s

    def next(self) -> float:
        """The next delay, in seconds."""
        delay = self._next
        self._next = min(self.max_s, self._next * self.factor)
        return self._rng.uniform(delay / 2, delay) if self.jitter else delay

    def reset(self) -> None:
        self._next = self.first_s
