"""HTTP webhook destination: micro-batches, retries with jittered backoff, rate limit, circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from pipeline.backoff import full_jitter_s as backoff_delay_s
from pipeline.destinations.base import Destination, DestinationContext, Payload, register_kind
from pipeline.destinations.config import (
    BatchConfig,
    BreakerConfig,
    DestinationConfig,
    Env,
    Fields,
    KindSettings,
    RetryConfig,
    number,
    resolve_env,
)
from pipeline.errors import DeliveryError
from pipeline.observability import metrics
from pipeline.privacy.erasure import REASON as ERASURE
from pipeline.yamlconf import Doc

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


METHODS: tuple[str, ...] = ("PATCH", "POST", "PUT")


@dataclass(frozen=True)
class HttpSettings:
    """Settings of an `http` destination (a webhook receiving JSON batches)."""

    url: str
    method: str = "POST"
    # Values may hold secrets (resolved from ${ENV}); keep them out of reprs and logs.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    batch: BatchConfig = BatchConfig()
    timeout_s: float = 10.0
    retry: RetryConfig = RetryConfig()
    rate_limit_per_s: float | None = None  # requests per second; None = unlimited
    circuit_breaker: BreakerConfig = BreakerConfig()
    queue_max_records: int = 10_000  # bound of the in-memory queue: beyond it deliver() blocks
    # `erasure: {method: DELETE, url: ...}`: exits of erased people go in requests of their own, with this method
    # (and URL, default `url`); None: they go with the rest, marked `"reason": "erasure"`
    erasure_method: str | None = None
    erasure_url: str | None = None


class CircuitBreaker:
    """closed -> open after N consecutive failures -> half_open after the reset timeout -> closed on
    one success (or back to open on one failure). `state` and `transitions` are observable."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic,
                 name: str = "") -> None:
        self.name = name  # the destination's, for log lines and cdp_destination_breaker_open
        if name:
            metrics.DESTINATION_BREAKER_OPEN.labels(name).set(0)
        self.failure_threshold = config.failure_threshold
        self.reset_timeout_s = config.reset_timeout_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self.transitions: list[tuple[float, BreakerState]] = []  # (monotonic time, new state)

    @property
    def state(self) -> BreakerState:
        # half_open is derived lazily so nothing has to run a timer.
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        return self.state != "open"

    def seconds_until_trial(self) -> float:
        if self.state != "open":
            return 0.0
        return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        self._failures = 0
        if self.state != "closed":
            self._set("closed")

    def record_failure(self) -> None:
        self._failures += 1
        if self.state == "half_open" or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            if self._state != "open":
                self._set("open")

    def _set(self, state: BreakerState) -> None:
        self._state = state
        self.transitions.append((self._clock(), state))
        if self.name:
            metrics.DESTINATION_BREAKER_OPEN.labels(self.name).set(1 if state == "open" else 0)
        log.info("destination %s: circuit breaker -> %s", self.name or "?", state)


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._last = time.monotonic()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the usual form) or as an HTTP date; None if absent or unparsable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpDestination(Destination):
    """Posts JSON batches {"destination": name, "records": [...]} to a webhook.

    `deliver()` only enqueues (blocking when the bounded queue is full: backpressure on this
    destination's consumer only); one sender task batches by count and age and sends in order.
    Records that fail for good go to the context's dead-letter sink with the reason.
    """

    def __init__(self, config: DestinationConfig, context: DestinationContext,
                 session: aiohttp.ClientSession | None = None) -> None:
        super().__init__(config, context)
        if not isinstance(config.settings, HttpSettings):
            raise DeliveryError(f"destination {config.name} has no http settings", retryable=False)
        self.settings: HttpSettings = config.settings
        self.breaker = CircuitBreaker(self.settings.circuit_breaker, name=config.name)
        self._bucket = TokenBucket(self.settings.rate_limit_per_s) if self.settings.rate_limit_per_s else None
        self._queue: asyncio.Queue[Payload] = asyncio.Queue(maxsize=self.settings.queue_max_records)
        self._session = session
        self._own_session = session is None
        self._task: asyncio.Task[None] | None = None
        self._unfinished = 0  # accepted by deliver(), not yet delivered or dead-lettered
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush_requested = asyncio.Event()
        self._failure: BaseException | None = None  # a dead-letter sink error: flush() must report it
        self._closed = False
        self.delivered = 0
        self.requests = 0
        self.failed_attempts = 0
        self.dead_lettered = 0
        self.last_delivery_ms: int | None = None
        self.last_error: str | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        self._task = asyncio.create_task(self._run(), name=f"http-dest-{self.name}")

    async def deliver(self, batch: list[Payload]) -> None:
        if self._closed or self._task is None:
            raise DeliveryError(f"destination {self.name} is not running", retryable=True)
        for p in batch:
            self._unfinished += 1
            self._idle.clear()
            await self._queue.put(p)  # blocks when full: that is the backpressure

    async def flush(self) -> None:
        """Wait until everything enqueued so far is delivered or dead-lettered.

        1. Ask the sender to stop waiting for batches to fill (no max_age wait).
        2. Wait for the in-flight counter to reach zero, or for the sender task to die.
        3. Report a dead-letter sink failure as a retryable DeliveryError (nothing may be committed).
        """
        if self._unfinished > 0:
            assert self._task is not None
            self._flush_requested.set()
            idle = asyncio.create_task(self._idle.wait())
            try:
                await asyncio.wait({idle, self._task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()
            if self._task.done() and self._unfinished > 0:
                raise DeliveryError(f"sender of {self.name} stopped: {self._task.exception()!r}",
                                    retryable=True)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise DeliveryError(f"dead-letter sink failed: {failure!r}", retryable=True)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None and self._own_session:
            await self._session.close()

    def stats(self) -> dict[str, Any]:
        return {
            "breaker": self.breaker.state,
            "queued": self._queue.qsize(),
            "unfinished": self._unfinished,
            "delivered": self.delivered,
            "requests": self.requests,
            "failed_attempts": self.failed_attempts,
            "dead_lettered": self.dead_lettered,
            "last_delivery_ms": self.last_delivery_ms,
            "last_error": self.last_error,
        }

    # -- sender -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                if self.settings.erasure_method is None:
                    await self._send(batch)
                else:  # erasures in requests of their own (e.g. DELETE), the rest as configured
                    erasures = [p for p in batch if p.reason == ERASURE]
                    if len(erasures) < len(batch):
                        await self._send([p for p in batch if p.reason != ERASURE])
                    if erasures:
                        await self._send(erasures, erasure=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a failing dead-letter sink: keep the sender alive
                log.exception("destination %s: batch of %d neither delivered nor dead-lettered",
                              self.name, len(batch))
                self._failure = exc
            self._unfinished -= len(batch)
            if self._unfinished == 0:
                self._flush_requested.clear()
                self._idle.set()

    async def _next_batch(self) -> list[Payload]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch.max_age_ms / 1000.0
        while len(batch) < self.settings.batch.max_records:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if self._flush_requested.is_set() or remaining <= 0:
                break
            getter = asyncio.ensure_future(self._queue.get())
            flusher = asyncio.ensure_future(self._flush_requested.wait())
            done, _ = await asyncio.wait({getter, flusher}, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            flusher.cancel()
            if getter in done:
                batch.append(getter.result())
            else:
                getter.cancel()  # a cancelled Queue.get never removes an item
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                if getter.done() and not getter.cancelled():
                    batch.append(getter.result())  # it completed while we cancelled
        return batch

    async def _send(self, batch: list[Payload], erasure: bool = False) -> None:
        retry = self.settings.retry
        attempt = 0
        failing_since = time.monotonic()
        while True:
            while not self.breaker.allow():
                # Open breaker: wait for the trial instead of burning attempts against a dead host.
                await asyncio.sleep(max(0.005, self.breaker.seconds_until_trial()))
            if self._bucket is not None:
                await self._bucket.acquire()
            attempt += 1
            try:
                await self._post(batch, erasure)
            except DeliveryError as err:
                reason = str(err)
                self.last_error = reason
                self.failed_attempts += 1
                metrics.DESTINATION_FAILURES.labels(self.name, _label(reason)).inc()
                if not err.retryable:
                    # The receiver answered, so it is up: do not count this against the breaker.
                    self.breaker.record_success()
                    await self._dead_letter(batch, reason)
                    return
                self.breaker.record_failure()
                if retry.exhausted(attempt, failing_since, time.monotonic()):
                    await self._dead_letter(batch, f"retries_exhausted:{reason}")
                    return
                delay = backoff_delay_s(attempt, retry.base_delay_ms, retry.max_delay_ms)
                if err.retry_after_s is not None:
                    delay = max(delay, err.retry_after_s)
                await asyncio.sleep(delay)
                continue
            self.breaker.record_success()
            self.delivered += len(batch)
            self.last_delivery_ms = int(time.time() * 1000)
            return

    async def _dead_letter(self, batch: list[Payload], reason: str) -> None:
        # The runner's dead-letter sink logs it (one line per dead-lettering, any kind).
        log.debug("destination %s: %d record(s) to dead-letter: %s", self.name, len(batch), reason)
        await self.context.dead_letter(batch, reason)
        self.dead_lettered += len(batch)

    async def _post(self, batch: list[Payload], erasure: bool = False) -> None:
        assert self._session is not None
        body = {"destination": self.name, "records": [_record(p) for p in batch]}
        headers = dict(self.settings.headers)
        if len(batch) == 1:
            headers["Idempotency-Key"] = batch[0].idempotency_key
        self.requests += 1
        try:
            method, url = self.settings.method, self.settings.url
            if erasure and self.settings.erasure_method is not None:
                method, url = self.settings.erasure_method, self.settings.erasure_url or url
            async with self._session.request(
                    method, url, json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return
                reason = f"http_{resp.status}"
                if resp.status == 429 or resp.status >= 500:
                    raise DeliveryError(reason, retryable=True,
                                        retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
                raise DeliveryError(reason, retryable=False)
        except TimeoutError as exc:
            raise DeliveryError("timeout", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"connection_error:{type(exc).__name__}", retryable=True) from exc


def _label(reason: str) -> str:
    """Metric label: "http_503", "timeout", "connection_error" (the class name is dropped)."""
    return reason.split(":", 1)[0][:40]


def _record(p: Payload) -> dict[str, Any]:
    d = p.to_dict()
    del d["destination"]  # it is in the envelope
    return d


def parse_http_settings(doc: Doc, f: Fields, env: Env) -> HttpSettings:
    """An http destination's own keys (url, method, headers, batch, retry ...)."""
    url = doc.string(f["url"][1], "url")
    if not url.startswith(("http://", "https://")):
        raise doc.error("url must start with http:// or https://", f["url"][1])
    method = "POST"
    if "method" in f:
        method = doc.string(f["method"][1], "method").upper()
        if method not in METHODS:
            raise doc.error(f"method must be one of {', '.join(METHODS)}", f["method"][1])
    headers: list[tuple[str, str]] = []
    if "headers" in f:
        for key, (_, vnode) in doc.mapping(f["headers"][1], "headers").items():
            # ${VAR}: headers usually carry tokens, which stay out of the file
            headers.append((key, resolve_env(doc, vnode, f"header {key}", env)))
    batch = BatchConfig()
    if "batch" in f:
        bnode = f["batch"][1]
        b = doc.mapping(bnode, "batch")
        doc.check_keys(b, "batch", set(), {"max_records", "max_age_ms"}, bnode)
        batch = BatchConfig(
            doc.integer(b["max_records"][1], "max_records", minimum=1) if "max_records" in b else 100,
            doc.integer(b["max_age_ms"][1], "max_age_ms", minimum=0) if "max_age_ms" in b else 1000)
    retry = RetryConfig()
    if "retry" in f:
        rnode = f["retry"][1]
        r = doc.mapping(rnode, "retry")
        doc.check_keys(r, "retry", set(), {"max_attempts", "base_delay_ms", "max_delay_ms", "max_elapsed_s"},
                       rnode)
        retry = RetryConfig(
            doc.integer(r["max_attempts"][1], "max_attempts", minimum=1) if "max_attempts" in r else 5,
            doc.integer(r["base_delay_ms"][1], "base_delay_ms", minimum=0) if "base_delay_ms" in r else 200,
            doc.integer(r["max_delay_ms"][1], "max_delay_ms", minimum=0) if "max_delay_ms" in r else 10_000,
            number(doc, r["max_elapsed_s"][1], "max_elapsed_s", positive=False) if "max_elapsed_s" in r else 3600.0)
    breaker = BreakerConfig()
    if "circuit_breaker" in f:
        cnode = f["circuit_breaker"][1]
        c = doc.mapping(cnode, "circuit_breaker")
        doc.check_keys(c, "circuit_breaker", set(), {"failure_threshold", "reset_timeout_s"}, cnode)
        breaker = BreakerConfig(
            doc.integer(c["failure_threshold"][1], "failure_threshold", minimum=1)
            if "failure_threshold" in c else 5,
            number(doc, c["reset_timeout_s"][1], "reset_timeout_s") if "reset_timeout_s" in c else 30.0)
    erasure_method: str | None = None
    erasure_url: str | None = None
    if "erasure" in f:
        enode = f["erasure"][1]
        e = doc.mapping(enode, "erasure")
        doc.check_keys(e, "erasure", {"method"}, {"url"}, enode)
        erasure_method = doc.string(e["method"][1], "erasure method").upper()
        if erasure_method not in (*METHODS, "DELETE"):
            raise doc.error(f"erasure method must be one of {', '.join((*METHODS, 'DELETE'))}", e["method"][1])
        if "url" in e:
            erasure_url = doc.string(e["url"][1], "erasure url")
            if not erasure_url.startswith(("http://", "https://")):
                raise doc.error("erasure url must start with http:// or https://", e["url"][1])
    return HttpSettings(
        erasure_method=erasure_method, erasure_url=erasure_url,
        url=url, method=method, headers=tuple(headers), batch=batch,
        timeout_s=number(doc, f["timeout_s"][1], "timeout_s") if "timeout_s" in f else 10.0,
        retry=retry,
        rate_limit_per_s=number(doc, f["rate_limit_per_s"][1], "rate_limit_per_s")
        if "rate_limit_per_s" in f else None,
        circuit_breaker=breaker,
        queue_max_records=doc.integer(f["queue_max_records"][1], "queue_max_records", minimum=1)
        if "queue_max_records" in f else 10_000,
    )


register_kind("http", HttpDestination, KindSettings(
    required=frozenset({"url"}),
    optional=frozenset({"method", "headers", "batch", "timeout_s", "retry", "rate_limit_per_s", "circuit_breaker",
                        "queue_max_records", "erasure"}),
    parse=parse_http_settings))
