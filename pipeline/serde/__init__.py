"""Codecs for every topic: Avro in the Confluent wire format, msgpack for internal topics, raw bytes."""

from pipeline.serde.avro import AvroCodec, EmbeddedCatalog, RegistryCatalog, SchemaCatalog, default_catalog
from pipeline.serde.codecs import Codec, MsgpackCodec, RawCodec, codec_from_spec
from pipeline.serde.registry import SchemaRegistryConnection

__all__ = ["AvroCodec", "Codec", "EmbeddedCatalog", "MsgpackCodec", "RawCodec", "RegistryCatalog",
           "SchemaCatalog", "SchemaRegistryConnection", "codec_from_spec", "default_catalog"]
