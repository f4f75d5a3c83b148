"""Property tests: the compiled Avro codec writes fastavro's bytes and reads fastavro's values, errors included."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.resources import SCHEMAS_DIR
from pipeline.serde.avro import _strip_logical
from pipeline.serde.compiled import _parse, _writer_fn, compile_reader, compile_reader_full, compile_writer

PROJECT = {p.stem: fastavro.parse_schema(_strip_logical(json.loads(p.read_text())))
           for p in sorted(SCHEMAS_DIR.glob("*.avsc"))}
PRIMITIVES = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"]

# Hand-written schemas covering every type; names are short so that error paths are easy to read.
NODE = {"type": "record", "name": "Node", "namespace": "t", "fields": [
    {"name": "value", "type": "long"}, {"name": "next", "type": ["null", "Node"], "default": None}]}
TREE = {"type": "record", "name": "Tree", "fields": [
    {"name": "label", "type": "string"}, {"name": "children", "type": {"type": "array", "items": "Tree"}}]}
KITCHEN = {"type": "record", "name": "Kitchen", "namespace": "t", "fields": [
    {"name": "n", "type": "null"},
    {"name": "b", "type": "boolean"},
    {"name": "i", "type": "int"},
    {"name": "l", "type": "long"},
    {"name": "f", "type": "float"},
    {"name": "d", "type": "double"},
    {"name": "by", "type": "bytes"},
    {"name": "s", "type": "string"},
    {"name": "e", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
    {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
    {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [
        {"name": "x", "type": "int"}, {"name": "color", "type": "Color", "default": "BLUE"}]}},
    {"name": "inners", "type": {"type": "array", "items": "Inner"}},
    {"name": "am", "type": {"type": "array", "items": {"type": "map", "values": "long"}}},
    {"name": "ma", "type": {"type": "map", "values": {"type": "array", "items": ["null", "string"]}}},
    {"name": "u", "type": PRIMITIVES},
    {"name": "ur", "type": ["null", "Inner", "Four", "Color", {"type": "map", "values": "int"}]},
    {"name": "nulls", "type": {"type": "array", "items": "null"}},
    {"name": "dflt", "type": "string", "default": "d"},
    {"name": "dflt_u", "type": ["string", "null"], "default": "x"},
    {"name": "opt", "type": ["null", "double"]},
    {"name": "empty", "type": {"type": "record", "name": "Empty", "fields": []}},
]}
UNIONS = {"type": "record", "name": "Unions", "fields": [  # the orders that make fastavro's choice interesting
    {"name": "lb", "type": ["long", "boolean"]},
    {"name": "fd", "type": ["float", "double"]},
    {"name": "fl", "type": ["float", "long"]},
    {"name": "ifl", "type": ["int", "float"]},
    {"name": "ld", "type": ["long", "double"]},
    {"name": "sb", "type": ["string", "bytes"]},
    {"name": "es", "type": [{"type": "enum", "name": "E", "symbols": ["a", "b"]}, "string"]},
    {"name": "fb", "type": [{"type": "fixed", "name": "F2", "size": 2}, "bytes"]},
    {"name": "ab", "type": ["null", {"type": "array", "items": "int"}, "bytes"]},
    {"name": "rr", "type": [
        {"type": "record", "name": "A", "fields": [{"name": "x", "type": "long"}]},
        {"type": "record", "name": "B", "fields": [
            {"name": "x", "type": "long"}, {"name": "y", "type": "long", "default": 0}]}]},
    {"name": "rm", "type": ["A", {"type": "map", "values": "long"}]},
]}
HANDWRITTEN = {"Node": NODE, "Tree": TREE, "Kitchen": KITCHEN, "Unions": UNIONS}
ALL = {**PROJECT, **{k: fastavro.parse_schema(v) for k, v in HANDWRITTEN.items()}}

# fastavro keeps decoded values as written by the generated datums only where the schema says so; comparing
# with fastavro's own round trip, not with the datum, covers float32 rounding, union coercions and defaults.


def fa_write(schema: Any, datum: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


def fa_read(schema: Any, data: bytes) -> Any:
    return fastavro.schemaless_reader(io.BytesIO(data), schema, None)


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (so 1 != 1.0 and b"a" != "a"); NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


# ---- valid datums for a parsed schema ----

def named_types(schema: Any, found: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema, list):
        for branch in schema:
            named_types(branch, found)
    elif isinstance(schema, dict):
        if schema["type"] in ("record", "enum", "fixed"):
            found.setdefault(schema["name"], schema)
        for child in [f["type"] for f in schema.get("fields", ())] + [schema.get("items"), schema.get("values")]:
            named_types(child, found)
    return found


def datums(schema: Any, depth: int = 0, named: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    named = named_types(schema, {}) if named is None else named
    if isinstance(schema, str):
        if schema in named:
            return datums(named[schema], depth, named)
        return {
            "null": st.none(), "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.one_of(st.integers(-100, 100), st.integers(2**34, 2**41),  # small, timestamps
                              st.integers(-(2**63), 2**63 - 1)),
            "float": st.floats(width=32) | st.floats(), "double": st.floats() | st.integers(-(2**53), 2**53),
            "bytes": st.binary(max_size=80), "string": st.text(max_size=80),
        }[schema]
    if isinstance(schema, list):
        deep = depth > 3  # stop recursive types: only the branches that end
        branches = [b for b in schema if not deep or b == "null" or b in PRIMITIVES] or schema
        return st.one_of([datums(b, depth + 1, named) for b in branches])
    t = schema["type"]
    if t in PRIMITIVES:
        return datums(t, depth, named)
    if t == "enum":
        return st.sampled_from(schema["symbols"])
    if t == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if t == "array":
        return st.lists(datums(schema["items"], depth + 1, named), max_size=0 if depth > 3 else 4)
    if t == "map":
        return st.dictionaries(st.text(max_size=6), datums(schema["values"], depth + 1, named),
                               max_size=0 if depth > 3 else 4)
    fields = {f["name"]: st.deferred(lambda f=f: datums(f["type"], depth + 1, named)) for f in schema["fields"]}
    optional = {f["name"] for f in schema["fields"] if "default" in f or "null" in f["type"]}
    return st.fixed_dictionaries({k: v for k, v in fields.items() if k not in optional},
                                 optional={k: v for k, v in fields.items() if k in optional})


# ---- generated schemas: every type, nested, with the union rules of Avro ----

@st.composite
def schemas(draw: st.DrawFn, depth: int = 0, names: list[str] | None = None) -> Any:
    names = [] if names is None else names

    def name() -> str:
        names.append(f"N{len(names)}")
        return names[-1]

    complex_kinds = ["array", "map", "record", "union"] if depth < 3 else []
    kind = draw(st.sampled_from(complex_kinds if depth == 0 else PRIMITIVES + ["enum", "fixed"] + complex_kinds))
    if kind in PRIMITIVES:
        return kind
    if kind == "enum":
        return {"type": "enum", "name": name(), "symbols": draw(st.lists(
            st.sampled_from(["A", "B", "C", "D"]), min_size=1, max_size=4, unique=True))}
    if kind == "fixed":
        return {"type": "fixed", "name": name(), "size": draw(st.integers(0, 5))}
    if kind == "array":
        return {"type": "array", "items": draw(schemas(depth + 1, names))}
    if kind == "map":
        return {"type": "map", "values": draw(schemas(depth + 1, names))}
    if kind == "record":
        fields = [{"name": f"f{i}", "type": draw(schemas(depth + 1, names))} for i in range(draw(st.integers(0, 4)))]
        for f in fields:  # a default makes the field optional in the datums
            if isinstance(f["type"], list) and f["type"][0] == "null" and draw(st.booleans()):
                f["default"] = None
        return {"type": "record", "name": name(), "fields": fields}
    # a union: no union directly inside, at most one of each unnamed type
    plain = schemas(depth + 1, names).filter(lambda s: isinstance(s, str) or isinstance(s, dict)
                                             and s["type"] not in ("array", "map"))
    members = draw(st.lists(plain | st.sampled_from([{"type": "array", "items": "long"},
                                                     {"type": "map", "values": "string"}]), min_size=1, max_size=5))
    seen, union = set(), []
    for m in members:
        key = m if isinstance(m, str) else m.get("name", m["type"])
        if key not in seen:
            seen.add(key)
            union.append(m)
    return union


FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[..., tuple[Any, int]], Callable[..., None]]] = {}


def codecs(name: str) -> tuple[Callable[[Any], bytes], Callable[..., tuple[Any, int]], Callable[..., None]]:
    """Writer, reader and the writer's path-tracking fallback (used for sizes over 4095 and for errors)."""
    if name not in _CODECS:
        schema = ALL[name]
        _CODECS[name] = compile_writer(schema), compile_reader(schema), _writer_fn(_parse(schema), trace=True)
    return _CODECS[name]


def check(schema: Any, datum: Any, name: str | None = None) -> None:
    """Byte-identical encoding (by the fast and the traced writer), identical decoding of fastavro's bytes
    (from bytes, and from a memoryview with a header before and other data after), and the round trip."""
    write, read, traced = codecs(name) if name else (compile_writer(schema), compile_reader(schema), None)
    expected = fa_write(schema, datum)
    assert write(datum) == expected
    if traced:
        out: list[bytes] = []
        traced(out, datum, [])
        assert b"".join(out) == expected
    value, end = read(expected, 0)
    assert end == len(expected)
    assert same(value, fa_read(schema, expected))
    framed_value, framed_end = read(memoryview(b"\x00\x00\x00\x00\x07" + expected + b"\xff"), 5)
    assert framed_end == 5 + len(expected) and same(framed_value, value)


@pytest.mark.parametrize("name", sorted(ALL))
@FAST
@given(data=st.data())
def test_schemas_match_fastavro(name: str, data: st.DataObject) -> None:
    check(ALL[name], data.draw(datums(ALL[name]), label="datum"), name)


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=schemas(), data=st.data())
def test_generated_schemas_match_fastavro(raw: Any, data: st.DataObject) -> None:
    schema = fastavro.parse_schema({"type": "record", "name": "Top", "fields": [{"name": "v", "type": raw}]})
    for _ in range(3):
        check(schema, data.draw(datums(schema)))


def test_raw_schema_and_full_reader() -> None:
    """The raw JSON schema does as the parsed one; compile_reader_full ignores trailing bytes like fastavro."""
    raw = json.loads((SCHEMAS_DIR / "ExperienceEvent.avsc").read_text())
    body = fa_write(ALL["ExperienceEvent"], EVENT)
    assert compile_writer(_strip_logical(raw))(EVENT) == body
    assert same(compile_reader_full(raw)(body + b"\xff\xff"), fa_read(ALL["ExperienceEvent"], body))
    assert same(compile_reader_full(raw)(bytearray(body)), fa_read(ALL["ExperienceEvent"], body))


# ---- realistic records, as the pipeline writes them ----

MEMBERSHIP = {
    "profile_id": "p-7f3a9c2e41", "audience_id": "aud-high-value-shoppers", "audience_version": 3,
    "status": "realized", "previous_status": None,
    "identities": {"ECID": ["ecid-7-0001234"], "CRMID": ["CRM70001234"], "Email": ["User.1234@Example.com"]},
    "attributes": {"loyalty.tier": "gold", "person.city": "Paris"},
    "reason": "segment rule matched", "cause_event_id": "ev-12345", "evaluation": "streaming",
    "event_time_ms": 1767225600123, "emit_time_ms": 1767225600456,
    "idempotency_key": "p-7f3a9c2e41:aud-high-value-shoppers:3:realized"}
EVENT = {"eventId": "ev-run1-123456", "timestamp": 1767225600123, "eventType": "productView",
         "dataset": "web-events", "identityMap": {"ECID": [{"id": "ecid-7-0001234", "primary": True}]},
         "web": {"page": {"name": "home", "url": "https://shop.example/"}},
         "product": {"sku": "SKU-SHO-17", "name": "shoes item", "category": "shoes", "price": 129.99}}


@pytest.mark.parametrize(("name", "datum"), [
    ("MembershipChange", MEMBERSHIP),
    ("MembershipChange", {**MEMBERSHIP, "previous_status": "existing", "cause_event_id": None,
                          "attributes": {"a": None, "b": True, "c": 7, "d": 2.5, "e": "x", "f": 2**63,
                                         "g": False, "h": -(2**40)}}),
    ("ExperienceEvent", EVENT),
    ("ExperienceEvent", {"eventId": "e", "timestamp": -1, "eventType": "purchase",
                         "commerce": {"order": {"id": "o-1", "total": 10, "currency": "EUR"}}}),
    ("ExperienceEvent", {**EVENT, "eventId": "é" * 3000, "fields": {f"k{i}": i for i in range(5000)}}),
    ("Node", {"value": 1, "next": {"value": 2, "next": {"value": 3}}}),
    ("Tree", {"label": "r", "children": [{"label": "a", "children": []}, {"label": "b", "children": [
        {"label": "c", "children": []}]}]}),
    ("Unions", {"lb": True, "fd": 1, "fl": 3, "ifl": 2**40, "ld": 2**70, "sb": b"x", "es": "b", "fb": b"xy",
                "ab": b"\x01\x02", "rr": {"x": 1, "y": 2}, "rm": {"x": 1}}),
    ("Unions", {"lb": 5, "fd": 0.1, "fl": 1.5, "ifl": 5, "ld": 1.5, "sb": "x", "es": "c", "fb": b"xyz",
                "ab": [1, 2], "rr": {"x": 1}, "rm": {"x": 1, "z": 2}}),
    ("Unions", {"lb": False, "fd": -1e300, "fl": -(2**63), "ifl": -5, "ld": 5, "sb": "", "es": "a", "fb": b"",
                "ab": None, "rr": {"-type": "B", "x": 1}, "rm": {}}),
])
def test_examples_match_fastavro(name: str, datum: Any) -> None:
    check(ALL[name], datum, name)


def test_fastavro_extras_tuple_notation_and_record_type_key() -> None:
    write = codecs("Unions")[0]
    base = {"lb": 1, "fd": 1.0, "fl": 1.0, "ifl": 1, "ld": 1, "sb": "", "es": "a", "fb": b"", "ab": None,
            "rr": {"x": 1}, "rm": {"x": 1}}
    for datum in ({**base, "rr": ("B", {"x": 1})}, {**base, "ld": ("double", 1)}, {**base, "rr": {"-type": "A",
                                                                                                    "x": 1, "y": 2}}):
        check(ALL["Unions"], datum, "Unions")
    with pytest.raises(ValueError, match=r"Unions\.rr: union has no branch named 'C'"):
        write({**base, "rr": ("C", {"x": 1})})


KITCHEN_DATUM = {"b": True, "i": 1, "l": 2, "f": 1.5, "d": "NaN", "by": b"", "s": "", "e": "RED", "fx": b"abcd",
                 "inner": {"x": 1}, "inners": [], "am": [], "ma": {}, "u": None, "ur": None, "nulls": [None] * 3,
                 "empty": {}}  # n, dflt, dflt_u and opt missing; "NaN" is fastavro's float() of a double field


def test_missing_fields_take_defaults_like_fastavro() -> None:
    check(ALL["Kitchen"], KITCHEN_DATUM, "Kitchen")


# ---- errors ----

def test_encoding_errors_name_the_field() -> None:
    write = codecs("MembershipChange")[0]
    with pytest.raises(ValueError, match=r"^MembershipChange\.attributes\['x'\]: no union branch for list$"):
        write({**MEMBERSHIP, "attributes": {"x": [1]}})
    with pytest.raises(ValueError, match=r"^MembershipChange\.reason: missing field"):
        write({k: v for k, v in MEMBERSHIP.items() if k != "reason"})
    with pytest.raises(TypeError, match=r"^MembershipChange\.identities\['ECID'\]\[1\]: expected string, got int"):
        write({**MEMBERSHIP, "identities": {"ECID": ["a", 5]}})
    with pytest.raises(ValueError, match=r"^MembershipChange\.status: 'gone' is not a symbol of cdp\.Membership"):
        write({**MEMBERSHIP, "status": "gone"})
    with pytest.raises(ValueError, match=r"^MembershipChange\.audience_version: 4294967296 is out of range"):
        write({**MEMBERSHIP, "audience_version": 2**32})
    with pytest.raises(TypeError, match=r"^MembershipChange\.event_time_ms: expected long, got float"):
        write({**MEMBERSHIP, "event_time_ms": 1.5})
    with pytest.raises(TypeError, match=r"^MembershipChange: expected record, got list"):
        write([])
    write_event = codecs("ExperienceEvent")[0]
    with pytest.raises(ValueError, match=r"^ExperienceEvent\.product\.price: no union branch for str$"):
        write_event({**EVENT, "product": {"price": "cheap"}})
    with pytest.raises(ValueError, match=r"^ExperienceEvent\.web\.page: no union branch for str"):
        write_event({**EVENT, "web": {"page": "home"}})
    write_kitchen = codecs("Kitchen")[0]
    with pytest.raises(ValueError, match=r"^Kitchen\.fx: expected 4 bytes, got 3$"):
        write_kitchen({**KITCHEN_DATUM, "fx": b"abc"})
    with pytest.raises(ValueError, match=r"^Kitchen\.am\[1\]\['k'\]: 9223372036854775808 is out of range for long$"):
        write_kitchen({**KITCHEN_DATUM, "am": [{}, {"k": 2**63}]})


@pytest.mark.parametrize("name", ["MembershipChange", "ExperienceEvent"])
def test_every_truncation_is_a_value_error(name: str) -> None:
    read = codecs(name)[1]
    data = fa_write(ALL[name], MEMBERSHIP if name == "MembershipChange" else EVENT)
    for n in range(len(data)):
        with pytest.raises(ValueError):
            read(data[:n], 0)
        with pytest.raises(ValueError):
            read(memoryview(data)[:n], 0)


def test_invalid_bytes_are_value_errors() -> None:
    read = codecs("MembershipChange")[1]
    good = fa_write(ALL["MembershipChange"], {**MEMBERSHIP, "attributes": {}, "identities": {}})
    status = 1 + len(b"p-7f3a9c2e41") + 1 + len(b"aud-high-value-shoppers") + 1  # offset of the enum index
    for bad, message in [
        (good[:status] + b"\x06" + good[status + 1:], "enum index 3 out of range"),
        (good[:status] + b"\x01" + good[status + 1:], "enum index -1 out of range"),
        (good[:status + 1] + b"\x04" + good[status + 2:], "union index 2 out of range"),
        (good[:status + 1] + b"\x03" + good[status + 2:], "union index -2 out of range"),
        (b"\x03" + good[1:], "negative size"),
        (b"\x80" * 11, "varint longer than 10 bytes"),
        (b"\x04\xff\xfe" + good[3:], "UnicodeDecodeError"),
    ]:
        with pytest.raises(ValueError, match=message):
            read(bad, 0)
    with pytest.raises(ValueError, match="negative offset"):
        read(good, -1)


def test_blocks_as_other_writers_write_them() -> None:
    """Several blocks, negative counts with byte sizes, non-canonical varints: the spec allows them."""
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "a", "type": {"type": "array", "items": "long"}},
        {"name": "m", "type": {"type": "map", "values": ["null", "string"]}}]}
    read = compile_reader_full(schema)
    data = (b"\x02\x02" + b"\x03\x04\x04\x06" + b"\x00"  # [1] then a block of -2 items in 4 bytes: [2, 3]
            + b"\x01\x08\x02a\x80\x00" + b"\x02\x02b\x82\x00\x02c" + b"\x00")  # {"a": None} (index 0x80 0x00)
    assert read(data) == fa_read(fastavro.parse_schema(schema), data) == {"a": [1, 2, 3], "m": {"a": None,
                                                                                            "b": "c"}}


def test_zero_width_items_and_huge_counts_fail_fast() -> None:
    read = compile_reader_full({"type": "array", "items": "null"})
    assert read(b"\x06\x00") == [None, None, None]
    with pytest.raises(ValueError, match="longer than the data"):
        read(b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f")  # 2**62 nulls
    with pytest.raises(ValueError, match="longer than the data"):
        compile_reader_full({"type": "array", "items": "string"})(b"\x80\x80\x04" + b"\x00" * 10)


@settings(max_examples=300, deadline=1000, database=None)
@given(garbage=st.binary(max_size=300))
def test_garbage_never_hangs(garbage: bytes) -> None:
    for name in ("MembershipChange", "ExperienceEvent", "Kitchen", "Tree"):
        with contextlib.suppress(ValueError):
            codecs(name)[1](garbage, 0)
