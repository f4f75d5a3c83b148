"""Schema resolution: records of any writer version decode into the pipeline's reader schema, as fastavro resolves."""

from __future__ import annotations

import copy
import io
import struct
from typing import Any

import fastavro
import pytest

from pipeline.errors import SerdeError
from pipeline.serde.avro import AvroCodec, EmbeddedCatalog, _strip_logical
from pipeline.serde.compiled import compile_reader
from pipeline.serde.resolve import NeedsFallback, compile_projection


def record(name: str, *fields: dict[str, Any], namespace: str = "t") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": namespace, "fields": list(fields)}


def field(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def resolved(writer: dict[str, Any], reader: dict[str, Any], value: Any, *, like_fastavro: bool = True) -> Any:
    """`value` written with `writer`, read with the compiled reader and projected into `reader`; checked to be
    what fastavro's resolving reader gives."""
    w, r = fastavro.parse_schema(copy.deepcopy(writer)), fastavro.parse_schema(copy.deepcopy(reader))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, w, value)
    data = buf.getvalue()
    project = compile_projection(w, r)
    got = compile_reader(w)(data, 0)[0]
    got = got if project is None else project(got)
    if like_fastavro:
        assert got == fastavro.schemaless_reader(io.BytesIO(data), w, r)
    return got


V1 = record("Event", field("id", "string"), field("n", "int"))


def test_a_field_added_with_a_default_is_filled_on_records_of_the_older_version() -> None:
    # Given a reader that added fields with defaults (a scalar, a nullable string, a map, a record)
    inner = record("Inner", field("a", "long", default=1), field("tags", {"type": "array", "items": "string"},
                                                                     default=["x"]))
    v2 = record("Event", field("id", "string"), field("n", "int"),
                field("channel", ["null", "string"], default=None), field("score", "double", default=1),
                field("attrs", {"type": "map", "values": "string"}, default={"k": "v"}),
                field("inner", inner, default={"tags": ["y"]}))
    # When a record of the older version is read (fastavro takes defaults as written: an int for a double, a
    # record default without its fields' own defaults; the specification's reading is the one below)
    got = resolved(V1, v2, {"id": "e1", "n": 3}, like_fastavro=False)
    # Then every new field has the reader's default (a double for the int default, the record's own defaults)
    assert got == {"id": "e1", "n": 3, "channel": None, "score": 1.0, "attrs": {"k": "v"},
                   "inner": {"a": 1, "tags": ["y"]}}
    assert type(got["score"]) is float
    # And no two records share a mutable default
    project = compile_projection(fastavro.parse_schema(copy.deepcopy(V1)), fastavro.parse_schema(copy.deepcopy(v2)))
    assert project is not None
    one, two = project({"id": "a", "n": 1}), project({"id": "b", "n": 2})
    one["attrs"]["k2"] = "changed"
    one["inner"]["tags"].append("z")
    assert two["attrs"] == {"k": "v"} and two["inner"]["tags"] == ["y"]


def test_a_field_the_reader_does_not_know_is_dropped() -> None:
    # Given a writer with one more field (a newer producer), nested in an optional record too
    writer = record("Event", field("id", "string"), field("extra", "string"), field("n", "int"),
                    field("sub", ["null", record("Sub", field("x", "int"), field("y", "string"))]))
    reader = record("Event", field("id", "string"), field("n", "int"),
                    field("sub", ["null", record("Sub", field("x", "int"))]))
    # Then the reader's fields are read, the others left out
    assert resolved(writer, reader, {"id": "e", "extra": "zz", "n": 2, "sub": {"x": 1, "y": "q"}}) == \
        {"id": "e", "n": 2, "sub": {"x": 1}}
    assert resolved(writer, reader, {"id": "e", "extra": "zz", "n": 2, "sub": None}) == \
        {"id": "e", "n": 2, "sub": None}


@pytest.mark.parametrize(("wtype", "rtype", "value", "expected"), [
    ("int", "long", 7, 7),
    ("int", "float", 7, 7.0),
    ("int", "double", -3, -3.0),
    ("long", "double", 1 << 40, float(1 << 40)),
    ("long", "float", 5, 5.0),
    ("float", "double", 1.5, 1.5),
    ("string", "bytes", "é", "é".encode()),
    ("bytes", "string", b"abc", "abc"),
    (["null", "int"], ["null", "double"], 4, 4.0),
    (["null", "int"], ["null", "double"], None, None),
    ("int", ["null", "long"], 4, 4),
    (["null", "long", "string"], ["null", "double", "string"], "s", "s"),
    (["null", "long", "string"], ["null", "double", "string"], 9, 9.0),
    ({"type": "array", "items": "int"}, {"type": "array", "items": "double"}, [1, 2], [1.0, 2.0]),
    ({"type": "map", "values": ["null", "long"]}, {"type": "map", "values": ["null", "double"]},
     {"a": 1, "b": None}, {"a": 1.0, "b": None}),
])
def test_numbers_are_promoted_as_avro_says(wtype: Any, rtype: Any, value: Any, expected: Any) -> None:
    got = resolved(record("R", field("v", wtype)), record("R", field("v", rtype)), {"v": value})
    assert got == {"v": expected} and type(got["v"]) is type(expected)


def test_the_same_schema_needs_no_projection_and_differences_in_docs_or_defaults_none_either() -> None:
    raw = EmbeddedCatalog().raw_schema("ExperienceEvent")
    other = copy.deepcopy(raw)
    other["doc"] = "another producer's copy"
    other["fields"][0]["doc"] = "changed"
    assert compile_projection(_strip_logical(raw), _strip_logical(raw)) is None
    assert compile_projection(_strip_logical(other), _strip_logical(raw)) is None


@pytest.mark.parametrize(("writer", "reader", "why"), [
    (V1, record("Event", field("id", "string"), field("n", "int"), field("must", "string")),
     "Event.must: the reader's field has no default and the writer does not write it"),
    (V1, record("Event", field("id", "int"), field("n", "int")),
     "Event.id: the writer's string cannot be read as the reader's int"),
    (record("Event", field("n", "long")), record("Event", field("n", "int")),
     "Event.n: the writer's long cannot be read as the reader's int"),
    (record("Event", field("s", "string")), record("Event", field("s", ["null", "int"])),
     "Event.s: the writer's string is none of the reader's union (null, int)"),
    (record("Event", field("s", ["null", "string"])), record("Event", field("s", "long")),
     "Event.s: the writer's null cannot be read as the reader's long; Event.s: the writer's string cannot be read"),
    (V1, record("Other", field("id", "string")),
     "Other: the writer's record t.Event cannot be read as the reader's record t.Other"),
])
def test_an_incompatible_writer_says_which_field_and_why(writer: Any, reader: Any, why: str) -> None:
    with pytest.raises(SerdeError) as info:
        compile_projection(writer, reader)
    assert info.value.reason == "incompatible-schema" and why in info.value.detail


def test_a_value_the_reader_cannot_hold_fails_only_that_record() -> None:
    # Given an enum the writer extended, with and without a reader default, and a union branch the reader lacks
    color = {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}
    writer = record("R", field("c", color), field("d", "Color"), field("u", ["null", "string", "long"]))
    reader = record("R", field("c", {**color, "symbols": ["RED", "GREEN"]}),
                    field("d", {"type": "enum", "name": "Color2", "aliases": ["t.Color"], "symbols": ["RED", "OTHER"],
                                "default": "OTHER"}),
                    field("u", ["null", "string"]))
    # Then values the reader knows are read, an unknown symbol takes the reader's default
    assert resolved(writer, reader, {"c": "RED", "d": "BLUE", "u": "s"}) == {"c": "RED", "d": "OTHER", "u": "s"}
    project = compile_projection(writer, reader)
    assert project is not None
    # And an unknown symbol without a default, or a branch the reader lacks, is a ValueError for that value only
    with pytest.raises(ValueError, match="R.c: a symbol of the writer's enum t.Color is not in the reader's"):
        project({"c": "BLUE", "d": "RED", "u": None})
    with pytest.raises(ValueError, match="R.u: the writer's long is no branch of the reader's union"):
        project({"c": "RED", "d": "RED", "u": 5})


def test_recursive_records_resolve() -> None:
    writer = record("Node", field("value", "int"), field("next", ["null", "Node"], default=None))
    reader = record("Node", field("value", "long"), field("next", ["null", "Node"], default=None),
                    field("label", "string", default="-"))
    got = resolved(writer, reader, {"value": 1, "next": {"value": 2, "next": None}})
    assert got == {"value": 1, "label": "-", "next": {"value": 2, "label": "-", "next": None}}


def test_a_union_told_apart_only_by_its_record_names_is_left_to_fastavro() -> None:
    a, b = record("A", field("x", "int")), record("B", field("x", "int"), field("y", "int"))
    writer = record("R", field("u", [a, b]))
    reader = record("R", field("u", [record("A", field("x", "long")), record("B", field("x", "int"))]))
    with pytest.raises(NeedsFallback):
        compile_projection(writer, reader)


# ---- through the codec: the pipeline's ExperienceEvent and the versions other producers write ----

class VersionsCatalog(EmbeddedCatalog):
    """The embedded catalog, plus writer versions under ids of their own (what a registry holds)."""

    def __init__(self, versions: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.versions = {sid: fastavro.parse_schema(_strip_logical(copy.deepcopy(s))) for sid, s in versions.items()}
        self.asked: list[int] = []

    def parsed_by_id(self, schema_id: int) -> Any:
        self.asked.append(schema_id)
        return self.versions[schema_id] if schema_id in self.versions else super().parsed_by_id(schema_id)


def write(schema: dict[str, Any], sid: int, value: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(_strip_logical(copy.deepcopy(schema))), value)
    return struct.pack(">bI", 0, sid) + buf.getvalue()


EVENT = {"eventId": "e1", "timestamp": 1_700_000_000_000, "eventType": "pageView", "dataset": "web-events",
         "identityMap": {"ECID": [{"id": "c1", "primary": True, "authenticatedState": "ambiguous"}]},
         "ecid": None, "web": {"page": {"name": "home", "url": None}}, "product": None, "commerce": None,
         "fields": {"n": 1}}


def test_every_version_of_experience_event_decodes_into_the_pipelines_own() -> None:
    # Given an older version (no dataset, no ecid: both have defaults now) and a newer one (a channel field)
    raw = EmbeddedCatalog().raw_schema("ExperienceEvent")
    older = copy.deepcopy(raw)
    older["fields"] = [f for f in older["fields"] if f["name"] not in ("dataset", "ecid")]
    newer = copy.deepcopy(raw)
    newer["fields"].append({"name": "channel", "type": ["null", "string"], "default": None})
    catalog = VersionsCatalog({101: older, 102: newer})
    codec = AvroCodec("ExperienceEvent", catalog)
    old_value = {k: v for k, v in EVENT.items() if k not in ("dataset", "ecid")}
    # When records of all three versions are decoded, twice each
    for _ in range(2):
        assert codec.decode(write(older, 101, old_value)) == {**EVENT, "dataset": "web-events"}
        assert codec.decode(write(newer, 102, {**EVENT, "channel": "app"})) == EVENT
        assert codec.decode(codec.encode(EVENT)) == EVENT
    # Then each writer schema was asked for once (resolved once per schema id)
    assert catalog.asked.count(101) == 1 and catalog.asked.count(102) == 1


def test_an_incompatible_version_is_a_serde_error_for_its_records_and_the_others_go_on() -> None:
    # Given a version without eventId (which has no default) and a compatible record after it
    raw = EmbeddedCatalog().raw_schema("ExperienceEvent")
    broken = copy.deepcopy(raw)
    broken["fields"] = [f for f in broken["fields"] if f["name"] != "eventId"]
    catalog = VersionsCatalog({201: broken})
    codec = AvroCodec("ExperienceEvent", catalog)
    # When its records are decoded
    for _ in range(2):
        with pytest.raises(SerdeError) as info:
            codec.decode(write(broken, 201, {k: v for k, v in EVENT.items() if k != "eventId"}))
        # Then the error says why (the record is dead-lettered with that reason), the schema is not asked again
        assert info.value.reason == "incompatible-schema"
        assert info.value.detail == ("schema id 201 cannot be read as the pipeline's ExperienceEvent: "
                                     "ExperienceEvent.eventId: the reader's field has no default and the writer "
                                     "does not write it")
    assert catalog.asked.count(201) == 1
    # And records of the pipeline's version still decode
    assert codec.decode(codec.encode(EVENT)) == EVENT
