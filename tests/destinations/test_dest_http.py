"""HTTP destination against a real local aiohttp receiver: retries, breaker, DLQ, backpressure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from dest_helpers import dest_config
from http_receiver import Receiver

from pipeline.destinations.base import DestinationContext, Payload
from pipeline.destinations.config import BreakerConfig
from pipeline.destinations.http import (
    CircuitBreaker,
    HttpDestination,
    HttpSettings,
    backoff_delay_s,
    parse_retry_after,
)


class DeadLetters:
    """The dead-letter callback the runner would give: records payloads with their reason."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []  # (idempotency key, reason)

    async def __call__(self, payloads: list[Payload], reason: str) -> None:
        self.items.extend((p.idempotency_key, reason) for p in payloads)


def payloads(n: int, prefix: str = "k", dest: str = "d1") -> list[Payload]:
    return [Payload(destination=dest, profile_id=f"p{i}", audience_id="vip", kind="membership",
                    status="realized", identities={"CRMID": [f"C-{i}"]}, attributes={"loyalty.tier": "gold"},
                    idempotency_key=f"{prefix}-{i}", event_time_ms=i, source_emit_ms=i) for i in range(n)]


def make(receiver: Receiver, path: str, dlq: DeadLetters, *, name: str = "d1", max_records: int = 50,
         max_age_ms: int = 20, max_attempts: int = 8, timeout_s: float = 2.0, threshold: int = 50,
         reset_s: float = 0.2, queue: int = 10_000, rate: float | None = None,
         headers: str = "", max_elapsed_s: float = 0) -> HttpDestination:
    extra = (f"    batch: {{max_records: {max_records}, max_age_ms: {max_age_ms}}}\n"
             f"    timeout_s: {timeout_s}\n"
             f"    retry: {{max_attempts: {max_attempts}, base_delay_ms: 5, max_delay_ms: 50, "
             f"max_elapsed_s: {max_elapsed_s}}}\n"
             f"    circuit_breaker: {{failure_threshold: {threshold}, reset_timeout_s: {reset_s}}}\n"
             f"    queue_max_records: {queue}\n"
             + (f"    rate_limit_per_s: {rate}\n" if rate else "") + headers)
    cfg = dest_config(name=name, extra=extra)
    from dataclasses import replace
    cfg = replace(cfg, settings=replace(cfg.settings_as(HttpSettings), url=receiver.base_url + path))
    return HttpDestination(cfg, DestinationContext(dead_letter=dlq))


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.005)


async def run(dest: HttpDestination, body: Callable[[], Awaitable[None]]) -> None:
    await dest.start()
    try:
        await body()
    finally:
        await dest.close()


async def test_nothing_lost_through_500s_429s_and_timeouts(receiver: Receiver) -> None:
    # Given a receiver that fails in every retryable way, including storing and then timing out
    receiver.plan("/a", "500", "503", "429:0", "hang", "store_then_hang", "500", "429:0", "502")
    dlq = DeadLetters()
    dest = make(receiver, "/a", dlq, timeout_s=0.3, max_attempts=12)
    batch = payloads(600)

    async def body() -> None:
        # When 600 records are delivered and flushed
        for i in range(0, 600, 100):
            await dest.deliver(batch[i:i + 100])
        await dest.flush()

    await run(dest, body)
    # Then every key arrived at least once, duplicates are only the stored-then-timed-out batch
    keys = receiver.keys("/a")
    assert set(keys) == {p.idempotency_key for p in batch}
    assert 0 < len(keys) - len(set(keys)) <= 50 and not dlq.items
    assert dest.stats()["delivered"] == 600


async def test_a_large_backlog_arrives_whole_in_requests_of_at_most_max_records(receiver: Receiver) -> None:
    # Given 5,000 payloads handed over 1,000 at a time to a destination batching up to 500 records
    dest = make(receiver, "/big", DeadLetters(), max_records=500, max_age_ms=50)
    batch = payloads(5000)

    async def body() -> None:
        for i in range(0, len(batch), 1000):
            await dest.deliver(batch[i:i + 1000])
        await dest.flush()

    # When they are delivered and flushed
    await run(dest, body)
    # Then each arrived once, in order, in requests of at most 500 records (its speed: `make bench-micro`)
    assert receiver.keys("/big") == [p.idempotency_key for p in batch]
    assert max(len(r.body["records"]) for r in receiver.requests) <= 500


async def test_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.plan("/ra", "429:1")
    dlq = DeadLetters()
    dest = make(receiver, "/ra", dlq)

    async def body() -> None:
        await dest.deliver(payloads(1))
        await dest.flush()

    await run(dest, body)
    first, second = receiver.requests[0], receiver.requests[1]
    assert first.outcome == "429:1" and second.outcome == "ok"
    assert second.at - first.at >= 0.95  # the jittered backoff alone would be <= 50 ms


async def test_single_record_batches_carry_idempotency_and_auth_headers(receiver: Receiver,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "s3cret")
    dlq = DeadLetters()
    dest = make(receiver, "/h", dlq, max_records=1, headers="    headers: {Authorization: 'Bearer ${HOOK_TOKEN}'}\n")

    async def body() -> None:
        await dest.deliver(payloads(3))
        await dest.flush()

    await run(dest, body)
    assert [r.headers["Idempotency-Key"] for r in receiver.requests] == ["k-0", "k-1", "k-2"]
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in receiver.requests)
    record = receiver.requests[0].body["records"][0]
    assert receiver.requests[0].body["destination"] == "d1"
    assert record["idempotency_key"] == "k-0" and record["identities"] == {"CRMID": ["C-0"]}


async def test_batches_are_sent_by_age_without_flush(receiver: Receiver) -> None:
    dest = make(receiver, "/age", DeadLetters(), max_records=100, max_age_ms=30)

    async def body() -> None:
        await dest.deliver(payloads(3))
        await wait_until(lambda: len(receiver.keys("/age")) == 3)

    await run(dest, body)
    assert len(receiver.requests) == 1  # one batch, sent when it aged, not per record


async def test_non_retryable_4xx_goes_to_dead_letter_with_reason(receiver: Receiver) -> None:
    receiver.plan("/bad", "ok", "400")
    dlq = DeadLetters()
    dest = make(receiver, "/bad", dlq, max_records=10)

    async def body() -> None:
        for i in range(0, 30, 10):
            await dest.deliver(payloads(30)[i:i + 10])
            await dest.flush()

    await run(dest, body)
    assert [k for k, _ in dlq.items] == [f"k-{i}" for i in range(10, 20)]
    assert {r for _, r in dlq.items} == {"http_400"}
    assert len([r for r in receiver.requests if r.outcome == "400"]) == 1  # not retried
    assert set(receiver.keys("/bad")) == {f"k-{i}" for i in list(range(10)) + list(range(20, 30))}


async def test_exhausted_retries_go_to_dead_letter(receiver: Receiver) -> None:
    receiver.default["/down"] = "503"
    dlq = DeadLetters()
    dest = make(receiver, "/down", dlq, max_attempts=3)

    async def body() -> None:
        await dest.deliver(payloads(5))
        await dest.flush()

    await run(dest, body)
    assert len(receiver.requests) == 3
    assert dlq.items == [(f"k-{i}", "retries_exhausted:http_503") for i in range(5)]


async def test_an_outage_shorter_than_the_retry_window_is_waited_out(receiver: Receiver) -> None:
    # Given a receiver that is down (503), and retries of 3 attempts within a window of 30 s
    receiver.default["/out"] = "503"
    dlq = DeadLetters()
    dest = make(receiver, "/out", dlq, max_attempts=3, max_elapsed_s=30, threshold=2, reset_s=0.05)

    async def body() -> None:
        await dest.deliver(payloads(5))
        # When it stays down for more than 3 attempts, then comes back
        await wait_until(lambda: len(receiver.requests) >= 6)
        receiver.default["/out"] = "ok"
        await dest.flush()

    await run(dest, body)
    # Then everything reaches it and nothing is dead-lettered
    assert set(receiver.keys("/out")) == {f"k-{i}" for i in range(5)} and not dlq.items


async def test_breaker_opens_then_half_opens_then_closes(receiver: Receiver) -> None:
    # Given a failing receiver and a breaker that opens after 3 consecutive failures
    receiver.default["/cb"] = "500"
    dlq = DeadLetters()
    dest = make(receiver, "/cb", dlq, threshold=3, reset_s=0.3, max_attempts=100)

    async def body() -> None:
        await dest.deliver(payloads(20))
        # When it fails 3 times the breaker opens and requests stop while it is open
        await wait_until(lambda: dest.breaker.state == "open")
        n = len(receiver.requests)
        assert n == 3
        assert dest.stats()["breaker"] == "open"
        await asyncio.sleep(0.1)
        assert len(receiver.requests) == n  # no traffic to a dead host while open
        # Then, the receiver recovered: the trial request after the reset timeout closes it
        receiver.default["/cb"] = "ok"
        await dest.flush()

    await run(dest, body)
    states = [s for _, s in dest.breaker.transitions]
    assert states == ["open", "half_open", "closed"]
    assert set(receiver.keys("/cb")) == {f"k-{i}" for i in range(20)} and not dlq.items


async def test_failed_trial_reopens_breaker() -> None:
    now = [0.0]
    cb = CircuitBreaker(BreakerConfig(failure_threshold=2, reset_timeout_s=5), clock=lambda: now[0])
    cb.record_failure()
    assert cb.state == "closed"
    cb.record_failure()
    assert cb.state == "open" and not cb.allow() and cb.seconds_until_trial() == 5
    now[0] = 5.0
    assert cb.state == "half_open" and cb.allow()
    cb.record_failure()
    assert cb.state == "open"
    now[0] = 10.0
    cb.record_success()
    assert cb.state == "closed"


async def test_rate_limit_spaces_requests(receiver: Receiver) -> None:
    dest = make(receiver, "/rl", DeadLetters(), max_records=1, rate=20)

    async def body() -> None:
        start = time.monotonic()
        await dest.deliver(payloads(30))
        await dest.flush()
        # 20 tokens of burst, then 10 more at 20/s: at least ~0.5 s
        assert time.monotonic() - start >= 0.45

    await run(dest, body)
    assert len(receiver.keys("/rl")) == 30


async def test_failing_destination_does_not_slow_a_healthy_one(receiver: Receiver) -> None:
    # Given a destination whose receiver always fails (small queue) and a healthy one, run concurrently
    receiver.default["/slow"] = "500"
    slow = make(receiver, "/slow", DeadLetters(), name="slow", threshold=2, reset_s=0.5,
                max_attempts=1000, queue=20, max_records=10)
    fast = make(receiver, "/fast", DeadLetters(), name="fast", max_records=100)
    await slow.start()
    await fast.start()
    slow_fed = 0

    async def feed_slow() -> None:
        nonlocal slow_fed
        for p in payloads(1000, prefix="s", dest="slow"):
            await slow.deliver([p])  # blocks once its queue is full: backpressure on its feeder only
            slow_fed += 1

    feeder = asyncio.create_task(feed_slow())
    try:
        start = time.monotonic()
        batch = payloads(5000, prefix="f", dest="fast")
        for i in range(0, 5000, 500):
            await fast.deliver(batch[i:i + 500])
        await fast.flush()
        elapsed = time.monotonic() - start
        # Then the healthy one delivered everything promptly while the failing one is stuck
        assert set(receiver.keys("/fast")) == {p.idempotency_key for p in batch}
        assert elapsed < 5.0
        assert not feeder.done() and slow_fed <= 20 + 10 + 1  # queue + one in-flight batch + one blocked
        assert slow.stats()["breaker"] in ("open", "half_open")
        assert not receiver.keys("/slow")
    finally:
        feeder.cancel()
        await slow.close()
        await fast.close()


def test_retry_after_parsing_and_backoff_bounds() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("x") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    for attempt in range(1, 10):
        assert 0 <= backoff_delay_s(attempt, 100, 1000) <= min(1.0, 0.1 * 2 ** (attempt - 1))
