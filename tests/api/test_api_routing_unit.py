"""The routing helpers without workers: who holds a partition, the route header, the advertised URL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.api.routing import owners, parse_route
from pipeline.api.views import ApiError
from pipeline.connection import KafkaConnection
from pipeline.settings import Settings


def test_owners_from_the_assignment_metadata() -> None:
    metadata = {"http://a:1": {"t-changelog": [0, 2], "u": [1]}, "http://b:1": {"t-changelog": [1, 3]}}
    assert owners(metadata, "t-changelog") == {0: "http://a:1", 2: "http://a:1", 1: "http://b:1", 3: "http://b:1"}
    assert owners(metadata, "other") == {}


def test_route_header() -> None:
    assert [parse_route(None), parse_route("identity"), parse_route("profile=ab12"), parse_route("local")] == [
        ("", None), ("identity", None), ("profile", "ab12"), ("local", None)]
    for bad in ("profile=", "identity=x", "nope"):
        with pytest.raises(ApiError) as info:
            parse_route(bad)
        assert info.value.status == 400


def settings(**kw: object) -> Settings:
    base: dict[str, object] = {"kafka": KafkaConnection.from_env(os.environ), "app_id": "a", "config_dir": Path("."),
                               "data_dir": Path("."), "web_port": 7001, "topic_prefix": "", "worker_name": "w"}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def test_advertised_url() -> None:
    assert settings().advertised_url == "http://127.0.0.1:7001"
    assert settings(web_tls_cert=Path("c.pem")).advertised_url == "https://127.0.0.1:7001"
    assert settings(web_host="0.0.0.0").advertised_url.endswith(":7001")
    assert "0.0.0.0" not in settings(web_host="0.0.0.0").advertised_url
    assert settings(web_host="::1").advertised_url == "http://[::1]:7001"
    assert settings(web_advertised_url="https://w1.cdp.svc:443").advertised_url == "https://w1.cdp.svc:443"
