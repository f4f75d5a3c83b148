"""A small fake of Confluent Schema Registry's REST API for the tests (no Docker here, so no real registry).

It serves what the pipeline and confluent-kafka's serializers use: register a schema under a subject
(`POST /subjects/<subject>/versions`) and get a schema by id (`GET /schemas/ids/<id>`). A schema's id is the
embedded catalog's id for the same schema (`schema_id_for`), so records the tests encode with the embedded
catalog resolve through it too, and the same schema keeps its id across subjects, as in Confluent's registry.
Optional: HTTPS (a CA the tests hand to the worker), HTTP basic auth per user, and per-user subjects a user may
read but not write (a read-only role binding). It can be stopped and started again on the same port (an outage).
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipeline.local.broker import free_port
from pipeline.local.cluster import make_tls
from pipeline.serde.avro import schema_id_for


class FakeSchemaRegistry:
    """Subjects with their versions, schemas by id; every request and its outcome is counted."""

    def __init__(self, tls_dir: Path | None = None, users: dict[str, str] | None = None,
                 read_only: dict[str, tuple[str, ...]] | None = None) -> None:
        self.keystore, self.ca_file = make_tls(tls_dir) if tls_dir is not None else (None, None)
        self.users = users or {}  # user -> password; empty: no authentication
        self.read_only = read_only or {}  # user -> subject prefixes that user may not register under
        self.port = free_port()
        self.by_id: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.gets: list[int] = []
        self.refused = 0  # requests without valid credentials
        self.denied: list[tuple[str, str]] = []  # (user, subject) of refused registrations
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add(self, schema: dict[str, Any], subject: str | None = None) -> int:
        """Register `schema` (under `subject` if given) as another producer would; its id."""
        canonical = json.dumps(schema, sort_keys=True)
        sid = schema_id_for(schema)
        with self._lock:
            self.by_id[sid] = canonical
            if subject is not None and sid not in self.subjects.setdefault(subject, []):
                self.subjects[subject].append(sid)
        return sid

    def _user(self, authorization: str | None) -> str | None:
        """The authenticated user ("" when the registry has no users), None when refused."""
        if not self.users:
            return ""
        for user, password in self.users.items():
            if authorization == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode():
                return user
        self.refused += 1
        return None

    def start(self) -> None:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> str | None:
                user = registry._user(self.headers.get("Authorization"))
                if user is None:
                    self._answer(401, {"error_code": 40101, "message": "Unauthorized"})
                return user

            def do_POST(self) -> None:  # noqa: N802 - POST /subjects/<subject>/versions: register
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = self._authorized()
                if user is None:
                    return
                subject = self.path.split("?")[0].split("/")[2]
                if subject.startswith(registry.read_only.get(user, ())):
                    registry.denied.append((user, subject))
                    self._answer(403, {"error_code": 40301, "message": f"User is denied Write on {subject}"})
                    return
                sid = registry.add(json.loads(body["schema"]), subject)
                version = registry.subjects[subject].index(sid) + 1
                self._answer(200, {"id": sid, "subject": subject, "version": version, "schema": body["schema"]})

            def do_GET(self) -> None:  # noqa: N802 - GET /schemas/ids/<id>: a schema by id
                if self._authorized() is None:
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                sid = int(parts[2]) if parts[:2] == ["schemas", "ids"] and parts[2].isdigit() else -1
                registry.gets.append(sid)
                if sid in registry.by_id:
                    self._answer(200, {"id": sid, "schema": registry.by_id[sid], "schemaType": "AVRO"})
                else:
                    self._answer(404, {"error_code": 40403, "message": "Schema not found"})

            def log_message(self, *_args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.keystore is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.keystore)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}" if self.keystore is not None else f"http://127.0.0.1:{self.port}"
