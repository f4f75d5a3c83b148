"""Loading destinations YAML: the example file, defaults, env headers, errors with file and line."""

from __future__ import annotations

import pytest

from pipeline.destinations.base import DestinationContext, create_destination, destination_kinds
from pipeline.destinations.config import load_destinations, parse_destinations
from pipeline.destinations.files import FileSettings
from pipeline.destinations.http import HttpSettings
from pipeline.errors import ConfigError, UnknownNameError
from pipeline.resources import EXAMPLE_CONFIG_DIR

EXAMPLE = EXAMPLE_CONFIG_DIR / "destinations.yaml"

BASE = """destinations:
  - name: hook
    kind: http
    audiences: [vip]
    identities:
      - {namespace: Email, transform: sha256_lower}
    url: http://127.0.0.1:8080/x
"""


def test_example_file_loads() -> None:
    cfg = load_destinations(EXAMPLE, env={})  # the example needs no secrets to run locally
    assert cfg.names() == ["crm-webhook", "ads-stream", "nightly-export", "hourly-changes"]
    hook = parse_destinations(BASE + "    headers: {Authorization: \"Bearer ${CRM_TOKEN}\"}\n",
                              env={"CRM_TOKEN": "t0ken"}).get("hook")
    assert dict(hook.settings_as(HttpSettings).headers)["Authorization"] == "Bearer t0ken"
    assert "t0ken" not in repr(hook)  # secrets stay out of reprs (and so out of logs)
    assert cfg.get("ads-stream").audiences is None
    nightly = cfg.get("nightly-export").settings_as(FileSettings)
    assert nightly.format == "parquet" and nightly.interval_s is None
    hourly = cfg.get("hourly-changes").settings_as(FileSettings)
    assert hourly.interval_s == 3600


def test_defaults() -> None:
    d = parse_destinations(BASE).get("hook")
    http = d.settings_as(HttpSettings)
    assert http.method == "POST" and http.batch.max_records == 100 and http.retry.max_attempts == 5
    assert d.identities[0].transform == "sha256_lower" and d.consent is None


def _error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_destinations(text, file="dest.yaml", env=env or {})
    return info.value


def test_unknown_kind_lists_valid_kinds_with_line() -> None:
    err = _error(BASE.replace("kind: http", "kind: ftp"))
    assert isinstance(err, UnknownNameError)
    # (the registered kinds: the built-in ones, and any a test module registers, such as "memory")
    assert err.valid == destination_kinds() and {"file", "http", "kafka"} <= set(err.valid)
    assert err.line == 3 and "dest.yaml:3" in str(err)


def test_registry_unknown_kind() -> None:
    cfg = parse_destinations(BASE).get("hook")
    from dataclasses import replace
    with pytest.raises(UnknownNameError) as info:
        create_destination(replace(cfg, kind="carrier-pigeon"), DestinationContext())
    assert {"file", "http", "kafka"} <= set(destination_kinds()) and "http" in str(info.value)


@pytest.mark.parametrize(("change", "line", "words"), [
    (("    url: http://127.0.0.1:8080/x\n", "    url: http://127.0.0.1:8080/x\n    colour: red\n"), 8, "colour"),
    (("sha256_lower", "md5"), 6, "transform"),
    (("[vip]", "[]"), 4, "empty"),
    (("http://127.0.0.1:8080/x", "ftp://x"), 7, "url"),
    (("    url: http://127.0.0.1:8080/x\n", "    url: http://127.0.0.1:8080/x\n    timeout_s: -1\n"), 8, "positive"),
    (("    url: http://127.0.0.1:8080/x\n", "    url: http://127.0.0.1:8080/x\n    headers: {A: '${NOPE}'}\n"), 8,
     "NOPE"),
])
def test_errors_name_file_and_line(change: tuple[str, str], line: int, words: str) -> None:
    err = _error(BASE.replace(*change))
    assert err.file == "dest.yaml" and err.line == line and words in str(err)


def test_file_settings_errors() -> None:
    text = BASE.replace("kind: http", "kind: file").replace("url: http://127.0.0.1:8080/x", "path: /tmp/x")
    cron = parse_destinations(text + "    schedule: '*/5 * * * *'\n").destinations[0].settings_as(FileSettings)
    assert cron.schedule == "*/5 * * * *"
    err = _error(text + "    schedule: every tuesday\n")
    assert err.line == 8 and "schedule" in str(err)
    err = _error(text + "    format: xml\n")
    assert "csv, jsonl, parquet" in str(err)


def test_duplicate_names_and_missing_keys() -> None:
    err = _error(BASE + BASE.split("destinations:\n", 1)[1])
    assert "defined twice" in str(err) and err.line == 8
    err = _error(BASE.replace("    audiences: [vip]\n", ""))
    assert "audiences" in str(err) and err.line == 2


def test_yaml_syntax_error_has_line() -> None:
    err = _error(BASE + "  - name: [unclosed\n")
    assert err.line is not None and "invalid YAML" in str(err)
