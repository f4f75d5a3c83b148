"""The worker's API in-process, no broker: the app `build_app` makes, served by aiohttp's test server.

Routes against the OpenAPI description, authentication and scopes, Faust's own pages, limits and problem
bodies. (Profile lookups that reach the tables, and slow clients, are in test_api_worker.py.)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key
from pipeline.api.server import load_authenticator, openapi, operations
from pipeline.api.views import MAX_JSON_DEPTH, ApiError, identity_key, parse_json_body
from pipeline.app import build_app
from pipeline.errors import ConfigError
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.runtime import Runtime
from pipeline.settings import PipelineConfig, Settings

KEYS = {"admin": ["admin"], "reader": ["profiles:read"], "metrics": ["metrics:read"], "aud": ["audiences:read"]}
PROBLEM = "application/problem+json"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    return {name: new_key() for name in KEYS}


@pytest.fixture
def burst() -> int:
    """Failed authentications an address may make (a test parametrizes it to change it)."""
    return 5


@pytest.fixture
def writable() -> bool:
    """PIPELINE_AUDIENCES_WRITABLE, on a copy of the example configuration when on (a test parametrizes it)."""
    return False


@pytest.fixture
def runtime(tmp_path: Path, keys: dict[str, str], burst: int, writable: bool,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    if writable:
        config = tmp_path / "config"
        shutil.copytree(EXAMPLE_CONFIG_DIR, config)
        monkeypatch.setenv("PIPELINE_CONFIG", str(config))
        monkeypatch.setenv("PIPELINE_AUDIENCES_WRITABLE", "on")
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + "".join(entry_yaml(ApiKey(n, hash_key(keys[n]), frozenset(s)))
                                         for n, s in KEYS.items()))
    for name, value in {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "PIPELINE_DATA_DIR": str(tmp_path / "data"),
                        "PIPELINE_API_KEYS_FILE": str(path), "PIPELINE_API_FAILED_AUTH_BURST": str(burst)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PIPELINE_API_AUTH", raising=False)
    rt = build_app(Settings.from_env())
    rt.app.web.init_server()  # what `faust worker` does before serving: adds Faust's enabled blueprints
    yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(runtime.app.web.web_app)) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def problem_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status == status, await r.text()
    assert r.content_type == PROBLEM
    body: dict[str, Any] = await r.json(content_type=PROBLEM)
    assert body["status"] == status and {"type", "title", "detail"} <= body.keys()
    return body


def test_every_registered_route_is_described_and_every_described_operation_is_registered(
        runtime: Runtime) -> None:
    # Given the routes on the worker's web app (Faust's enabled blueprints added) and the OpenAPI operations
    registered = {(r.method, r.resource.canonical) for r in runtime.app.web.web_app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
    described = {(m, p) for p, ops in operations().items() for m in ops}
    # Then they are the same, but for Faust's production index at "/" (no setting removes it: the guard
    # answers 404 for it, tested below)
    assert registered - described == {("GET", "/")}
    assert described - registered == set()
    # And every secured operation documents 401, 403 and 429, and every response its content
    for path, item in openapi()["paths"].items():
        for method, op in item.items():
            if op.get("security"):
                assert {"401", "403", "429"} <= op["responses"].keys(), (method, path)


@pytest.mark.parametrize("burst", [1000])  # many 401s from one address here
async def test_each_secured_endpoint_refuses_a_missing_a_wrong_and_an_under_scoped_key(
        client: TestClient[Any, Any], keys: dict[str, str]) -> None:
    for path, ops in operations().items():
        for method, op in ops.items():
            if op.scope is None:
                continue
            url = re.sub(r"\{[^}]+\}", "0" * 22, path)  # any path parameter (a profile id, a request id)
            # When called without a key, Then 401 with WWW-Authenticate and a problem body
            r = await client.request(method, url)
            body = await problem_of(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer") and body["type"].endswith("unauthenticated")
            # When called with a wrong key (either header), Then 401
            await problem_of(await client.request(method, url, headers=auth(new_key())), 401)
            await problem_of(await client.request(method, url, headers={"X-API-Key": "nope"}), 401)
            # When called with a key without the operation's scope, Then 403
            other = "metrics" if op.scope != "metrics:read" else "reader"
            body = await problem_of(await client.request(method, url, headers=auth(keys[other])), 403)
            assert op.scope in body["detail"]


async def test_the_right_scope_or_admin_is_let_through(client: TestClient[Any, Any], keys: dict[str, str]) -> None:
    r = await client.get("/audiences", headers=auth(keys["aud"]))
    assert r.status == 200 and isinstance(await r.json(), list)
    r = await client.get("/metrics", headers={"X-API-Key": keys["metrics"]})
    assert r.status == 200 and "cdp_" in await r.text()
    for key in (keys["reader"], keys["admin"]):
        # (let through: this worker holds no partition, so it cannot know the profile: 503, never a 404)
        r = await client.get("/profiles/" + "0" * 22, headers=auth(key))
        assert (await problem_of(r, 503))["type"].endswith(":owner-unknown") and r.headers["Retry-After"] == "1"


async def test_health_readiness_and_the_description_need_no_key(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status in (200, 503)
    r = await client.get("/openapi.json")
    assert r.status == 200 and (await r.json())["openapi"].startswith("3.1")


@pytest.mark.parametrize("path", ["/", "/router/", "/table/identity/x/", "/table/profiles/x/", "/stats/",
                                  "/graph/", "/performance/", "/nope", "/profiles/a/b"])
async def test_faust_pages_and_anything_undescribed_are_404_problems(
        client: TestClient[Any, Any], keys: dict[str, str], path: str) -> None:
    # When anything not in the OpenAPI description is asked for, even with an admin key, Then 404
    await problem_of(await client.get(path, headers=auth(keys["admin"])), 404)


async def test_an_undescribed_method_is_405_with_allow(client: TestClient[Any, Any], keys: dict[str, str]) -> None:
    r = await client.put("/profiles", headers=auth(keys["admin"]))  # (DELETE is described: an erasure)
    await problem_of(r, 405)
    assert r.headers["Allow"] == "DELETE, GET, HEAD"


async def test_internal_keys_and_non_profile_ids_are_404(client: TestClient[Any, Any], keys: dict[str, str]) -> None:
    # Given the profiles table's metadata keys (formerly decoded as profiles: 500)
    for pid in ("__cdp_acked__:0", "__cdp_defs__:3", "__faust", "a@b.com", "X" * 300):
        # When asked for as a profile, Then 404
        await problem_of(await client.get(f"/profiles/{pid}", headers=auth(keys["reader"])), 404)


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"namespace": {"a": 1}, "id": "x"}, 400, "invalid-parameter"),
    ({"namespace": "Email", "id": ["a@b.com"]}, 400, "invalid-parameter"),
    ({"namespace": ["Email"], "id": "x"}, 400, "invalid-parameter"),
    ({"namespace": "Email", "id": 5}, 400, "invalid-parameter"),
    ({"namespace": "Email"}, 400, "missing-parameter"),
    ([1, 2], 400, "invalid-json"),
    ("a string", 400, "invalid-json"),
    ({"namespace": "Nope", "id": "x"}, 400, "unknown-namespace"),
    ({"namespace": "Email", "id": "x" * 5000}, 400, "invalid-parameter"),
])
async def test_edge_evaluate_type_errors_are_400(client: TestClient[Any, Any], keys: dict[str, str],
                                                 body: Any, status: int, kind: str) -> None:
    r = await client.post("/edge/evaluate", json=body, headers=auth(keys["reader"]))
    assert (await problem_of(r, status))["type"].endswith(kind)


async def test_deep_json_is_400_and_a_large_body_413(client: TestClient[Any, Any], keys: dict[str, str]) -> None:
    deep = "[" * 10_000 + "]" * 10_000  # (formerly a RecursionError: 500)
    r = await client.post("/edge/evaluate", data=deep, headers=auth(keys["reader"]))
    assert (await problem_of(r, 400))["type"].endswith("too-deep")
    r = await client.post("/edge/evaluate", data=b"{" + b" " * 70_000 + b"}", headers=auth(keys["reader"]))
    await problem_of(r, 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while it is read
        for _ in range(100):
            yield b" " * 1024

    r = await client.post("/edge/evaluate", data=chunks(), headers=auth(keys["reader"]))
    await problem_of(r, 413)


async def test_failed_authentications_are_rate_limited_with_retry_after(client: TestClient[Any, Any],
                                                                        keys: dict[str, str]) -> None:
    # Given a burst of 5 failed authentications (PIPELINE_API_FAILED_AUTH_BURST)
    for _ in range(5):
        await problem_of(await client.get("/audiences", headers=auth("wrong")), 401)
    # When the address tries again, even with a good key, Then 429 with Retry-After
    r = await client.get("/audiences", headers=auth(keys["aud"]))
    await problem_of(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    # And endpoints without authentication still answer
    assert (await client.get("/healthz")).status == 200


async def test_access_log_names_key_endpoint_and_status_never_the_query(
        client: TestClient[Any, Any], keys: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.api.access"):
        await client.get("/profiles", params={"namespace": "Email", "id": "secret.person@example.com"},
                         headers=auth(keys["reader"]))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.api.access"]
    assert len(lines) == 1 and "key=reader" in lines[0] and "endpoint=GET /profiles" in lines[0]
    # (aiohttp's own access line of this test server is left out: the worker's runner has none,
    # pipeline.state.faust_compat.set_web_timeouts makes it with access_log=None)
    assert not [r for r in caplog.records if r.name != "aiohttp.access" and "secret.person" in r.getMessage()]


def test_without_a_keys_file_the_worker_refuses_unless_auth_is_explicitly_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("PIPELINE_API_AUTH", raising=False)
    with pytest.raises(ConfigError, match="PIPELINE_API_KEYS_FILE"):
        load_authenticator(Settings.from_env())
    monkeypatch.setenv("PIPELINE_API_AUTH", "off")
    assert load_authenticator(Settings.from_env()).keys is None
    monkeypatch.setenv("PIPELINE_API_KEYS_FILE", str(tmp_path / "k.yaml"))
    with pytest.raises(ConfigError, match="choose one"):
        load_authenticator(Settings.from_env())
    monkeypatch.delenv("PIPELINE_API_AUTH")
    (tmp_path / "k.yaml").write_text("keys:\n  - id: a\n")
    with pytest.raises(ConfigError, match=r"k.yaml:2:5: a key entry: missing key\(s\) hash, scopes"):
        load_authenticator(Settings.from_env())


def test_json_depth_is_checked_before_parsing() -> None:
    assert parse_json_body(("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode()) is not None
    assert parse_json_body(json.dumps({"k": "[[[[" * 100}).encode()) == {"k": "[[[[" * 100}  # in a string
    with pytest.raises(ApiError, match="deeper than"):
        parse_json_body(("[" * (MAX_JSON_DEPTH + 1)).encode())
    with pytest.raises(ApiError, match="UTF-8"):
        parse_json_body(b"\xff")


def test_identity_key_refuses_non_strings() -> None:
    cfg = PipelineConfig.load(Settings.from_env().config_dir).profile
    assert identity_key({"namespace": "Email", "id": "A@Example.com"}, cfg).startswith("Email:")
    for params in ({"namespace": {}, "id": "x"}, {"namespace": "Email", "id": 1.5}, {"namespace": None, "id": "x"}):
        with pytest.raises(ApiError) as err:
            identity_key(params, cfg)
        assert err.value.status == 400


async def test_the_listener_speaks_tls_with_a_certificate_and_key(
        tmp_path: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    from aiohttp import web

    from pipeline.api.server import faust_web_settings, tls_context
    from pipeline.local.broker import free_port
    from pipeline.local.cluster import make_tls

    # Given a certificate and key (one PEM holds both here) in PIPELINE_WEB_TLS_CERT / _KEY
    keystore, ca = make_tls(tmp_path)
    monkeypatch.setenv("PIPELINE_WEB_TLS_CERT", str(keystore))
    monkeypatch.setenv("PIPELINE_WEB_TLS_KEY", str(keystore))
    ctx = tls_context(Settings.from_env())
    assert ctx is not None and faust_web_settings(Settings.from_env(), load_authenticator(Settings.from_env()))[
        "web_ssl_context"] is not None
    # When the API is served with that context (as Faust's TCPSite does with web_ssl_context)
    runner = web.AppRunner(runtime.app.web.web_app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        # Then a client that trusts the CA gets its answer over HTTPS
        async with httpx.AsyncClient(verify=str(ca)) as http:
            assert (await http.get(f"https://127.0.0.1:{port}/healthz")).json() == {"alive": True}
    finally:
        await runner.cleanup()
    # And only one of the two is a configuration error
    monkeypatch.delenv("PIPELINE_WEB_TLS_KEY")
    with pytest.raises(ConfigError, match="go together"):
        tls_context(Settings.from_env())


async def test_the_console_files_need_no_key_and_nothing_outside_them_is_served(client: TestClient[Any, Any]) -> None:
    # When the console's page and a script are asked for without a key, Then they are served with their types,
    # under a policy that lets the page load only its own files
    page = await client.get("/console/")
    assert page.status == 200 and page.content_type == "text/html" and "CDP console" in await page.text()
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'; script-src 'self'")
    script = await client.get("/console/console.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    # When a file that is not the console's is asked for, Then 404 problems
    for url in ("/console/nope.js", "/console/..%2F__init__.py", "/console/%2E%2E%2Fserver.py", "/console/__init__.py"):
        await problem_of(await client.get(url), 404)


async def test_a_query_is_checked_with_the_line_and_column_of_its_error(client: TestClient[Any, Any],
                                                                        keys: dict[str, str]) -> None:
    # When a query with a syntax error on its second line is checked, Then its line and column come back
    r = await client.post("/audiences/validate", headers=auth(keys["aud"]),
                          json={"id": "x", "query": 'loyalty.tier = "gold" and\nloyalty.points >'})
    assert r.status == 200 and await r.json() == {
        "audience_id": "x", "valid": False, "streaming": False, "batch": False, "edge": False, "reason": "",
        "errors": [{"message": "unexpected end of query; expected 'false', 'true', a name/path, a number, a string",
                    "line": 2, "column": 17}]}
    # When a valid one is, Then its evaluation kind and why
    r = await client.post("/audiences/validate", headers=auth(keys["aud"]), json={"id": "x", "query": 'loyalty.tier = "gold"'})
    assert await r.json() == {"audience_id": "x", "valid": True, "errors": [], "streaming": True, "batch": True,
                              "edge": True, "reason": "streaming: reads only profile attributes/segments; edge: only "
                                                      "profile attributes and inSegment(), evaluable on request"}
    # When the body lacks the query or has the wrong types, Then 400 problems
    for body in ({"id": "x"}, {"id": 1, "query": "a = 1"}, {"id": "x", "query": "a = 1", "preview": "yes"}):
        await problem_of(await client.post("/audiences/validate", headers=auth(keys["aud"]), json=body), 400)


async def test_saving_an_audience_is_refused_where_definitions_are_not_writable(
        client: TestClient[Any, Any], keys: dict[str, str], runtime: Runtime) -> None:
    # Given a worker without PIPELINE_AUDIENCES_WRITABLE, When an admin saves an audience, Then 409 and no write
    before = (runtime.settings.config_dir / "segments.yaml").read_text()
    r = await client.put("/audiences/x", headers=auth(keys["admin"]), json={"query": 'loyalty.tier = "gold"'})
    assert (await problem_of(r, 409))["type"].endswith(":read-only-definitions")
    assert (runtime.settings.config_dir / "segments.yaml").read_text() == before


@pytest.mark.parametrize("writable", [True])
async def test_a_save_that_cannot_reach_the_other_workers_is_a_503(
        client: TestClient[Any, Any], keys: dict[str, str], runtime: Runtime) -> None:
    # Given a worker whose definitions are writable and whose Kafka cluster does not answer
    assert runtime.definitions is not None
    runtime.definitions.publish_timeout_s = 1.0
    # When an admin saves an audience, Then a 503 problem says it is saved on this worker only
    try:
        r = await client.put("/audiences/x", headers=auth(keys["admin"]), json={"query": 'loyalty.tier = "gold"'})
    finally:
        runtime.definitions.stop()  # (its producer)
    body = await problem_of(r, 503)
    assert body["type"].endswith(":definitions-not-shared") and "saved on this worker only" in body["detail"]
    assert "- id: x" in (runtime.settings.config_dir / "segments.yaml").read_text()
