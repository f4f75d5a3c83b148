"""The destinations endpoints (the console's destinations page): GET /destinations (destinations:read) and
POST /destinations/{name}/redrive (destinations:redrive).

Health comes from where `pipeline destinations status` reads it: lag and dead-letter depth from Kafka (any
process can ask), last delivery, error counts and breaker from the status file the destination runner writes in
its data folder (PIPELINE_DATA_DIR; on another machine the worker cannot see it: `runner` says "not running"),
and a file destination's last exports from their manifests. A redrive re-delivers the destination's dead letters
from this worker, through a destination of its own, as `pipeline destinations redrive` does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.api.server import problem_response
from pipeline.api.views import ApiError
from pipeline.destinations.cli import collect_status, load_config, redrive
from pipeline.destinations.config import DestinationConfig
from pipeline.destinations.files import FileSettings, recent_manifests
from pipeline.errors import ConfigError, UnknownNameError
from pipeline.runtime import Runtime

RECENT_EXPORTS = 5
# Reading the health opens a Kafka consumer per destination: requests within this many seconds share one read
HEALTH_TTL_S = 2.0


def register(rt: Runtime) -> None:
    web_app = rt.app.web.web_app  # type: ignore[attr-defined]
    redriving: set[str] = set()
    health: dict[str, Any] = {"at": -HEALTH_TTL_S, "rows": None}
    reading = asyncio.Lock()

    def configured() -> list[DestinationConfig]:
        if not (Path(rt.settings.config_dir) / "destinations.yaml").exists():
            return []
        try:
            return list(load_config(rt.settings))
        except ConfigError as exc:  # edited since the worker started: say where it is wrong
            raise ApiError(500, "invalid-destinations", str(exc)) from None

    async def read_health() -> list[dict[str, Any]]:
        configs = configured()
        status = await collect_status(rt.settings, configs)
        out = []
        for cfg in configs:
            exports = (await asyncio.to_thread(recent_manifests, cfg.settings, RECENT_EXPORTS)
                       if isinstance(cfg.settings, FileSettings) else None)
            out.append({"name": cfg.name, "kind": cfg.kind,
                        "audiences": sorted(cfg.audiences) if cfg.audiences is not None else None,
                        **status[cfg.name], "exports": exports})
        return out

    async def destinations(request: web.Request) -> web.Response:
        try:
            async with reading:
                if time.monotonic() - health["at"] >= HEALTH_TTL_S:
                    health["rows"] = await read_health()
                    health["at"] = time.monotonic()
            return web.json_response(health["rows"])
        except ApiError as exc:
            return problem_response(exc)

    async def redrive_destination(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            try:
                cfg = next(c for c in configured() if c.name == name)
            except StopIteration:
                raise ApiError(404, "unknown-destination", "no such destination") from None
            if name in redriving:  # two redrives of one destination would deliver its dead letters twice
                raise ApiError(409, "redrive-running", f"a redrive of {name} is running on this worker")
            redriving.add(name)
            try:
                n = await redrive(rt.settings, cfg)
            finally:
                redriving.discard(name)
                health["at"] = -HEALTH_TTL_S  # the next read shows what the redrive left
            return web.json_response({"destination": name, "redriven": n})
        except UnknownNameError:
            return problem_response(ApiError(404, "unknown-destination", "no such destination"))
        except ApiError as exc:
            return problem_response(exc)

    web_app.router.add_get("/destinations", destinations)
    web_app.router.add_post("/destinations/{name}/redrive", redrive_destination)
