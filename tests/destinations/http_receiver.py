"""A real aiohttp webhook receiver for the HTTP destination tests, with injectable failures."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Request:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    outcome: str
    method: str = "POST"


@dataclass
class Receiver:
    """Answers by a plan of outcomes per path, then by `default[path]` (or "ok").

    Outcomes: "ok"; "500"/"503"/"400"/... (status, records not stored); "429:<secs>" (with Retry-After);
    "hang" (never answers within the client timeout, records not stored); "store_then_hang" (stores the
    records, then hangs: the client times out and retries, producing duplicates); "slow:<secs>" (ok
    after a delay).
    """

    plans: dict[str, deque[str]] = field(default_factory=dict)
    default: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    stored: dict[str, list[str]] = field(default_factory=dict)  # path -> idempotency keys in order
    # idempotency key -> (wall-clock time it was first stored, the record): for latency measurements
    first_stored: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    base_url: str = ""

    def plan(self, path: str, *outcomes: str) -> None:
        self.plans.setdefault(path, deque()).extend(outcomes)

    def keys(self, path: str) -> list[str]:
        return self.stored.get(path, [])

    def _store(self, path: str, records: list[dict[str, Any]]) -> None:
        now = time.time()
        self.stored.setdefault(path, []).extend(r["idempotency_key"] for r in records)
        for r in records:
            self.first_stored.setdefault(r["idempotency_key"], (now, r))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        path = request.path
        queue = self.plans.get(path)
        outcome = queue.popleft() if queue else self.default.get(path, "ok")
        self.requests.append(Request(path, dict(request.headers), body, time.monotonic(), outcome, request.method))
        keys = [r["idempotency_key"] for r in body["records"]]
        if outcome == "ok":
            self._store(path, body["records"])
            return web.json_response({"accepted": len(keys)})
        if outcome.startswith("slow:"):
            await asyncio.sleep(float(outcome.split(":")[1]))
            self._store(path, body["records"])
            return web.json_response({"accepted": len(keys)})
        if outcome.startswith("429:"):
            return web.Response(status=429, headers={"Retry-After": outcome.split(":")[1]})
        if outcome == "hang":
            await asyncio.sleep(30)
            return web.Response(status=200)
        if outcome == "store_then_hang":
            self._store(path, body["records"])
            await asyncio.sleep(30)
            return web.Response(status=200)
        return web.Response(status=int(outcome), text="refused")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
