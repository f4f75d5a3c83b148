"""API routes on the worker's web server (faust web, aiohttp underneath), as pipeline/api/openapi.yaml
describes them (a test keeps the two the same; pipeline/api/server.py guards every request: API keys and
scopes, limits, problem bodies, the access log).

GET /profiles?namespace=Email&id=a@b.com, GET /profiles/{id}, POST /edge/evaluate, GET /audiences,
GET /metrics, GET /healthz (the worker's event loop answers), GET /readyz (200, or 503 with the reasons
the worker cannot do its work now: partitions not assigned or tables recovering, the ingest consumer not in
its group, Kafka unreachable: `Runtime.readiness`) and GET /openapi.json.
GET /audiences/{id} (with its size) and GET /audiences/{id}/members?namespace=..&id=.. (is this identity's
profile a member). Any worker answers for any profile: a lookup whose identity or profile partition another
worker holds is routed there (pipeline/api/routing.py), an identity lookup in up to two hops (the identity's
partition, then the profile's).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from faust.web import View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.api.routing import IDENTITY, LOCAL, PROFILE, ROUTE_HEADER, Router, parse_route, unavailable
from pipeline.api.server import PROFILE_ID_KEY, openapi, problem_response
from pipeline.api.views import (
    PROFILE_ID,
    ApiError,
    identity_key,
    merge_policy_info,
    parse_json_body,
    render_membership,
    render_profile,
)
from pipeline.model import ProfileState
from pipeline.runtime import Runtime
from pipeline.state.codec import Forward, decode_profile_entry


def register(rt: Runtime) -> Router:
    """The routes above; the router they send requests to other workers with (the console's routes share it)."""
    app = rt.app
    identity = rt.ptables["identity"]
    profiles = rt.ptables["profiles"]
    router = Router(app, rt.settings)
    on_shutdown = app.on_shutdown

    async def close_then_shut_down() -> None:
        await router.close()
        await on_shutdown()

    app.on_shutdown = close_then_shut_down  # type: ignore[method-assign]

    def readable() -> None:
        """Stores are complete only outside a rebalance and once tables are recovered."""
        if app.rebalancing or not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            raise unavailable("rebalancing", "this worker's partitions are being assigned; try again")

    def served(request: Any, p: ProfileState) -> ProfileState:
        request[PROFILE_ID_KEY] = p.profile_id  # for the access log
        return p

    def routed(request: Any, response: web.Response) -> web.Response:
        """A routed answer, as the owner gave it; the access log names the profile it served."""
        if response.status == 200 and isinstance(response.body, bytes):
            pid = json.loads(response.body).get("profile_id")
            if isinstance(pid, str):
                request[PROFILE_ID_KEY] = pid
        return response

    Answer = Callable[[ProfileState], Any]

    async def by_profile(request: Any, pid: str, answer: Answer, must_hold: bool, body: bytes | None = None) -> Any:
        """The answer for a profile id: here when this worker holds its partition, following merges (each
        forward to a smaller id); else from the worker that does."""
        for _ in range(16):
            if not PROFILE_ID.fullmatch(pid):  # e.g. the table's own metadata keys (`__cdp_acked__:0`)
                raise ApiError(404, "not-found", "no such profile")
            key = pid.encode()
            partition = profiles.partition(key)
            if partition not in profiles.active():
                if must_hold:
                    raise unavailable("not-owner", "this worker no longer holds the profile; try again")
                url = router.owner(profiles.changelog, partition)
                return routed(request, await router.send(request, url, f"{PROFILE}={pid}", body))
            readable()
            raw = profiles.get(partition, key, remember=False)
            if raw is None:
                raise ApiError(404, "not-found", "no such profile")
            entry = decode_profile_entry(raw)
            if not isinstance(entry, Forward):
                return answer(served(request, entry))
            pid, must_hold = entry.into, False
        raise ApiError(404, "not-found", "no such profile")

    async def by_identity(request: Any, params: Mapping[str, Any], answer: Answer, body: bytes | None = None) -> Any:
        """The answer for an identity: 1. its profile id, from the worker holding the identity's partition;
        2. the profile, from the worker holding the profile's partition (each routed when held elsewhere)."""
        route, pid = parse_route(request.headers.get(ROUTE_HEADER))
        if route == PROFILE and pid is not None:
            return await by_profile(request, pid, answer, must_hold=True, body=body)
        key = identity_key(dict(params), rt.config.profile).encode()
        partition = identity.partition(key)
        if partition not in identity.active():
            if route == IDENTITY:
                raise unavailable("not-owner", "this worker no longer holds the identity; try again")
            url = router.owner(identity.changelog, partition)
            return routed(request, await router.send(request, url, IDENTITY, body))
        readable()
        owner = identity.get(partition, key, remember=False)
        if owner is None:
            raise ApiError(404, "not-found", "no profile for this identity")
        return await by_profile(request, owner.decode(), answer, must_hold=False, body=body)

    def error(web: Any, exc: ApiError) -> Any:
        return problem_response(exc)

    policy = merge_policy_info(rt.config.profile.datasets.merge_policy)

    def profile_json(p: ProfileState) -> Any:
        return web.json_response(render_profile(p, merge_policy=policy, audiences=rt.engine.audiences,
                                                now_ms=rt.now_ms()))

    @app.page("/profiles")
    async def get_profile(web_: Any, request: Any) -> Any:
        try:
            return await by_identity(request, request.query, profile_json)
        except ApiError as exc:
            return error(web_, exc)

    @app.page("/profiles/{profile_id}")
    async def get_profile_by_id(web_: Any, request: Any, profile_id: str) -> Any:
        try:
            route, pid = parse_route(request.headers.get(ROUTE_HEADER))
            return await by_profile(request, profile_id, profile_json, must_hold=route == PROFILE)
        except ApiError as exc:
            return error(web_, exc)

    @app.page("/audiences/{audience_id}/members")
    async def audience_member(web_: Any, request: Any, audience_id: str) -> Any:
        try:
            if audience_id not in rt.engine.audiences:
                raise ApiError(404, "unknown-audience", "no such audience")
            return await by_identity(request, request.query,
                                     lambda p: web.json_response(render_membership(p, audience_id)))
        except ApiError as exc:
            return error(web_, exc)

    @app.page("/audiences/{audience_id}")
    async def audience(web_: Any, request: Any, audience_id: str) -> Any:
        """The audience with its size: current members per profile partition, counted by the partition's owner
        (pipeline.segments.sizes), summed over the workers; 503 while any partition is not counted."""
        try:
            explained = {e.audience_id: e for e in rt.engine.explain()}
            if audience_id not in explained:
                raise ApiError(404, "unknown-audience", "no such audience")
            route, _ = parse_route(request.headers.get(ROUTE_HEADER))
            readable()
            counts = rt.audience_sizes.of(audience_id, profiles.active())
            flows = rt.audience_sizes.flows(audience_id, rt.now_ms())
            if route != LOCAL:
                others = await asyncio.gather(*(router.send_json(request, url, LOCAL) for url in router.workers()))
                for answer in others:
                    counts |= {int(p): int(n) for p, n in answer["partitions"].items()}
                    for f in answer.get("flows", ()):  # (a worker of an older version answers none)
                        mine = flows.setdefault(int(f["minute_ms"]), [0, 0])
                        mine[0] += int(f["entries"])
                        mine[1] += int(f["exits"])
                missing = set(range(profiles.partitions)) - set(counts)
                if missing:
                    raise unavailable("size-incomplete", f"{len(missing)} partitions are not counted now; try again")
            return web_.json({**audience_info(rt, explained[audience_id]), "size": sum(counts.values()),
                              "partitions": {str(p): n for p, n in sorted(counts.items())},
                              "flows": [{"minute_ms": m, "entries": e, "exits": x}
                                        for m, (e, x) in sorted(flows.items())]})
        except ApiError as exc:
            return error(web_, exc)

    @app.page("/edge/evaluate")
    class EdgeEvaluate(View):  # type: ignore[misc]
        """Evaluate edge-eligible audiences for a profile on request (same-page personalisation)."""

        async def post(self, request: Any) -> Any:
            try:
                raw = await asyncio.wait_for(request.read(), rt.settings.web_read_timeout_s)
            except TimeoutError:
                return error(self, ApiError(408, "body-timeout", "the body did not arrive in time"))
            try:
                body = parse_json_body(raw)
                if not isinstance(body, dict):
                    raise ApiError(400, "invalid-json", "the body must be a JSON object")
                return await by_identity(request, body, edge_decision, raw)
            except ApiError as exc:
                return error(self, exc)

    def edge_decision(p: ProfileState) -> Any:
        edge = [e.audience_id for e in rt.engine.explain() if e.edge]
        started = time.perf_counter()
        decisions = rt.engine.evaluate(p, rt.now_ms(), edge, kind="edge")
        return web.json_response({
            "profile_id": p.profile_id,
            "audiences": {d.audience_id: d.qualified for d in decisions},
            "evaluation_ms": round((time.perf_counter() - started) * 1000, 3),
        })

    @app.page("/audiences")
    async def audiences(web: Any, request: Any) -> Any:
        return web.json([audience_info(rt, e) for e in rt.engine.explain()])

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"alive": True})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        return web.json(rt.readiness.body(), status=200 if rt.readiness.ready else 503)

    @app.page("/openapi.json")
    async def openapi_json(web: Any, request: Any) -> Any:
        return web.json(openapi())

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return router


def audience_info(rt: Runtime, e: Any) -> dict[str, Any]:
    """An audience as GET /audiences lists it (`e`: one of SegmentEngine.explain())."""
    a = rt.engine.audiences[e.audience_id]
    return {"id": e.audience_id, "streaming": e.streaming, "batch": e.batch, "edge": e.edge, "reason": e.reason,
            "version": a.version, "name": a.name, "query": a.query}
