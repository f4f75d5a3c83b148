"""API keys (pipeline/api/auth.py): the keys file, hashing, scopes, rotation, the failed-authentication limit."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.api.auth import (
    ApiKey,
    FailureLimiter,
    KeyStore,
    entry_yaml,
    hash_key,
    new_key,
    parse_keys,
    parse_scopes,
)
from pipeline.cli import main
from pipeline.errors import ConfigError


def keys_file(path: Path, *entries: tuple[str, str, list[str]]) -> Path:
    path.write_text("keys:\n" + "".join(entry_yaml(ApiKey(i, hash_key(k), frozenset(s))) for i, k, s in entries))
    return path


def test_a_key_is_stored_as_its_sha256_and_found_by_the_key_only(tmp_path: Path) -> None:
    # Given a keys file with one key
    key = new_key()
    path = keys_file(tmp_path / "keys.yaml", ("crm", key, ["profiles:read"]))
    # Then the file holds its hash, never the key
    assert key not in path.read_text() and hash_key(key).split(":")[1] in path.read_text()
    assert key.startswith("cdp_") and len(key) == 4 + 43
    # When keys are presented
    store = KeyStore.load(path)
    found = store.find(key)
    # Then the right key is found, with its scopes; a wrong one is not
    assert found is not None and found.id == "crm" and found.allows("profiles:read")
    assert not found.allows("metrics:read")
    assert store.find(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.find("") is None


def test_admin_has_every_scope() -> None:
    key = ApiKey("ops", hash_key("x"), frozenset({"admin"}))
    assert all(key.allows(s) for s in ("profiles:read", "audiences:write", "privacy:erase", "metrics:read"))


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("keys:\n  - id: a\n    hash: sha256:abc\n    scopes: [profiles:read]\n", 3, "hash must be"),
    ("keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: [profile:read]\n", 4, "unknown scope 'profile:read'"),
    ("keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: []\n", 4, "scopes must not be empty"),
    ("keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: [admin]\n  - id: a\n    hash: sha256:"
     + "1" * 64 + "\n    scopes: [admin]\n", 5, "duplicate key id 'a'"),
    ("keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: [admin]\n    secret: x\n", 5, "unknown key 'secret'"),
    ("keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: [admin]\n    expires: soon\n", 5, "expires must be"),
    ("keys:\n  - id: a b\n    hash: sha256:" + "0" * 64 + "\n    scopes: [admin]\n", 2, "id: letters"),
    ("keys: [\n", 2, "invalid YAML"),
])
def test_a_bad_keys_file_names_file_line_and_problem(text: str, line: int, problem: str) -> None:
    # When a keys file with a mistake is parsed, Then the error says where and what
    with pytest.raises(ConfigError) as err:
        parse_keys(text, "keys.yaml")
    assert err.value.file == "keys.yaml" and err.value.line == line and problem in err.value.problem


def test_expiry_dates_and_times_are_utc() -> None:
    text = "keys:\n  - id: a\n    hash: sha256:" + "0" * 64 + "\n    scopes: [admin]\n    expires: 2027-01-31\n"
    key = next(iter(parse_keys(text, "k").values()))
    assert key.expires == datetime(2027, 1, 31, tzinfo=UTC)
    assert not key.expired(datetime(2027, 1, 30, tzinfo=UTC)) and key.expired(datetime(2027, 1, 31, tzinfo=UTC))


def test_keys_rotate_without_restart_and_a_bad_file_keeps_the_last_good_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Given a store on a keys file with key A, on a clock the test moves
    now = [0.0]
    a, b = new_key(), new_key()
    path = keys_file(tmp_path / "keys.yaml", ("a", a, ["admin"]))
    store = KeyStore.load(path, clock=lambda: now[0])
    # When the file is replaced with key B (and a second has passed)
    keys_file(path, ("b", b, ["admin"]))
    os.utime(path, ns=(1, 10**18))
    now[0] += 1.5
    # Then B works and A no longer does
    assert store.find(b) is not None and store.find(a) is None
    # When the file is broken
    path.write_text("keys:\n  - id: c\n    hash: nope\n    scopes: [admin]\n")
    now[0] += 1.5
    with caplog.at_level(logging.ERROR):
        # Then B still works, and the log says which file, line and problem
        assert store.find(b) is not None
    assert f"{path}:3:11: hash must be" in caplog.text and "keeping the 1 keys" in caplog.text
    # When the file goes away, B still works
    path.unlink()
    now[0] += 1.5
    assert store.find(b) is not None


def test_a_missing_keys_file_at_start_up_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        KeyStore.load(tmp_path / "nope.yaml")


def test_failed_authentications_are_limited_per_address() -> None:
    # Given a limiter of 3 failures, refilled one a second
    now = [0.0]
    limiter = FailureLimiter(burst=3, rate=1.0, clock=lambda: now[0])
    # When an address fails three times
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failed("10.0.0.1")
    # Then it must wait a second; another address is not affected
    assert limiter.retry_after("10.0.0.1") == 1 and limiter.retry_after("10.0.0.2") is None
    # When a second has passed, it may try once more
    now[0] += 1.0
    assert limiter.retry_after("10.0.0.1") is None


def test_scopes_parse_and_unknown_ones_are_refused() -> None:
    assert parse_scopes("profiles:read, metrics:read") == {"profiles:read", "metrics:read"}
    with pytest.raises(ConfigError, match="unknown scope"):
        parse_scopes("profiles:write")


def test_api_key_create_prints_the_key_once_and_an_entry_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    # When a key is created on the command line
    assert main(["api-key", "create", "--id", "crm-sync", "--scopes", "profiles:read,audiences:read",
                 "--description", "nightly: sync", "--expires", "2030-01-01"]) == 0
    out = capsys.readouterr().out
    key = next(w for w in out.split() if w.startswith("cdp_"))
    entry = out[out.index("  - id:"):]
    # Then the entry holds the key's hash, not the key, and is a valid keys file entry
    keys = parse_keys("keys:\n" + entry, "k")
    assert key not in entry and list(keys) == [hash_key(key)]
    found = keys[hash_key(key)]
    assert found.scopes == {"profiles:read", "audiences:read"} and found.description == "nightly: sync"
    # And unknown scopes are refused
    assert main(["api-key", "create", "--id", "x", "--scopes", "everything"]) == 2
