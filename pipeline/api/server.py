"""The API's guard around every request (aiohttp middleware on Faust's web app) and the web server's settings.

For every request, in order:
1. only what pipeline/api/openapi.yaml describes is served: any other path is 404, another method 405
   (Faust's own pages, which this module also turns off, included);
2. operations with a `security` requirement need an API key with its scope (pipeline.api.auth): 401 without
   a key or with an unknown or expired one (with WWW-Authenticate), 403 without the scope; failed
   authentications are counted per client address, and over the limit the answer is 429 with Retry-After;
3. a body over MAX_BODY_BYTES is refused (413) before it is read (and aiohttp's client_max_size refuses a
   chunked one while it is read);
4. every error is an RFC 9457 problem (application/problem+json), an unexpected exception included (500,
   logged without its message);
5. profile reads are written to the access log (logger `pipeline.api.access`): key id, endpoint, profile
   id, status; never the identity asked for, nor the query string.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError

from pipeline.api.auth import FailureLimiter, KeyStore
from pipeline.api.views import MAX_BODY_BYTES, PROBLEM_CONTENT_TYPE, ApiError
from pipeline.errors import ConfigError, where
from pipeline.settings import Settings

log = logging.getLogger(__name__)
access_log = logging.getLogger("pipeline.api.access")

OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")
PROFILE_ID_KEY = web.RequestKey("cdp.profile_id", str)  # a handler sets it: the profile it served (access log)
KEY_ID_KEY = web.RequestKey("cdp.key_id", str)
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Operation:
    path: str
    method: str  # upper case
    operation_id: str
    scope: str | None  # None: no authentication
    logged: bool  # a profile read: one access-log line


@cache
def openapi() -> dict[str, Any]:
    """The OpenAPI description (pipeline/api/openapi.yaml)."""
    spec: dict[str, Any] = yaml.safe_load(OPENAPI_FILE.read_text(encoding="utf-8"))
    return spec


@cache
def operations() -> dict[str, dict[str, Operation]]:
    """path template -> METHOD -> Operation, from the OpenAPI description: its `security` is the scope."""
    out: dict[str, dict[str, Operation]] = {}
    for path, item in openapi()["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            scopes = {s for requirement in op.get("security", []) for ss in requirement.values() for s in ss}
            if len(scopes) > 1:
                raise ValueError(f"{method.upper()} {path}: one scope per operation, not {sorted(scopes)}")
            out.setdefault(path, {})[method.upper()] = Operation(
                path, method.upper(), op["operationId"], next(iter(scopes), None), "profiles" in op.get("tags", []))
    return out


def problem_response(exc: ApiError) -> web.Response:
    return web.Response(status=exc.status, body=json.dumps(exc.body).encode(), headers=exc.headers,
                        content_type=PROBLEM_CONTENT_TYPE)


class Authenticator:
    """API keys (None: authentication off, PIPELINE_API_AUTH=off) and the failed-authentication limit."""

    def __init__(self, keys: KeyStore | None, limiter: FailureLimiter | None = None) -> None:
        self.keys = keys
        self.limiter = limiter or FailureLimiter()

    @staticmethod
    def presented(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return request.headers.get("X-API-Key", "").strip() or None

    def authorize(self, request: web.Request, scope: str) -> str:
        """The id of the key that may do `scope`, or ApiError 401/403/429."""
        if self.keys is None:
            return "-"
        client = request.remote or "unknown"
        wait = self.limiter.retry_after(client)
        if wait is not None:
            raise ApiError(429, "too-many-failed-authentications",
                           f"too many failed authentications from this address; retry in {wait} s",
                           {"Retry-After": str(wait)})
        presented = self.presented(request)
        key = self.keys.find(presented) if presented else None
        if key is None or key.expired(_utcnow()):
            self.limiter.failed(client)
            if presented is None:
                raise ApiError(401, "unauthenticated",
                               "an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                               {"WWW-Authenticate": 'Bearer realm="cdp-pipeline"'})
            detail = "this API key has expired" if key is not None else "unknown API key"
            raise ApiError(401, "invalid-key", detail,
                           {"WWW-Authenticate": 'Bearer realm="cdp-pipeline", error="invalid_token"'})
        if not key.allows(scope):
            raise ApiError(403, "insufficient-scope", f"this API key lacks the scope {scope!r}",
                           {"WWW-Authenticate": f'Bearer realm="cdp-pipeline", error="insufficient_scope", '
                                                f'scope="{scope}"'})
        return key.id


def _utcnow() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def find_operation(request: web.Request) -> Operation:
    """The described operation `request` is for, or ApiError 404/405."""
    match = request.match_info
    if isinstance(match, MatchInfoError):
        if match.http_exception.status == 405:
            allowed: set[str] = getattr(match.http_exception, "allowed_methods", set())
            raise ApiError(405, "method-not-allowed", f"{request.method} is not allowed here",
                           {"Allow": ", ".join(sorted(allowed))})
        raise ApiError(404, "not-found", "no such endpoint")
    resource = match.route.resource
    ops = operations().get(resource.canonical) if resource is not None else None
    if not ops:
        raise ApiError(404, "not-found", "no such endpoint")
    op = ops.get("GET" if request.method == "HEAD" else request.method)
    if op is None:
        raise ApiError(405, "method-not-allowed", f"{request.method} is not allowed here",
                       {"Allow": ", ".join(sorted(ops))})
    return op


def guard(auth: Authenticator) -> Any:
    """The middleware (see the module's docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        op: Operation | None = None
        try:
            op = find_operation(request)
            if op.scope is not None:
                request[KEY_ID_KEY] = auth.authorize(request, op.scope)
            if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
                raise ApiError(413, "body-too-large", f"the body is over {MAX_BODY_BYTES} bytes")
            response = await handler(request)
        except ApiError as exc:
            response = problem_response(exc)
        except web.HTTPException as exc:  # aiohttp's own, e.g. 413 from client_max_size
            if exc.status < 400:
                raise
            slug = {413: "body-too-large"}.get(exc.status, exc.reason.lower().replace(" ", "-"))
            response = problem_response(ApiError(exc.status, slug, exc.reason, {
                k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}))
        except Exception as exc:  # noqa: BLE001 - the client gets a problem, the log the frames (no message)
            log.error("%s %s failed: %s", request.method, op.path if op else "?", where(exc))
            response = problem_response(ApiError(500, "internal-error", "the request failed; see the worker log"))
        if op is not None and op.logged:
            access_log.info("key=%s endpoint=%s status=%d profile=%s ms=%.1f", request.get(KEY_ID_KEY, "-"),
                            f"{op.method} {op.path}", response.status, request.get(PROFILE_ID_KEY, "-"),
                            (time.perf_counter() - started) * 1000)
        return response

    return middleware


def load_authenticator(settings: Settings) -> Authenticator:
    """The worker's API authentication from its settings. Without a keys file the worker refuses to start,
    unless PIPELINE_API_AUTH=off says explicitly that its API is open (a local demo, a test)."""
    limiter = FailureLimiter(burst=settings.api_failed_auth_burst)
    if settings.api_keys_file is not None:
        if not settings.api_auth:
            raise ConfigError("PIPELINE_API_AUTH=off and PIPELINE_API_KEYS_FILE are both set: choose one")
        return Authenticator(KeyStore.load(settings.api_keys_file), limiter)
    if settings.api_auth:
        raise ConfigError("the worker's API needs API keys: set PIPELINE_API_KEYS_FILE to a keys file "
                          "(`pipeline api-key create` makes a key and its entry), or PIPELINE_API_AUTH=off to "
                          "serve personal data without authentication (local demos only)")
    log.warning("PIPELINE_API_AUTH=off: the worker's API serves profiles to anyone who can reach %s:%d",
                settings.web_host, settings.web_port)
    return Authenticator(None, limiter)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context from PIPELINE_WEB_TLS_CERT / PIPELINE_WEB_TLS_KEY, or None (plain HTTP)."""
    cert, key = settings.web_tls_cert, settings.web_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("PIPELINE_WEB_TLS_CERT and PIPELINE_WEB_TLS_KEY go together: set both or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the web listener's certificate and key: {exc}", file=str(cert)) from exc
    return ctx


def faust_web_settings(settings: Settings, auth: Authenticator) -> dict[str, Any]:
    """faust.App keyword arguments for the web server: Faust's own pages off (router, tables, stats, graph,
    performance; its production index at `/` is left registered but the guard answers 404 for it, as for
    anything else not in the OpenAPI description), the guard, the body limit, TLS."""
    return {
        "web_router_enabled": False,
        "web_tables_enabled": False,
        "web_stats_enabled": False,
        "web_graph_enabled": False,
        "web_metrics_enabled": False,
        "web_application_options": {"client_max_size": MAX_BODY_BYTES, "middlewares": [guard(auth)]},
        "web_ssl_context": tls_context(settings),
    }
