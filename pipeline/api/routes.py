"""API routes on the worker's web server (faust web, aiohttp underneath), as pipeline/api/openapi.yaml
describes them (a test keeps the two the same; pipeline/api/server.py guards every request: API keys and
scopes, limits, problem bodies, the access log).

GET /profiles?namespace=Email&id=a@b.com, GET /profiles/{id}, POST /edge/evaluate, GET /audiences,
GET /metrics, GET /healthz (the worker's event loop answers), GET /readyz (200, or 503 with the reasons
the worker cannot do its work now: partitions not assigned or tables recovering, the ingest consumer not in
its group, Kafka unreachable: `Runtime.readiness`) and GET /openapi.json.
Lookups read this worker's local table partitions (one worker in `make run`; with several workers, ask the
one that owns the partition: the 404 body says so).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faust.web import View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.api.server import PROFILE_ID_KEY, openapi, problem_response
from pipeline.api.views import PROFILE_ID, ApiError, identity_key, parse_json_body, render_profile
from pipeline.model import ProfileState
from pipeline.runtime import Runtime
from pipeline.state.codec import Forward, decode_profile_entry


def register(rt: Runtime) -> None:
    app = rt.app
    identity = rt.tables["identity"]
    profiles = rt.tables["profiles"]

    def load(pid: str) -> ProfileState | None:
        if not PROFILE_ID.fullmatch(pid):  # e.g. the table's own metadata keys (`__cdp_acked__:0`)
            return None
        for _ in range(16):  # follow forwards (each hop to a smaller id, so it ends)
            raw = profiles.get(pid.encode())
            if raw is None:
                return None
            entry = decode_profile_entry(raw)
            if isinstance(entry, Forward):
                pid = entry.into
                continue
            return entry
        return None

    def lookup(params: Any) -> ProfileState:
        key = identity_key(dict(params), rt.config.profile)
        pid = identity.get(key.encode())
        p = load(pid.decode()) if pid else None
        if p is None:
            raise ApiError(404, "not-found", "no profile for this identity on this worker")
        return p

    def error(web: Any, exc: ApiError) -> Any:
        return problem_response(exc)

    def served(request: Any, p: ProfileState) -> ProfileState:
        request[PROFILE_ID_KEY] = p.profile_id  # for the access log
        return p

    @app.page("/profiles")
    async def get_profile(web: Any, request: Any) -> Any:
        try:
            return web.json(render_profile(served(request, lookup(request.query))))
        except ApiError as exc:
            return error(web, exc)

    @app.page("/profiles/{profile_id}")
    async def get_profile_by_id(web: Any, request: Any, profile_id: str) -> Any:
        p = load(profile_id)
        if p is None:
            return error(web, ApiError(404, "not-found", "no such profile on this worker"))
        return web.json(render_profile(served(request, p)))

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
                p = served(request, lookup(body))
            except ApiError as exc:
                return error(self, exc)
            edge = [e.audience_id for e in rt.engine.explain() if e.edge]
            started = time.perf_counter()
            decisions = rt.engine.evaluate(p, rt.now_ms(), edge, kind="edge")
            return self.json({
                "profile_id": p.profile_id,
                "audiences": {d.audience_id: d.qualified for d in decisions},
                "evaluation_ms": round((time.perf_counter() - started) * 1000, 3),
            })

    @app.page("/audiences")
    async def audiences(web: Any, request: Any) -> Any:
        return web.json([{"id": e.audience_id, "streaming": e.streaming, "batch": e.batch, "edge": e.edge,
                          "reason": e.reason, "version": rt.engine.audiences[e.audience_id].version}
                         for e in rt.engine.explain()])

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"alive": True})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        reasons = rt.readiness.reasons()
        if not reasons:
            return web.json({"ready": True})
        return web.json({"ready": False, "reasons": [f"{r}: {d}" for r, d in sorted(reasons.items())]}, status=503)

    @app.page("/openapi.json")
    async def openapi_json(web: Any, request: Any) -> Any:
        return web.json(openapi())

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])
