"""The erasure endpoints (scope privacy:erase): DELETE /profiles?namespace=..&id=.. starts an erasure,
GET /privacy/erasures/{request_id} answers its status (and, with verify=true, scans this worker's stores)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from pipeline.api.server import problem_response
from pipeline.api.views import ApiError, identity_key
from pipeline.privacy.agents import verify_stores
from pipeline.privacy.erasure import start_erasure
from pipeline.runtime import Runtime

_TRUE = ("1", "true", "yes")


def register(rt: Runtime) -> None:
    erasures = rt.erasure_log
    assert erasures is not None

    async def erase_profile(request: web.Request) -> web.Response:
        """Record the request and send it into the pipeline; 202: the stages erase asynchronously."""
        try:
            key = identity_key(dict(request.query), rt.config.profile)
            suppress = request.query.get("suppress", "false").lower()
            if suppress not in (*_TRUE, "0", "false", "no"):
                raise ApiError(400, "invalid-parameter", "'suppress' is true or false")
        except ApiError as exc:
            return problem_response(exc)
        request_id, sends = start_erasure(key, erasures.salt, suppress=suppress in _TRUE, now_ms=rt.now_ms())
        erasures.note(sends[0].value)  # known here at once; the other workers read it from the topic
        for send in sends:
            rt.send(send)
        body = {**sends[0].value, "status_url": f"/privacy/erasures/{request_id}"}
        return web.json_response(body, status=202, dumps=lambda o: json.dumps(o, separators=(",", ":")))

    # its own route on the same path as the lookup (GET /profiles, pipeline/api/routes.py): aiohttp picks by method
    rt.app.web.web_app.router.add_route("DELETE", "/profiles", erase_profile)  # type: ignore[attr-defined]

    @rt.app.page("/privacy/erasures/{request_id}")
    async def erasure_status(web_: Any, request: Any, request_id: str) -> Any:
        record = erasures.requests.get(request_id)
        if record is None:
            return problem_response(ApiError(404, "not-found", "no such erasure request known to this worker"))
        body: dict[str, Any] = dict(record)
        if request.query.get("verify", "false").lower() in _TRUE:
            wanted = {record["subject"], *record.get("traces", ())}
            body["verification"] = verify_stores(rt, request_id, wanted).to_dict()
        return web_.json(body)
