"""The console's routes: its static files under /console/, the audience editor's check, preview and save, and
the identity-rules simulator.

GET /console/ and /console/{file} serve pipeline/console/static/ (no key: the files hold no data; every API call
the page makes sends the key its user typed). POST /audiences/validate checks a query as it is typed (line and
column of a syntax error, evaluation kind and why) and, with `preview`, counts the stored profiles it would hold
(this worker's profile partitions and every other worker's, `X-CDP-Route: local`). PUT /audiences/{id} writes
the worker's segments.yaml, which the profile agent reloads (pipeline/profiles/timers.py), when
PIPELINE_AUDIENCES_WRITABLE allows it, and publishes it on `control.audiences`, from which every other worker
writes it into its own (pipeline.segments.follow); a failed publish is a 503. POST /identity/simulate stitches pasted records under the configured
identity rules and under changed ones (pipeline.profiles.simulate: the stages' own handlers, nothing stored).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.api.routing import LOCAL, ROUTE_HEADER, Router, parse_route, unavailable
from pipeline.api.server import problem_response
from pipeline.api.views import MAX_BODY_BYTES, ApiError, parse_json_body
from pipeline.console import STATIC_DIR
from pipeline.errors import ConfigError, DefinitionsNotShared
from pipeline.profiles.simulate import Rules, SimulationError, parse_records, rules_of, simulate, with_rules
from pipeline.runtime import Runtime
from pipeline.segments.editing import MAX_QUERY_CHARS, AudienceEdit, QueryCheck, check_query, put_audience
from pipeline.segments.sync import write_atomically
from pipeline.state.codec import Forward, decode_profile_entry

PREVIEW_MAX_PROFILES = 20_000  # per worker: the scan runs in the event loop
PREVIEW_SAMPLE = 10
META_PREFIX = b"__"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# the page loads only its own files and talks only to this worker
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def static_files(folder: Path = STATIC_DIR) -> dict[str, Path]:
    """The files the console serves, by name: only these, so no path reaches outside the folder."""
    return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in TYPES}


def register(rt: Runtime, router: Router) -> None:
    web_app = rt.app.web.web_app  # type: ignore[attr-defined]
    files = static_files()
    profiles = rt.ptables["profiles"]
    sync = rt.definitions
    assert sync is not None
    segments_file = sync.segments_file
    saving = asyncio.Lock()

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("file", "index.html")
        path = files.get(name)
        if path is None:
            return problem_response(ApiError(404, "not-found", "no such console file"))
        content_type = TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        return web.Response(body=path.read_bytes(), content_type=content_type, charset="utf-8",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

    web_app.router.add_get("/console/", serve)
    web_app.router.add_get("/console/{file}", serve)

    async def read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
        try:
            raw = await asyncio.wait_for(request.read(), rt.settings.web_read_timeout_s)
        except TimeoutError:
            raise ApiError(408, "body-timeout", "the body did not arrive in time") from None
        body = parse_json_body(raw)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid-json", "the body must be a JSON object")
        return raw, body

    def text_field(body: dict[str, Any], name: str, *, required: bool = True, min_len: int = 0,
                   max_len: int = MAX_QUERY_CHARS) -> str:
        """A string member of the body, as openapi.yaml describes it (400 otherwise)."""
        if name not in body:
            if required:
                raise ApiError(400, "missing-parameter", f"{name!r} is required")
            return ""
        value = body[name]
        if not isinstance(value, str) or not min_len <= len(value) <= max_len:
            raise ApiError(400, "invalid-parameter", f"{name!r} must be a string of {min_len} to {max_len} characters")
        return value

    def checked(body: dict[str, Any]) -> QueryCheck:
        if "preview" in body and not isinstance(body["preview"], bool):
            raise ApiError(400, "invalid-parameter", "'preview' must be true or false")
        return check_query(text_field(body, "id", min_len=1, max_len=256), text_field(body, "query"),
                           list(rt.engine.audiences.values()), history_retention_ms=rt.engine.history_retention_ms)

    def stored_profiles(partition: int) -> Iterator[Any]:
        for key, raw in profiles.store(partition).items():
            if raw is None or key.startswith(META_PREFIX):
                continue
            entry = decode_profile_entry(raw)
            if not isinstance(entry, Forward):
                yield entry

    def local_preview(check: QueryCheck) -> dict[str, Any]:
        """Members of the checked query among this worker's stored profiles (at most PREVIEW_MAX_PROFILES)."""
        assert check.engine is not None
        now, scanned, complete = rt.now_ms(), 0, True
        counts: dict[int, int] = {}
        sample: list[str] = []
        for partition in sorted(profiles.active()):
            n = 0
            for p in stored_profiles(partition):
                if scanned >= PREVIEW_MAX_PROFILES:
                    complete = False
                    break
                scanned += 1
                decisions = check.engine.evaluate(p, now, [check.audience_id], kind="batch")
                if any(d.audience_id == check.audience_id and d.qualified for d in decisions):
                    n += 1
                    if len(sample) < PREVIEW_SAMPLE:
                        sample.append(p.profile_id)
            counts[partition] = n
        return {"partitions": counts, "scanned": scanned, "complete": complete, "sample": sample}

    async def validate(request: web.Request) -> web.Response:
        try:
            raw, body = await read_json(request)
            check = checked(body)
            out = check.to_dict()
            if body.get("preview") is True and check.valid:
                route, _ = parse_route(request.headers.get(ROUTE_HEADER))
                if app_rebalancing():
                    raise unavailable("rebalancing", "this worker's partitions are being assigned; try again")
                started = time.perf_counter()
                preview = local_preview(check)
                if route == LOCAL:
                    return web.json_response({**out, "preview": {**preview, "size": sum(preview["partitions"].values()),
                                                                 "ms": 0}})
                others = await asyncio.gather(*(router.send_json(request, url, LOCAL, raw) for url in router.workers()))
                for other in others:
                    theirs = other["preview"]
                    preview["partitions"] |= {int(p): int(n) for p, n in theirs["partitions"].items()}
                    preview["scanned"] += theirs["scanned"]
                    preview["complete"] = preview["complete"] and theirs["complete"]
                    preview["sample"] = (preview["sample"] + theirs["sample"])[:PREVIEW_SAMPLE]
                missing = set(range(profiles.partitions)) - set(preview["partitions"])
                preview["complete"] = preview["complete"] and not missing
                preview["size"] = sum(preview["partitions"].values())
                preview["partitions"] = {str(p): n for p, n in sorted(preview["partitions"].items())}
                preview["ms"] = round((time.perf_counter() - started) * 1000, 1)
                out["preview"] = preview
            return web.json_response(out)
        except ApiError as exc:
            return problem_response(exc)

    def app_rebalancing() -> bool:
        return bool(rt.app.rebalancing or not rt.app.tables.recovery.completed.is_set())  # type: ignore[attr-defined]

    async def save(request: web.Request) -> web.Response:
        try:
            if not rt.settings.audiences_writable:
                raise ApiError(409, "read-only-definitions", "this worker does not write its audience definitions "
                               "(PIPELINE_AUDIENCES_WRITABLE is off): change segments.yaml where it is managed")
            _, body = await read_json(request)
            attributes = body.get("attributes", [])
            if not isinstance(attributes, list) or not all(isinstance(a, str) and a for a in attributes):
                raise ApiError(400, "invalid-parameter", "'attributes' must be a list of attribute paths")
            audience_id = request.match_info["audience_id"]
            query = text_field(body, "query", min_len=1)
            name = text_field(body, "name", required=False)
            description = text_field(body, "description", required=False)
            check = checked({"id": audience_id, "query": query})
            if not check.valid:
                first = check.problems[0]
                at = f" (line {first.line}, column {first.column})" if first.line is not None else ""
                raise ApiError(422, "invalid-query", first.message + at)
            edit = AudienceEdit(audience_id, query, name, description, tuple(attributes))
            async with saving:
                with sync.lock:  # not while the reader thread writes a file another worker saved
                    text = segments_file.read_text(encoding="utf-8") if segments_file.exists() else ""
                    try:
                        new, saved = put_audience(text, edit, file=str(segments_file))
                    except ConfigError as exc:
                        raise ApiError(422, "invalid-definitions", str(exc)) from None
                    created = saved.version == 1 and edit.id not in rt.engine.audiences
                    write_atomically(segments_file, new, "console")
                try:  # every other worker writes it into its own file (pipeline.segments.follow)
                    await asyncio.to_thread(sync.publish, rt.registry, rt.settings.kafka, new)
                except DefinitionsNotShared as exc:
                    raise ApiError(503, "definitions-not-shared", f"saved on this worker only: {exc}; the other "
                                   "workers keep their definitions until it is saved again") from None
            return web.json_response({"id": saved.id, "name": saved.name, "description": saved.description,
                                      "query": saved.query, "version": saved.version,
                                      "attributes": list(saved.attributes), **{k: v for k, v in check.to_dict().items()
                                      if k in ("streaming", "batch", "edge", "reason")}},
                                     status=201 if created else 200, dumps=lambda o: json.dumps(o))
        except ApiError as exc:
            return problem_response(exc)

    def rules_from(body: dict[str, Any]) -> Rules:
        """The body's `rules`, as openapi.yaml describes them (400 otherwise)."""
        rules = body.get("rules", {})
        if not isinstance(rules, dict):
            raise ApiError(400, "invalid-parameter", "'rules' must be an object")
        priorities, unique, limit = rules.get("priorities", {}), rules.get("unique"), rules.get("max_identities_per_graph")
        if not isinstance(priorities, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in priorities.values()):
            raise ApiError(400, "invalid-parameter", "'rules.priorities' maps namespaces to whole numbers")
        if unique is not None and (not isinstance(unique, list) or not all(isinstance(u, str) for u in unique)):
            raise ApiError(400, "invalid-parameter", "'rules.unique' is a list of namespaces")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise ApiError(400, "invalid-parameter", "'rules.max_identities_per_graph' is a whole number")
        return Rules(priorities, frozenset(unique) if unique is not None else None, limit)

    async def simulate_rules(request: web.Request) -> web.Response:
        """The records stitched under today's identity rules and under the changed ones (pure, nothing stored)."""
        try:
            _, body = await read_json(request)
            text = text_field(body, "records", max_len=MAX_BODY_BYTES)
            rules = rules_from(body)
            try:
                records = parse_records(text)
                cfg = rt.config.profile
                proposed = with_rules(cfg, rules)
                out = {"rules": rules_of(cfg.identity), "proposed_rules": rules_of(proposed.identity),
                       "records": len(records), "current": simulate(records, cfg).to_dict(),
                       "proposed": simulate(records, proposed).to_dict()}
            except SimulationError as exc:
                raise ApiError(400, "invalid-simulation", str(exc)) from None
            return web.json_response(out)
        except ApiError as exc:
            return problem_response(exc)

    web_app.router.add_post("/identity/simulate", simulate_rules)
    web_app.router.add_post("/audiences/validate", validate)
    web_app.router.add_put("/audiences/{audience_id}", save)
