"""Routing an API request to the worker that holds its key's table partition (any worker answers for any profile).

Who holds what comes from Faust's partition assignment: each worker's `canonical_url` (Settings.advertised_url)
travels in the group's assignment metadata, with the changelog partitions it holds (the router Faust's own
`/router/` pages read, which stay off). A key's partition is Kafka's murmur2 of the key, as the tables use.

A routed request is the caller's own request sent on, with the caller's API key (the owner checks key and scope
again) and two headers of ours:
- `X-CDP-Route` says what the sender resolved: `identity` (the receiver must hold the identity's partition; it
  may route the profile step), `profile=<id>` (the receiver must hold that profile's partition; it only routes
  again to follow a merge's forward, which always points to a smaller id), `local` (answer for the partitions
  held here; an audience's size). A receiver that does not hold what the header says (the assignment is moving)
  answers 503, never a 404 it cannot know;
- `X-CDP-Hops`: how many workers the request has passed; over MAX_HOPS it is refused (503), whatever happens.
An owner that is not known (a rebalance), cannot be reached or does not answer within
PIPELINE_API_ROUTE_TIMEOUT_S gives 503 with a problem body and Retry-After. One aiohttp ClientSession per worker.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from pipeline.api.views import PROBLEM_CONTENT_TYPE, ApiError
from pipeline.settings import Settings

ROUTE_HEADER = "X-CDP-Route"
HOPS_HEADER = "X-CDP-Hops"
MAX_HOPS = 8  # identity, profile, then forwards of merged profiles (each to a smaller id)
RETRY_AFTER_S = 1
PASSED_ON = ("Authorization", "X-API-Key", "Accept", "Content-Type")  # the caller's key goes with the request
PASSED_BACK = ("Content-Type", "Retry-After", "WWW-Authenticate", "Allow", HOPS_HEADER)

IDENTITY, PROFILE, LOCAL = "identity", "profile", "local"


def unavailable(error: str, detail: str) -> ApiError:
    """503 with Retry-After: ask again shortly (an assignment settles in seconds)."""
    return ApiError(503, error, detail, {"Retry-After": str(RETRY_AFTER_S)})


def parse_route(header: str | None) -> tuple[str, str | None]:
    """`X-CDP-Route` -> (kind, profile id): ("", None) for a caller's request; ApiError 400 if malformed."""
    if not header:
        return "", None
    kind, _, value = header.partition("=")
    if kind in (IDENTITY, LOCAL) and not value:
        return kind, None
    if kind == PROFILE and value:
        return PROFILE, value
    raise ApiError(400, "invalid-route", f"malformed {ROUTE_HEADER} header")


def hops(request: web.Request) -> int:
    """How many workers passed this request on before this one."""
    value = request.headers.get(HOPS_HEADER, "0")
    return int(value) if value.isdigit() else 0


def owners(metadata: Mapping[str, Mapping[str, Sequence[int]]], topic: str) -> dict[int, str]:
    """partition of `topic` -> URL of the worker holding it, from Faust's assignment metadata
    (URL -> topic -> partitions: `app.router.tables_metadata()`)."""
    return {p: url for url, topics in metadata.items() for p in topics.get(topic, ())}


class Router:
    """Where a table partition is held, and the one HTTP client that sends requests there."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.own_url = settings.advertised_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=settings.api_route_timeout_s,
                                             sock_connect=min(1.0, settings.api_route_timeout_s))
        self._ssl: ssl.SSLContext | bool = True
        if settings.web_tls_cert is not None:  # the workers' own certificate is trusted too (self-signed)
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(str(settings.web_tls_cert))
            self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None
        self._metadata: Any = None
        self._owners: dict[str, dict[int, str]] = {}

    def owner(self, topic: str, partition: int) -> str | None:
        """The URL of the worker holding `partition` of the changelog `topic`, as the last assignment says."""
        metadata = self.app.assignor.tables_metadata()
        if metadata is not self._metadata:  # a new assignment
            self._metadata, self._owners = metadata, {}
        if topic not in self._owners:
            self._owners[topic] = owners(metadata, topic)
        return self._owners[topic].get(partition)

    def workers(self) -> list[str]:
        """Every worker's URL in the current assignment, this one's excluded."""
        return sorted({url.rstrip("/") for url in self.app.assignor.tables_metadata()} - {self.own_url})

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, request: web.Request, url: str | None, route: str, body: bytes | None = None) -> web.Response:
        """Send `request` (its method, path, query and `body`, read already) on to the worker at `url` with
        `route`, and its answer back as it came."""
        if url is None or url.rstrip("/") == self.own_url:
            raise unavailable("owner-unknown", "the worker holding this key is not known now (partitions are "
                                               "being assigned); try again")
        n = hops(request) + 1
        if n > MAX_HOPS:
            raise unavailable("too-many-hops", f"the request passed {MAX_HOPS} workers without an answer")
        headers = {h: request.headers[h] for h in PASSED_ON if h in request.headers}
        headers |= {ROUTE_HEADER: route, HOPS_HEADER: str(n)}
        target = url.rstrip("/") + str(request.rel_url)
        try:
            async with self.session().request(request.method, target, headers=headers, data=body, ssl=self._ssl,
                                              allow_redirects=False) as r:
                body = await r.read()
                back = {h: r.headers[h] for h in PASSED_BACK if h in r.headers}
                back.setdefault(HOPS_HEADER, str(n))
                return web.Response(status=r.status, body=body, headers=back)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unavailable("owner-unreachable", f"the worker holding this key did not answer "
                                                   f"({type(exc).__name__}); try again") from None

    async def send_json(self, request: web.Request, url: str, route: str, body: bytes | None = None) -> dict[str, Any]:
        """`send`, for an answer this worker reads (an audience's size from another worker): its JSON body;
        503 if it is not a 200."""
        r = await self.send(request, url, route, body)
        if r.status != 200 or not isinstance(r.body, bytes):
            if r.content_type == PROBLEM_CONTENT_TYPE and r.status in (401, 403):
                raise ApiError(r.status, "routed-refused", "another worker refused this key")
            raise unavailable("worker-unavailable", f"a worker answered {r.status}; try again")
        data: dict[str, Any] = json.loads(r.body)
        return data
