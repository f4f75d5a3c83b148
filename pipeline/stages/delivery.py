"""In-process delivery of stage messages to the partitions a worker holds: the loop `Runtime.local_delivery` runs,
and that the protocol tests (tests/identity/stitch_sim.py) drive with the real handlers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.stages.messages import Send

log = logging.getLogger(__name__)

LocalItem = tuple[int, bytes, Any]  # (partition, key, message): one message handled in-process
LocalHandler = Callable[[list[LocalItem]], None]
# hops are bounded (identities per record, forwards go to older ids); this is a backstop
MAX_LOCAL_ROUNDS = 64


@dataclass(frozen=True)
class Target:
    """A stage topic whose messages may be handled here: its key -> partition, the partitions held now, the
    stage's handler (the same function its agent calls for messages that came through Kafka)."""

    partition: Callable[[bytes], int]
    held: Callable[[], Collection[int]]
    handler: LocalHandler


class LocalDelivery:
    """Collects, within a block, what the block sends to held partitions of registered stage topics and, when the
    block ends, hands it to their handlers in send order, round after round, until nothing is left (after
    `max_rounds`, the rest goes to `produce`). `allowed` is the protocol's say (what must be in its target's log:
    pipeline.identity.stitch.in_process_allowed); `produce` sends a message through Kafka."""

    def __init__(self, allowed: Callable[[Send], bool], produce: Callable[[Send, int], None],
                 counted: Callable[[str, int], None] = lambda _topic, _n: None,
                 max_rounds: int = MAX_LOCAL_ROUNDS) -> None:
        self.targets: dict[str, Target] = {}
        self._allowed = allowed
        self._produce = produce
        self._counted = counted
        self.max_rounds = max_rounds
        self._queue: list[tuple[str, LocalItem]] | None = None  # None: no block open

    def register(self, topic: str, target: Target) -> None:
        self.targets[topic] = target

    @property
    def open(self) -> bool:
        return self._queue is not None

    def offer(self, send: Send, partition: int | None = None) -> bool:
        """Take the message for in-process delivery (True), or leave it to be produced (False)."""
        if self._queue is None:
            return False
        target = self.targets.get(send.topic)
        if target is None or not self._allowed(send):
            return False
        key = send.key.encode()
        p = target.partition(key) if partition is None else partition
        if p not in target.held():
            return False
        self._queue.append((send.topic, (p, key, send.value)))
        return True

    @contextlib.contextmanager
    def block(self, enabled: bool = True) -> Iterator[None]:
        """A block whose in-process messages are handled when it ends (a nested or disabled block delivers
        nothing in-process: what it sends is produced, or joins the enclosing block)."""
        if self._queue is not None or not enabled:
            yield
            return
        self._queue = []
        try:
            yield
            self.drain()
        finally:
            self._queue = None

    def drain(self) -> None:
        """1. hand the queued messages to their handlers, grouped by topic in send order; 2. again with what that
        sent, up to `max_rounds`; 3. produce what is left."""
        assert self._queue is not None
        for _ in range(self.max_rounds):
            if not self._queue:
                break
            pending, self._queue = self._queue, []
            by_topic: dict[str, list[LocalItem]] = {}
            for topic, item in pending:
                by_topic.setdefault(topic, []).append(item)
            for topic, items in by_topic.items():
                self._counted(topic, len(items))
                self.targets[topic].handler(items)
        leftover, self._queue = self._queue, None
        if leftover:
            log.warning("local delivery: still sending after %d rounds; producing %d messages", self.max_rounds,
                        len(leftover))
        for topic, (p, key, value) in leftover:
            self._produce(Send(topic, key.decode(), value), p)
