"""Avro in the Confluent wire format (magic byte 0, 4-byte schema id, Avro binary).

Records are written and read by code compiled from each schema (`pipeline.serde.compiled`, byte-identical to
fastavro and 2-3x faster on the hot path); fastavro parses the schemas. Two catalogs resolve schema ids:
`EmbeddedCatalog` (schemas/*.avsc, deterministic ids from the schema's canonical form, no service needed) and
`RegistryCatalog` (a Confluent-compatible Schema Registry, used when SCHEMA_REGISTRY_URL is set: the settings'
topic registry passes it to its codecs; see `pipeline.serde.registry`). Records written by confluent-kafka's AvroSerializer decode with either. Every
record is read into the pipeline's own (reader) schema, whatever version of it the writer used
(`pipeline.serde.resolve`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import threading
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.schema import to_parsing_canonical_form

from pipeline.errors import ConfigError, SchemaRegistryUnavailable, SerdeError, UnknownNameError
from pipeline.resources import SCHEMAS_DIR
from pipeline.serde.compiled import Reader, Writer, compile_reader, compile_writer
from pipeline.serde.registry import SchemaRegistryConnection, record_fullname
from pipeline.serde.resolve import NeedsFallback, Projection, compile_projection

MAGIC = 0
_HEADER = struct.Struct(">bI")


def _strip_logical(schema: Any) -> Any:
    """Drop logicalType so timestamps decode as plain ints (the binary encoding is the same long)."""
    if isinstance(schema, dict):
        return {k: _strip_logical(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_strip_logical(s) for s in schema]
    return schema


def schema_id_for(schema: dict[str, Any]) -> int:
    """Deterministic id of an embedded schema: the first 31 bits of sha256 of its canonical form."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(copy.deepcopy(schema)))
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:4], "big") & 0x7FFFFFFF


class SchemaCatalog(Protocol):
    """Resolves schemas by name (to write) and by id (to read)."""

    def id_for(self, name: str, topic: str | None = None) -> int:
        """Called when encoding to `topic`; the id of the current schema of record `name`. Unknown name:
        UnknownNameError."""
        ...

    def raw_schema(self, name: str) -> dict[str, Any]:
        """The JSON schema of record `name` as declared (with its extra attributes, e.g. identity annotations)."""
        ...

    def parsed_by_id(self, schema_id: int) -> Any:
        """Called when decoding; the parsed writer schema. Unknown id: SerdeError('unknown-schema-id')."""
        ...


class EmbeddedCatalog:
    """The schemas shipped in schemas/, with deterministic ids; needs no service."""

    def __init__(self, directory: Path = SCHEMAS_DIR) -> None:
        self._raw: dict[str, dict[str, Any]] = {}
        self._ids: dict[str, int] = {}
        self._by_id: dict[int, Any] = {}
        for path in sorted(directory.glob("*.avsc")):
            try:
                schema = json.loads(path.read_text())
                parsed = fastavro.parse_schema(_strip_logical(schema))
            except (ValueError, fastavro.schema.SchemaParseException) as exc:
                raise ConfigError(f"invalid Avro schema: {exc}", file=str(path)) from exc
            name = schema["name"]
            sid = schema_id_for(schema)
            self._raw[name] = schema
            self._ids[name] = sid
            self._by_id[sid] = parsed

    def names(self) -> list[str]:
        return sorted(self._raw)

    def id_for(self, name: str, topic: str | None = None) -> int:
        if name not in self._ids:
            raise UnknownNameError("schema", name, self._ids)
        return self._ids[name]

    def raw_schema(self, name: str) -> dict[str, Any]:
        if name not in self._raw:
            raise UnknownNameError("schema", name, self._raw)
        return self._raw[name]

    def parsed_by_id(self, schema_id: int) -> Any:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise SerdeError("unknown-schema-id", f"schema id {schema_id} is not in the catalog") from None


class RegistryCatalog:
    """A Confluent-compatible Schema Registry: registers schemas/ under the subject the connection's strategy
    names (`<topic>-value` by default) and resolves ids written by any producer. Falls back to the embedded raw
    schemas for annotations, which the registry keeps verbatim anyway."""

    def __init__(self, connection: SchemaRegistryConnection | str, embedded: EmbeddedCatalog | None = None,
                 client: Any = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.connection = connection if isinstance(connection, SchemaRegistryConnection) \
            else SchemaRegistryConnection(connection)
        self._client = client or SchemaRegistryClient.new_client(self.connection.client_config())
        self._embedded = embedded or EmbeddedCatalog()
        self._ids: dict[str, int] = {}  # by subject
        self._by_id: dict[int, Any] = {}
        self._lock = threading.Lock()

    def subject(self, name: str, topic: str | None = None) -> str:
        """The subject record `name`'s schema is registered under when written to `topic`."""
        return self.connection.subject(topic, record_fullname(self._embedded.raw_schema(name)))

    def id_for(self, name: str, topic: str | None = None) -> int:
        from confluent_kafka.schema_registry import Schema

        subject = self.subject(name, topic)
        with self._lock:
            if subject not in self._ids:
                raw = self._embedded.raw_schema(name)
                self._ids[subject] = self._client.register_schema(subject, Schema(json.dumps(raw), "AVRO"))
            return self._ids[subject]

    def raw_schema(self, name: str) -> dict[str, Any]:
        return self._embedded.raw_schema(name)

    def parsed_by_id(self, schema_id: int) -> Any:
        with self._lock:
            if schema_id not in self._by_id:
                try:
                    schema = self._client.get_schema(schema_id)
                except Exception as exc:  # the client raises its own error types per transport
                    if _unavailable(exc):
                        raise SchemaRegistryUnavailable(schema_id, type(exc).__name__) from exc
                    raise SerdeError("unknown-schema-id", f"registry has no schema {schema_id}: {exc}") from exc
                self._by_id[schema_id] = fastavro.parse_schema(_strip_logical(json.loads(str(schema.schema_str))))
            return self._by_id[schema_id]


def _unavailable(exc: Exception) -> bool:
    """Whether a registry error says nothing about the schema id: no answer (connection refused, timeout) or
    any status but 404 (5xx, 429, an auth problem). Only "no such schema" makes a record undecodable."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        return exc.http_status_code != 404
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("httpx", "httpcore"))


_default: SchemaCatalog | None = None


def default_catalog() -> SchemaCatalog:
    """The embedded catalog (built once), for a codec given none: a topic registry built from the settings
    gives its codecs the Schema Registry's catalog when SCHEMA_REGISTRY_URL (or its file) is set."""
    global _default
    if _default is None:
        _default = EmbeddedCatalog()
    return _default


class AvroCodec:
    """Encodes dicts as record `name` (registered for `topic`, the topic it writes to) and decodes any writer
    schema version the catalog knows into the pipeline's own version of the record."""

    def __init__(self, name: str, catalog: SchemaCatalog | None = None, topic: str | None = None) -> None:
        self.name = name
        self.topic = topic
        self.catalog = catalog or default_catalog()
        # the writer side is resolved on the first encode: a codec that only reads (the ingest topics) never
        # registers a schema, so the worker runs with read-only registry credentials on the subjects it reads
        self._header = b""
        self._write: Writer | None = None
        # the reader schema: the pipeline's own version, whatever the registry holds under that id
        self._read_schema = fastavro.parse_schema(_strip_logical(self.catalog.raw_schema(name)))
        # by writer schema id, one per schema version seen: its compiled reader and the projection into the
        # reader schema (None when it is the reader schema); or why that version cannot be read
        self._readers: dict[int, tuple[Reader, Projection | None]] = {}
        self._unreadable: dict[int, SerdeError] = {}

    def _writer(self) -> Writer:
        """The compiled writer of this record's schema, registered (or looked up) under the topic's subject."""
        write_id = self.catalog.id_for(self.name, self.topic)
        self._header = _HEADER.pack(MAGIC, write_id)
        self._write = compile_writer(self.catalog.parsed_by_id(write_id))
        return self._write

    def header(self) -> bytes:
        """The wire-format header (magic byte, schema id) this codec writes before each record."""
        if self._write is None:
            self._writer()
        return self._header

    def encode(self, value: dict[str, Any]) -> bytes:
        write = self._write or self._writer()
        try:
            return self._header + write(value)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerdeError("avro-encode-error", f"{self.name}: {exc}") from exc

    def _reader(self, schema_id: int) -> tuple[Reader, Projection | None]:
        """The compiled reader of a writer schema and its projection into the reader schema, built once, after
        checking that the writer schema is a version of record `name` the pipeline can read."""
        if schema_id in self._unreadable:
            raise self._unreadable[schema_id]
        schema = self.catalog.parsed_by_id(schema_id)
        if schema.get("name", "").split(".")[-1] != self.name:
            raise SerdeError("wrong-schema", f"schema id {schema_id} is {schema.get('name')}, expected {self.name}")
        try:
            project = compile_projection(schema, self._read_schema)
            read = compile_reader(schema)
        except NeedsFallback:  # a union the projection cannot tell apart: fastavro resolves it (slower, rare)
            read, project = _fastavro_reader(schema, self._read_schema), None
        except SerdeError as exc:
            self._unreadable[schema_id] = SerdeError(
                exc.reason, f"schema id {schema_id} cannot be read as the pipeline's {self.name}: {exc.detail}")
            raise self._unreadable[schema_id] from exc
        self._readers[schema_id] = read, project
        return read, project

    def decode(self, data: bytes | None) -> dict[str, Any]:
        if not data or len(data) < 5:
            raise SerdeError("not-avro", f"{len(data or b'')} bytes, shorter than the 5-byte wire header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SerdeError("not-avro", f"magic byte {magic}, expected {MAGIC}")
        read, project = self._readers.get(schema_id) or self._reader(schema_id)
        try:
            value, _end = read(data, 5)
        except ValueError as exc:  # the compiled reader reports any malformed input as ValueError
            raise SerdeError("avro-decode-error", str(exc)) from exc
        if not isinstance(value, dict):
            raise SerdeError("avro-decode-error", "payload is not a record")
        if project is not None:
            try:
                value = project(value)
            except ValueError as exc:  # an enum symbol or union branch of the writer's the reader lacks
                raise SerdeError("schema-resolution-error", str(exc)) from exc
        return value


def _fastavro_reader(writer: Any, reader: Any) -> Reader:
    """fastavro's resolving reader in the compiled readers' form."""

    def read(buf: bytes | bytearray | memoryview, pos: int) -> tuple[Any, int]:
        stream = io.BytesIO(bytes(buf[pos:]))
        try:
            value = fastavro.schemaless_reader(stream, writer, reader)
        except (EOFError, IndexError, KeyError, TypeError, UnicodeDecodeError, fastavro.read.SchemaResolutionError) \
                as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        return value, pos + stream.tell()

    return read
