"""API keys: the keys file, hashing, scopes, rotation without restart, and the failed-authentication limit.

The keys file (PIPELINE_API_KEYS_FILE, YAML; JSON is valid YAML too) holds hashes only:

    keys:
      - id: crm-sync                # shown in the access log; never the key itself
        hash: sha256:9f86d081...    # `pipeline api-key create` prints the key once and this entry
        scopes: [profiles:read, audiences:read]
        description: the CRM's nightly sync   # optional
        expires: 2027-01-31T00:00:00Z         # optional (UTC if no zone is given)

A key is `cdp_` + 43 characters of `secrets.token_urlsafe(32)` (256 random bits). The worker re-reads the
file when its modification time or size changes (at most once a second): a new key works, a removed one stops
working, without a restart. A file that no longer parses keeps the last good keys and logs the file, line
and problem; a bad file at start-up stops the worker (ConfigError).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import yaml

from pipeline.errors import ConfigError
from pipeline.yamlconf import Doc, compose_text

log = logging.getLogger(__name__)

ADMIN = "admin"
SCOPES = frozenset({"profiles:read", "audiences:read", "audiences:write", "privacy:erase", "metrics:read",
                    "destinations:read", "destinations:redrive", ADMIN})
KEY_PREFIX = "cdp_"
# sha256, not a slow KDF (scrypt/pbkdf2): the keys are 256 random bits made by `new_key`, not passwords a
# person chose, so there is nothing for a dictionary or brute-force attack to walk that a work factor would
# slow down; a slow hash would only cost CPU on every request (and make unauthenticated requests a cheap way
# to load the worker). A leaked keys file gives no usable key either way.
HASH_ALGORITHM = "sha256"
RELOAD_CHECK_S = 1.0


def hash_key(key: str) -> str:
    """The keys file's form of a key: `sha256:<hex>`."""
    return f"{HASH_ALGORITHM}:{hashlib.sha256(key.encode()).hexdigest()}"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    id: str
    hash: str  # "sha256:<64 hex>"
    scopes: frozenset[str]
    description: str = ""
    expires: datetime | None = None

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


def entry_yaml(key: ApiKey) -> str:
    """The keys-file entry for `key` (what `pipeline api-key create` prints)."""
    lines = [f"  - id: {key.id}", f"    hash: {key.hash}", f"    scopes: [{', '.join(sorted(key.scopes))}]"]
    if key.description:
        lines.append(f"    description: {json.dumps(key.description)}")  # a JSON string is a YAML scalar
    if key.expires:
        lines.append(f"    expires: {key.expires.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return "\n".join(lines) + "\n"


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - SCOPES)
    if unknown or not scopes:
        raise ConfigError(f"unknown scope(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(sorted(SCOPES))}")
    return scopes


def parse_keys(text: str, file: str) -> dict[str, ApiKey]:
    """The keys file's text -> {hash: ApiKey}; ConfigError naming file, line and problem."""
    doc = Doc(file)
    root = compose_text(text, file)
    top = doc.mapping(root, "the keys file")
    doc.check_keys(top, "the keys file", {"keys"}, set(), root)
    out: dict[str, ApiKey] = {}
    ids: set[str] = set()
    for node in doc.sequence(top["keys"][1], "keys"):
        fields = doc.mapping(node, "a key entry")
        doc.check_keys(fields, "a key entry", {"id", "hash", "scopes"}, {"description", "expires"}, node)
        key_id = doc.string(fields["id"][1], "id")
        if not all(c.isalnum() or c in "-_." for c in key_id) or len(key_id) > 64:
            raise doc.error("id: letters, digits, '-', '_' and '.' only (at most 64)", fields["id"][1])
        if key_id in ids:
            raise doc.error(f"duplicate key id {key_id!r}", fields["id"][1])
        ids.add(key_id)
        digest = doc.string(fields["hash"][1], "hash")
        algo, _, hexdigest = digest.partition(":")
        if algo != HASH_ALGORITHM or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise doc.error("hash must be 'sha256:' and 64 lower-case hex digits (from `pipeline api-key create`)",
                            fields["hash"][1])
        if digest in out:
            raise doc.error(f"the same hash as key {out[digest].id!r}", fields["hash"][1])
        scopes: set[str] = set()
        for s in doc.sequence(fields["scopes"][1], "scopes"):
            scope = doc.string(s, "a scope")
            if scope not in SCOPES:
                raise doc.error(f"unknown scope {scope!r}; valid: {', '.join(sorted(SCOPES))}", s)
            scopes.add(scope)
        if not scopes:
            raise doc.error("scopes must not be empty", fields["scopes"][1])
        description = doc.string(fields["description"][1], "description") if "description" in fields else ""
        expires = _expiry(doc, fields["expires"][1]) if "expires" in fields else None
        out[digest] = ApiKey(key_id, digest, frozenset(scopes), description, expires)
    return out


def _expiry(doc: Doc, node: yaml.Node) -> datetime:
    value = doc.scalar(node, "expires")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise doc.error("expires must be a date or an ISO 8601 time, e.g. 2027-01-31T00:00:00Z", node) from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise doc.error("expires must be a date or an ISO 8601 time, e.g. 2027-01-31T00:00:00Z", node)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass
class KeyStore:
    """The keys of a keys file, re-read when the file changes."""

    path: Path
    clock: Callable[[], float] = time.monotonic
    keys: dict[str, ApiKey] = field(default_factory=dict)
    _stamp: tuple[int, int] | None = None
    _checked: float = -math.inf

    @classmethod
    def load(cls, path: Path, clock: Callable[[], float] = time.monotonic) -> KeyStore:
        """Read the file now: a missing or bad file raises ConfigError (start-up)."""
        store = cls(path, clock)
        store.keys, store._stamp = store._read()
        store._checked = store.clock()
        log.info("API keys: %d loaded from %s", len(store.keys), path)
        return store

    def _read(self) -> tuple[dict[str, ApiKey], tuple[int, int]]:
        try:
            st = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the API keys file: {exc.strerror or exc}", file=str(self.path)) from exc
        return parse_keys(text, str(self.path)), (st.st_mtime_ns, st.st_size)

    def refresh(self) -> None:
        """Re-read the file if it changed (checked at most every RELOAD_CHECK_S); keep the last good keys if
        it cannot be read or parsed."""
        now = self.clock()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.error("API keys file %s: %s; keeping the %d keys loaded before", self.path,
                      exc.strerror or exc, len(self.keys))
            return
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return
        try:
            keys, stamp = self._read()
        except ConfigError as exc:
            self._stamp = (st.st_mtime_ns, st.st_size)  # logged once per change, not on every request
            log.error("API keys file not reloaded: %s; keeping the %d keys loaded before", exc, len(self.keys))
            return
        self.keys, self._stamp = keys, stamp
        log.info("API keys: %d loaded from %s (the file changed)", len(keys), self.path)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash matches `presented`: every entry is compared, each in constant time."""
        self.refresh()
        digest = hash_key(presented)
        found = None
        for stored, key in self.keys.items():
            if hmac.compare_digest(stored.encode(), digest.encode()):
                found = key
        return found


class FailureLimiter:
    """Failed authentications per client address: a token bucket of `burst` tokens refilled at `rate` a
    second. While a client's bucket is empty its requests get 429 with Retry-After (before any key check)."""

    def __init__(self, burst: float = 20, rate: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        self.burst, self.rate, self.clock, self.max_clients = burst, rate, clock, max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def _tokens(self, client: str) -> float:
        tokens, at = self._buckets.get(client, (self.burst, self.clock()))
        return min(self.burst, tokens + (self.clock() - at) * self.rate)

    def retry_after(self, client: str) -> int | None:
        """Seconds until this client may try again, or None when it may now."""
        tokens = self._tokens(client)
        return None if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.rate))

    def failed(self, client: str) -> None:
        if len(self._buckets) >= self.max_clients:  # forget the fullest buckets (least recently limited)
            for addr in [a for a in self._buckets if self._tokens(a) >= self.burst]:
                del self._buckets[addr]
            if len(self._buckets) >= self.max_clients:
                self._buckets.clear()
        self._buckets[client] = (self._tokens(client) - 1, self.clock())
