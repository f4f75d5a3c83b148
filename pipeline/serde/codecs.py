"""The codec interface and the non-Avro codecs; `codec_from_spec` builds the codec a topic declares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import msgspec

from pipeline.errors import SerdeError, UnknownNameError

if TYPE_CHECKING:
    from pipeline.serde.avro import SchemaCatalog


class Codec(Protocol):
    """Turns a topic's values into bytes and back."""

    def encode(self, value: Any) -> bytes:
        """Called before producing; SerdeError when the value does not fit the topic's format."""
        ...

    def decode(self, data: bytes | None) -> Any:
        """Called on every consumed value; SerdeError (with a short reason) when the bytes are not valid."""
        ...


class RawCodec:
    """Bytes as they are (dead-letter topics, changelogs, JSON payloads of destinations)."""

    def encode(self, value: Any) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode()

    def decode(self, data: bytes | None) -> Any:
        return data or b""


_struct_encoder = msgspec.msgpack.Encoder()


class MsgpackCodec:
    """Internal topics: compact and fast, no schema evolution promises beyond our own workers."""

    def encode(self, value: Any) -> bytes:
        if isinstance(value, msgspec.Struct):  # a typed stage message (pipeline.stages.messages): its wire map
            return _struct_encoder.encode(value)
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]

    def decode(self, data: bytes | None) -> Any:
        try:
            return msgpack.unpackb(data or b"", raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise SerdeError("msgpack-decode-error", str(exc)) from exc


def codec_from_spec(spec: str, topic: str | None = None, catalog: SchemaCatalog | None = None) -> Codec:
    """`avro:<Record>`, `msgpack` or `raw`; an unknown codec lists the valid ones. `topic` is the (physical) topic
    the codec writes to: a Schema Registry names the subject of an Avro codec after it. `catalog` resolves an
    Avro codec's schemas (None: the embedded one)."""
    kind, _, arg = spec.partition(":")
    if kind == "avro":
        from pipeline.serde.avro import AvroCodec

        return AvroCodec(arg, catalog, topic=topic)
    factories: dict[str, type] = {"msgpack": MsgpackCodec, "raw": RawCodec}
    if kind not in factories:
        raise UnknownNameError("codec", spec, ["avro:<Record>", *factories])
    return factories[kind]()  # type: ignore[no-any-return]
