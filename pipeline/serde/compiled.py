"""Schema-compiled Avro binary codec: generated straight-line encoders and decoders, byte-compatible with fastavro."""

from __future__ import annotations

import array
import numbers
import operator
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fastavro

__all__ = ["Reader", "Writer", "compile_reader", "compile_reader_full", "compile_writer"]

Writer = Callable[[Any], bytes]
Reader = Callable[[bytes | bytearray | memoryview, int], tuple[Any, int]]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_COMPLEX = frozenset({"record", "error", "enum", "fixed", "array", "map", "union", "error_union"})
_NAMED_TYPES = frozenset({"record", "error", "enum", "fixed"})
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_MAX_EMPTY_ITEMS = 1 << 24  # in one block of an array of zero-width items

# The generated code looks values up in tables rather than compute them: in CPython 3.11 a bitwise operation
# costs ~300 machine instructions, a tuple lookup ~70. _ZZ[v] is the zigzag varint of -64 <= v < 64 (negative
# v index from the end), _LEN[n] that of a size n < 4096 and _COUNT[n] the count starting a block of n items
# (nothing for 0: fastavro then writes only the end marker).
_ZZ = tuple(bytes((v << 1,)) for v in range(64)) + tuple(bytes((-2 * v - 1,)) for v in range(-64, 0))
_LEN_LIMIT = 4096
_BOOL = {True: b"\x01", False: b"\x00"}
_PACK_F = struct.Struct("<f").pack
_PACK_D = struct.Struct("<d").pack
_UNPACK_F = struct.Struct("<f").unpack_from
_UNPACK_D = struct.Struct("<d").unpack_from
_UNPACK_6B = struct.Struct("6B").unpack_from
# Indexed by the first byte of a varint; None (or 0) where that byte alone is not a plain value:
_ZD = tuple((b >> 1) ^ -(b & 1) if b < 128 else None for b in range(256))  # zigzag long
_CNT = tuple(b >> 1 if b < 128 and not b & 1 else None for b in range(256))  # non-negative block count
_SLEN = tuple((b >> 1) + 1 if b < 128 and not b & 1 else 0 for b in range(256))  # string size + 1
_GAPS = tuple(-(1 << b) for b in range(7, 72, 8))  # bit 7 of each byte: where a varint's flag goes
_FLAGS = tuple(int.from_bytes(b"\x80" * (k - 1), "little") for k in range(11))  # flags of a k-byte varint
# Millisecond timestamps (2004 to 2039) are 6-byte varints, and in every record. The generated code writes
# them as 14 + 14 + 7 + 7 bits looked up in these tables (0.8 MB, mostly _T14), 2.4x faster than computing,
# and reads them with + and * on the 6 bytes (cheaper than bitwise operations), zigzag included.
_T14 = tuple(bytes((x & 127 | 128, x >> 7 | 128)) for x in range(1 << 14))  # two groups, both flagged
_T7 = tuple(bytes((x | 128,)) for x in range(128))  # one group, flagged
_U7 = tuple(bytes((x,)) for x in range(128))  # the last group
_SIX_MIN, _SIX_END = 1 << 34, 1 << 41  # the positive longs whose zigzag varint takes 6 bytes
_FLAGS6 = 64 * sum(128**i for i in range(5))  # what the flags of a 6-byte varint add to half its value
_READ_SIX = """\
try: b0, b1, b2, b3, b4, b5 = _u6(buf, pos)
except _StructError: b5 = 128  # fewer than 6 bytes left
if b5 < 128 and b4 > 127 and b3 > 127 and b2 > 127 and b1 > 127:  # b0 > 127 is known
    {v} = (b0 >> 1) + 64 * b1 + 8192 * b2 + 1048576 * b3 + 134217728 * b4 + 17179869184 * b5 - _FLAGS6
    if b0 & 1: {v} = -{v} - 1
    pos += 6
else: {v}, pos = _rlong(buf, pos)"""


# ---- runtime helpers called by the generated code (slow paths only; the one-byte cases are inlined) ----

def _uvarint(n: int) -> bytes:
    k = (n.bit_length() + 6) // 7 or 1
    for gap in _GAPS[:k - 1]:  # shift the bits above each 7-bit group up by one, making room for the flag
        n += n & gap
    return (n | _FLAGS[k]).to_bytes(k, "little")


def _long(v: Any) -> bytes:
    v = operator.index(v)  # rejects float (fastavro would truncate it), turns numpy ints into int
    if not _LONG_MIN <= v <= _LONG_MAX:
        raise ValueError(f"{v} is out of range for long")
    return _uvarint(v + v if v >= 0 else -v - v - 1)


def _int(v: Any) -> bytes:
    v = operator.index(v)
    if not _INT_MIN <= v <= _INT_MAX:  # fastavro writes it anyway; readers in other languages would fail
        raise ValueError(f"{v} is out of range for int")
    return _uvarint(v + v if v >= 0 else -v - v - 1)


_LEN = tuple(_uvarint(n + n) for n in range(_LEN_LIMIT))
_COUNT = (b"",) + _LEN[1:]


def _float(v: Any) -> bytes:
    try:
        return _PACK_F(v)
    except OverflowError:  # fastavro casts to C float: out-of-range values become infinities
        return _PACK_F(float("inf") if v > 0 else float("-inf"))


def _rlong(buf: Any, pos: int) -> tuple[int, int]:
    n = 0
    for shift in range(0, 70, 7):  # at most 10 bytes
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
    else:
        raise ValueError("varint longer than 10 bytes")
    n &= 0xFFFFFFFFFFFFFFFF  # fastavro (and Java) keep the low 64 bits of a 10-byte varint
    return (n >> 1) ^ -(n & 1), pos


def _rlen(buf: Any, pos: int) -> tuple[int, int]:
    """(size + 1, start - 1) of a string or bytes, the form the generated code uses for one-byte sizes."""
    n, start = _rlong(buf, pos)
    if n < 0:  # a negative size would move pos backwards: garbage could then loop forever
        raise ValueError(f"negative size {n}")
    return n + 1, start - 1


def _rcount(buf: Any, pos: int, zero_width: bool) -> tuple[int, int]:
    n, pos = _rlong(buf, pos)
    if n < 0:  # a negative block count is followed by the block's size in bytes, which we do not need
        n = -n
        _, pos = _rlong(buf, pos)
    # Each item takes a byte at least, so more items than bytes left is garbage, and a list that long a waste;
    # zero-width items (null, empty record) consume nothing: garbage could ask for 2**63 of them.
    if n > (_MAX_EMPTY_ITEMS if zero_width else len(buf) - pos):
        raise ValueError(f"block of {n} items at {pos} is longer than the data")
    return n, pos


def _renum(buf: Any, pos: int, symbols: tuple[str, ...]) -> tuple[str, int]:
    i, pos = _rlong(buf, pos)
    if not 0 <= i < len(symbols):  # fastavro would take a negative index from the end
        raise ValueError(f"enum index {i} out of range")
    return symbols[i], pos


# ---- schema helpers ----

def _kind(s: Any) -> str:
    """The type name of a parsed schema: a primitive, a complex kind, "union" or a named reference."""
    return s if isinstance(s, str) else "union" if isinstance(s, list) else str(s["type"])


def _parse(schema: Any) -> _Schemas:
    if not (isinstance(schema, dict) and schema.get("__fastavro_parsed")):
        schema = fastavro.parse_schema(schema)
    return _Schemas(schema)


class _Schemas:
    """A parsed schema's named types, shared by the generators and the union chooser."""

    def __init__(self, top: Any) -> None:
        self.top = top
        self.named: dict[str, Any] = {}  # by full name; parse_schema defines each inline at its first use
        self.uses: dict[str, int] = {}
        self._collect(top)

    def _collect(self, s: Any) -> None:
        if isinstance(s, list):
            for b in s:
                self._collect(b)
        elif isinstance(s, str):
            if s not in _PRIMITIVES:
                self.uses[s] = self.uses.get(s, 0) + 1
        elif s["type"] in _NAMED_TYPES:
            self.uses[s["name"]] = self.uses.get(s["name"], 0) + 1
            if s["name"] not in self.named:
                self.named[s["name"]] = s
                for f in s.get("fields", ()):
                    self._collect(f["type"])
        elif s["type"] == "array":
            self._collect(s["items"])
        elif s["type"] == "map":
            self._collect(s["values"])

    def inline(self, name: str) -> bool:
        """Whether the generated code writes record `name` in place, not as a function: used once, not recursive."""
        return self.uses.get(name) == 1 and not self._reaches(self.named[name], name, set())

    def _reaches(self, s: Any, name: str, seen: set[str]) -> bool:
        k, d = self.resolve(s)
        if k in ("record", "error"):
            if d["name"] in seen:
                return d["name"] == name
            seen.add(d["name"])
            return any(self._reaches(f["type"], name, seen) for f in d["fields"])
        if k in ("union", "error_union"):
            return any(self._reaches(b, name, seen) for b in d)
        if k == "array":
            return self._reaches(d["items"], name, seen)
        if k == "map":
            return self._reaches(d["values"], name, seen)
        return False

    def resolve(self, s: Any) -> tuple[str, Any]:
        """(kind, definition) with named references followed."""
        k = _kind(s)
        while k not in _PRIMITIVES and k not in _COMPLEX:
            if k not in self.named:
                raise ValueError(f"unknown type {k!r}")
            s = self.named[k]
            k = _kind(s)
        return k, s

    def zero_width(self, s: Any, seen: frozenset[str] = frozenset()) -> bool:
        k, d = self.resolve(s)
        if k == "null":
            return True
        if k == "fixed":
            return bool(d["size"] == 0)
        if k in ("record", "error") and d["name"] not in seen:
            return all(self.zero_width(f["type"], seen | {d["name"]}) for f in d["fields"])
        return False

    def valid(self, s: Any, v: Any) -> bool:
        """fastavro's validation (the compiled one in 1.13), which decides the branch of a union."""
        k, d = self.resolve(s)
        if k == "null":
            return v is None
        if k == "boolean":
            return isinstance(v, bool)
        if k == "string":
            return isinstance(v, str)
        if k == "bytes":
            return isinstance(v, bytes | bytearray)
        if k in ("int", "long"):
            lo, hi = (_INT_MIN, _INT_MAX) if k == "int" else (_LONG_MIN, _LONG_MAX)
            return isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= operator.index(v) <= hi
        if k in ("float", "double"):
            return isinstance(v, numbers.Real) and not isinstance(v, bool)
        if k == "fixed":
            return isinstance(v, bytes | bytearray) and len(v) == d["size"]
        if k == "enum":
            return v in d["symbols"]
        if k == "array":
            return (isinstance(v, Sequence | array.array) and not isinstance(v, str)
                    and all(self.valid(d["items"], x) for x in v))
        if k == "map":
            return (isinstance(v, Mapping) and all(isinstance(key, str) for key in v)
                    and all(self.valid(d["values"], x) for x in v.values()))
        if k in ("union", "error_union"):
            if isinstance(v, tuple):  # tuple notation: (record name, value)
                name, v = v
                for c in d:
                    if name == (c["name"] if _kind(c) == "record" else c):
                        return self.valid(c, v)
                return False
            return any(self.valid(c, v) for c in d)
        # record
        return (isinstance(v, Mapping) and not ("-type" in v and v["-type"] != d["name"])
                and all(self.valid(f["type"], v.get(f["name"], f.get("default"))) for f in d["fields"]))


class _Union:
    """fastavro's branch choice for the values the generated fast paths leave undecided."""

    def __init__(self, branches: list[Any], schemas: _Schemas) -> None:
        self.branches = branches
        self.schemas = schemas

    def choose(self, v: Any) -> tuple[int, Any]:
        if isinstance(v, tuple):  # fastavro's tuple notation: (branch name, value)
            name, v = v
            for i, c in enumerate(self.branches):
                k = _kind(c)
                if name == (c["name"] if k in _NAMED_TYPES else k):
                    return i, v
            raise ValueError(f"union has no branch named {name!r}")
        best, most, could_be_float = -1, -1, False
        for i, c in enumerate(self.branches):
            if could_be_float:  # a float branch matched: only a later double can still win (no precision loss)
                if _kind(c) == "double":
                    return i, v
                continue
            if self.schemas.valid(c, v):
                k, d = self.schemas.resolve(c)
                if k == "record":  # the record sharing most field names wins (first on ties), unless a later
                    shared = len({f["name"] for f in d["fields"]} & set(v))  # branch that is no record fits
                    if shared > most:
                        best, most = i, shared
                elif k == "float":
                    best, could_be_float = i, True
                else:
                    return i, v
        if best < 0:
            raise ValueError(f"no union branch for {type(v).__name__}")
        return best, v


def _fast_choices(branches: list[Any], schemas: _Schemas) -> dict[str, list[tuple[str | None, int]]]:
    """For each common exact Python type, the union branch fastavro picks, as (condition on {v} or None, index)
    in order; an unconditional entry ends the list, otherwise the remaining values go to `_Union.choose`."""
    kinds = [schemas.resolve(b) for b in branches]
    out: dict[str, list[tuple[str | None, int]]] = {}

    def later_double(i: int) -> int:
        return next((j for j in range(i + 1, len(kinds)) if _kind(branches[j]) == "double"), i)

    for py in ("NoneType", "bool", "int", "float", "str", "bytes"):
        rules: list[tuple[str | None, int]] = []
        for i, (k, d) in enumerate(kinds):
            if py == "NoneType" and k == "null" or py == "bool" and k == "boolean" \
                    or py == "str" and k == "string" or py == "bytes" and k == "bytes" \
                    or py in ("int", "float") and k == "double":
                rules.append((None, i))
            elif py in ("int", "float") and k == "float":
                rules.append((None, later_double(i)))
            elif py == "int" and k in ("int", "long"):
                lo, hi = (_INT_MIN, _INT_MAX) if k == "int" else (_LONG_MIN, _LONG_MAX)
                rules.append((f"{lo} <= {{v}} <= {hi}", i))
                continue
            elif py == "str" and k == "enum":
                rules.append((f"{{v}} in {{syms{i}}}", i))
                continue
            elif py == "bytes" and k == "fixed":
                rules.append((f"len({{v}}) == {d['size']}", i))
                continue
            elif py == "bytes" and k == "array":  # bytes is a Sequence: it may validate as an array of ints
                break
            else:
                continue
            break
        out[py] = rules
    mappings = [i for i, (k, _) in enumerate(kinds) if k in ("map", "record", "error")]
    if len(mappings) == 1:  # the only branch a dict can take; a "-type" key could still reject a record
        i = mappings[0]
        out["dict"] = [(None if kinds[i][0] == "map" else '"-type" not in {v}', i)]
    arrays = [i for i, (k, _) in enumerate(kinds) if k == "array"]
    if len(arrays) == 1:
        out["list"] = [(None, arrays[0])]
    return out


class _Source:
    """Generated source lines, fresh local names, and constants passed through the exec namespace."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.aux: list[str] = []  # functions generated while another one was being written
        self.ns: dict[str, Any] = dict(_HELPERS)
        self._n = 0

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value: Any, stem: str = "_c") -> str:
        name = self.fresh(stem)
        self.ns[name] = value
        return name

    def emit(self, ind: int, line: str) -> None:
        self.lines.append("    " * ind + line)

    def aside(self) -> list[str]:
        """Start writing another function: returns the current lines, for `done`."""
        outer, self.lines = self.lines, []
        return outer

    def done(self, outer: list[str]) -> None:
        self.aux += self.lines
        self.lines = outer

    def compile(self, tag: str, name: str) -> Callable[..., Any]:
        exec(compile("\n".join(self.aux + self.lines) + "\n", f"<avro {tag}>", "exec"), self.ns)
        return self.ns[name]  # type: ignore[no-any-return]


def _fn_name(prefix: str, n: int, name: str) -> str:
    return f"{prefix}{n}_" + re.sub(r"\W", "_", name)


def _expect(kind: str, v: Any) -> None:
    """Trace mode only: a readable TypeError before the generated code fails on a wrongly typed value."""
    ok = {
        "null": lambda: v is None,
        "boolean": lambda: isinstance(v, bool | int) and v in (0, 1),
        "int": lambda: isinstance(v, numbers.Integral),
        "long": lambda: isinstance(v, numbers.Integral),
        "float": lambda: isinstance(v, numbers.Real),
        "double": lambda: isinstance(v, numbers.Real),
        "string": lambda: isinstance(v, str),
        "bytes": lambda: isinstance(v, bytes | bytearray | memoryview),
        "fixed": lambda: isinstance(v, bytes | bytearray | memoryview),
        "array": lambda: hasattr(v, "__len__") and hasattr(v, "__iter__") and not isinstance(v, str | Mapping),
        "map": lambda: isinstance(v, Mapping),
        "record": lambda: isinstance(v, Mapping),
        "error": lambda: isinstance(v, Mapping),
    }.get(kind, lambda: True)()
    if not ok:
        raise TypeError(f"expected {kind}, got {type(v).__name__}")


_HELPERS: dict[str, Any] = {
    "_ZZ": _ZZ, "_LEN": _LEN, "_COUNT": _COUNT, "_T14": _T14, "_T7": _T7, "_U7": _U7, "_BOOL": _BOOL,
    "_long": _long, "_int": _int, "_float": _float, "_pd": _PACK_D, "_join": b"".join, "_expect": _expect,
    "_uf": _UNPACK_F, "_ud": _UNPACK_D, "_ZD": _ZD, "_CNT": _CNT, "_SLEN": _SLEN, "_rlong": _rlong,
    "_rlen": _rlen, "_rcount": _rcount, "_renum": _renum, "_u6": _UNPACK_6B, "_StructError": struct.error,
    "_FLAGS6": _FLAGS6,
}


# ---- writer ----

class _NamedFns:
    """What both generators share: one generated function per named record that is not inlined, named
    and queued for `generate` the first time a call to it is emitted."""

    fns: dict[str, str]
    pending: list[str]

    def fn_for(self, name: str, prefix: str) -> str:
        if name not in self.fns:
            self.fns[name] = _fn_name(prefix, len(self.fns), name)
            self.pending.append(name)
        return self.fns[name]


class _WriterGen(_NamedFns):
    """Generates the encoder: `encode(d)` with the top record inline, and `w<n>_<record>(out, d)` for records
    that are recursive or used more than once, appending the encoding of `d` to list `out`.

    Pieces are appended with `out.append(x)` (much cheaper than `out += (...)` in CPython 3.11), constant ones
    merged. Sizes and counts are looked up in tables of 4096 entries: a larger one raises IndexError and the
    encoder falls back to the trace mode. Trace mode generates `t<n>_<record>(out, d, P)`, keeping in `P` the
    path of the value being written, and checks types first to say what is wrong."""

    def __init__(self, schemas: _Schemas, trace: bool) -> None:
        self.schemas = schemas
        self.trace = trace
        self.src = _Source()
        self.parts: list[bytes | str] = []
        self.first = False  # the next flush starts list `out`
        self.inlining = False  # records used once are written in place in `encode`, not in functions
        self.fns: dict[str, str] = {}
        self.pending: list[str] = []
        self.enums: dict[str, str] = {}
        self.unions: dict[int, str] = {}
        self.extra = ", P" if trace else ""

    def put(self, ind: int, part: bytes | str) -> None:
        self.parts.append(part)
        if self.trace:
            self.flush(ind)

    def flush(self, ind: int) -> None:
        merged: list[bytes | str] = []
        for p in self.parts:
            if isinstance(p, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += p
            elif p != b"":
                merged.append(p)
        self.parts = []
        exprs = [repr(p) if isinstance(p, bytes) else p for p in merged]
        if self.first:
            self.src.emit(ind, f"out = [{', '.join(exprs)}]")
            self.first = False
            return
        for e in exprs:
            self.src.emit(ind, f"out.append({e})")

    def open(self, ind: int, line: str) -> None:
        """A statement that branches, loops or appends to `out` itself: pending pieces go first."""
        self.flush(ind)
        self.src.emit(ind, line)

    def local(self, expr: str, ind: int) -> str:
        if expr.isidentifier():
            return expr
        v = self.src.fresh("v")
        self.src.emit(ind, f"{v} = {expr}")
        return v

    def size(self, n: str, ind: int, table: str = "_LEN") -> str:
        """The varint of size or count `n`; the fast code assumes it is in the table (else IndexError)."""
        if not self.trace:
            return f"{table}[{n}]"
        n = self.local(n, ind)
        return f"({table}[{n}] if {n} < {_LEN_LIMIT} else _long({n}))"

    def generate(self) -> None:
        while self.pending:
            name = self.pending.pop()
            self.src.emit(0, f"def {self.fns[name]}(out, d{self.extra}):")
            self.record_body(name, "d", 1)
            self.flush(1)
            self.src.emit(1, "return")
            self.src.emit(0, "")

    def record(self, name: str, v: str, ind: int) -> None:
        if self.inlining and self.schemas.inline(name):
            self.record_body(name, v, ind)
            return
        self.open(ind, f"{self.fn_for(name, 't' if self.trace else 'w')}(out, {v}{self.extra})")

    def record_body(self, name: str, d: str, ind: int) -> None:
        src = self.src
        for f in self.schemas.named[name]["fields"]:
            fname, ftype = f["name"], f["type"]
            key = repr(fname)
            if self.trace:
                src.emit(ind, f"P.append({'.' + fname!r})")
            if "default" in f:
                dflt = f["default"]
                expr = f"{d}.get({key})" if dflt is None else f"{d}.get({key}, {src.const(dflt, '_default')})"
            elif "null" in ftype:  # fastavro's test, substring match on a type name included
                expr = f"{d}.get({key})"
            else:
                if self.trace:
                    src.emit(ind, f"if {key} not in {d}: raise ValueError('missing field (no value and no default)')")
                expr = f"{d}[{key}]"
            if ftype in ("float", "double"):  # fastavro converts these fields with float(): "NaN" is accepted
                expr = self.local(expr, ind)
                src.emit(ind, f"if type({expr}) is not float: {expr} = float({expr})")
            self.value(ftype, expr, ind)
            if self.trace:
                src.emit(ind, "P.pop()")

    def value(self, s: Any, v: str, ind: int) -> None:
        """Statements and pending pieces encoding expression `v` per schema `s`."""
        src = self.src
        k, d = self.schemas.resolve(s)
        if self.trace:
            v = self.local(v, ind)
            src.emit(ind, f"_expect({k!r}, {v})")
        if k == "null":
            v = self.local(v, ind)
            src.emit(ind, f"if {v} is not None: raise TypeError('expected null, got ' + type({v}).__name__)")
        elif k == "boolean":
            self.put(ind, f"_BOOL[{v}]")
        elif k == "long" and not self.trace:
            v = self.local(v, ind)
            self.open(ind, f"if {_SIX_MIN} <= {v} < {_SIX_END}:")
            src.emit(ind + 1, f"n = {v} + {v}")
            for part in ("_T14[n & 16383]", "_T14[n >> 14 & 16383]", "_T7[n >> 28 & 127]", "_U7[n >> 35]"):
                src.emit(ind + 1, f"out.append({part})")
            src.emit(ind, "else:")
            src.emit(ind + 1, f"out.append(_ZZ[{v}] if -64 <= {v} < 64 else _long({v}))")
        elif k in ("int", "long"):
            v = self.local(v, ind)
            self.put(ind, f"(_ZZ[{v}] if -64 <= {v} < 64 else _{k}({v}))")
        elif k == "float":
            self.put(ind, f"_float({v})")
        elif k == "double":
            self.put(ind, f"_pd({v})")
        elif k in ("string", "bytes"):
            b = src.fresh("b")
            src.emit(ind, f"{b} = {v}.encode()" if k == "string" else f"{b} = {v}")
            self.put(ind, self.size(f"len({b})", ind))
            self.put(ind, b)
        elif k == "fixed":
            v, size = self.local(v, ind), d["size"]
            src.emit(ind, f"if len({v}) != {size}: raise ValueError(f'expected {size} bytes, got {{len({v})}}')")
            self.put(ind, v)
        elif k == "enum":
            if d["name"] not in self.enums:
                self.enums[d["name"]] = src.const({s: _ZZ[i] if i < 64 else _long(i)
                                                   for i, s in enumerate(d["symbols"])}, "_enum")
            table = self.enums[d["name"]]
            if self.trace:
                src.emit(ind, f"if {v} not in {table}: raise ValueError(f'{{{v}!r}} is not a symbol of {d['name']}')")
            self.put(ind, f"{table}[{v}]")
        elif k in ("array", "map"):
            self.blocks(k, d, self.local(v, ind), ind)
        elif k in ("union", "error_union"):
            self.union(d, self.local(v, ind), ind)
        else:
            self.record(d["name"], self.local(v, ind), ind)

    def blocks(self, k: str, d: Any, v: str, ind: int) -> None:
        """One block (count, items) then the end marker; only the marker if empty, as fastavro writes them."""
        src = self.src
        x = src.fresh("x")
        self.put(ind, self.size(f"len({v})", ind, "_COUNT"))
        if k == "array":
            if self.trace:
                j = src.fresh("j")
                self.open(ind, f"for {j}, {x} in enumerate({v}):")
                src.emit(ind + 1, f"P.append(f'[{{{j}}}]')")
            else:
                self.open(ind, f"for {x} in {v}:")
            self.value(d["items"], x, ind + 1)
        else:
            key = src.fresh("k")
            self.open(ind, f"for {key}, {x} in {v}.items():")
            if self.trace:
                src.emit(ind + 1, f"P.append(f'[{{{key}!r}}]')")
                src.emit(ind + 1, f"if not isinstance({key}, str): raise TypeError('map key is not a str')")
            self.value("string", key, ind + 1)
            self.value(d["values"], x, ind + 1)
        self.flush(ind + 1)
        if self.trace:
            src.emit(ind + 1, "P.pop()")
        if not src.lines[-1].startswith("    " * (ind + 1)):  # items that write nothing: empty records
            src.emit(ind + 1, "pass")
        self.put(ind, b"\x00")

    def branch(self, branches: list[Any], i: int, v: str, ind: int) -> None:
        self.put(ind, _ZZ[i] if i < 64 else _long(i))
        if self.schemas.resolve(branches[i])[0] != "null":
            self.value(branches[i], v, ind)
        self.flush(ind)

    def union_fn(self, branches: list[Any]) -> str:
        """A function writing any value as `_Union.choose` says, for the values the inline dispatch leaves."""
        key = id(branches)
        if key not in self.unions:
            src = self.src
            name = self.unions[key] = src.fresh("tu" if self.trace else "wu")
            chooser = src.const(_Union(branches, self.schemas), "_union")
            outer, parts, first, inlining = src.aside(), self.parts, self.first, self.inlining
            self.parts, self.first, self.inlining = [], False, False
            src.emit(0, f"def {name}(out, v{self.extra}):")
            src.emit(1, f"i, v = {chooser}.choose(v)")
            for i in range(len(branches)):
                src.emit(1, f"{'if' if i == 0 else 'elif'} i == {i}:")
                self.branch(branches, i, "v", 2)
            src.emit(0, "")
            src.done(outer)
            self.parts, self.first, self.inlining = parts, first, inlining
        return self.unions[key]

    def union(self, branches: list[Any], v: str, ind: int) -> None:
        """Dispatch on the exact type of `v` to the branch fastavro would choose; anything else goes to the
        union's function, which decides like fastavro by validating the branches in order."""
        src = self.src
        slow = f"{self.union_fn(branches)}(out, {v}{self.extra})"
        choices = _fast_choices(branches, self.schemas)
        fmt = {f"syms{i}": src.const(frozenset(self.schemas.resolve(b)[1]["symbols"]), "_syms")
               for i, b in enumerate(branches) if self.schemas.resolve(b)[0] == "enum"}
        typed = [py for py in ("str", "int", "float", "bool", "dict", "list", "bytes") if choices.get(py)]
        heads = [(f"{v} is None", "NoneType")] if choices["NoneType"] else []
        heads += [(f"type({v}) is {py}" if len(typed) == 1 else f"(t := type({v})) is {py}" if j == 0 else
                   f"t is {py}", py) for j, py in enumerate(typed)]
        if not heads:
            self.open(ind, slow)
            return
        for n, (head, py) in enumerate(heads):
            self.open(ind, f"{'if' if n == 0 else 'elif'} {head}:")
            for m, (cond, i) in enumerate(choices[py]):
                if cond is None:
                    if m:
                        src.emit(ind + 1, "else:")
                    self.branch(branches, i, v, ind + 1 + (m > 0))
                    break
                src.emit(ind + 1, f"{'if' if m == 0 else 'elif'} {cond.format(v=v, **fmt)}:")
                self.branch(branches, i, v, ind + 2)
            else:
                src.emit(ind + 1, "else:")
                src.emit(ind + 2, slow)
        src.emit(ind, "else:")
        src.emit(ind + 1, slow)


def _writer_fn(schemas: _Schemas, trace: bool, slow: Callable[[Any], bytes] | None = None) -> Callable[..., Any]:
    """The encoder `encode(d) -> bytes`, which hands the datum to `slow` if it fails; or in trace mode the
    function `top(out, d, P)`."""
    gen = _WriterGen(schemas, trace)
    src = gen.src
    if trace:
        src.emit(0, "def top(out, d, P):")
        gen.value(schemas.top, "d", 1)
        gen.flush(1)
    else:
        src.ns["_slow"] = slow
        src.emit(0, "def encode(d):")
        src.emit(1, "try:")
        gen.first = gen.inlining = True
        gen.value(schemas.top, "d", 2)  # the top record inline, unless recursive
        gen.flush(2)
        gen.inlining = False
        src.emit(1, "except Exception:")
        src.emit(2, "return _slow(d)")
        src.emit(1, "return _join(out)")
    src.emit(0, "")
    gen.generate()
    return src.compile("writer", "top" if trace else "encode")


def _path_error(path: str, exc: Exception) -> Exception:
    msg = f"{path}: {exc}" if not isinstance(exc, KeyError) else f"{path}: {exc.args[0]!r} is not valid here"
    return TypeError(msg) if isinstance(exc, TypeError | AttributeError | struct.error) else ValueError(msg)


def compile_writer(schema: Any) -> Writer:
    """An encoder of datums to the Avro binary body (no header) of `schema`, parsed or raw JSON.

    Output is byte-identical to fastavro.schemaless_writer, including its choice of union branch. A datum that
    does not fit raises ValueError or TypeError naming the field, e.g. "MembershipChange.attributes['x']: no
    union branch for list". logicalType is ignored: values are given as the underlying Avro type."""
    schemas = _parse(schema)
    k, d = schemas.resolve(schemas.top)
    root = d["name"].rsplit(".", 1)[-1] if k in ("record", "error") else k
    traced: list[Callable[..., None]] = []

    def slow(datum: Any) -> bytes:
        """Runs again with path tracking, after the fast path failed, to say where the datum does not fit."""
        if not traced:
            traced.append(_writer_fn(schemas, trace=True))
        out: list[bytes] = []
        path: list[str] = []
        try:
            traced[0](out, datum, path)
        except Exception as exc:  # any failure of the generated code is a datum that does not fit
            raise _path_error(root + "".join(path), exc) from exc
        return b"".join(out)  # what the fast path could not do (a size over 4095, say) was right after all

    return _writer_fn(schemas, trace=False, slow=slow)


# ---- reader ----

class _ReaderGen(_NamedFns):
    """Generates the decoder: `decode(buf, pos)` with the top record inline, and `r<n>_<record>(buf, pos)`
    returning (record, end) for records that are recursive or used more than once. With `generic` the buffer
    may be any bytes-like object (memoryview, bytearray), else it must be bytes."""

    def __init__(self, schemas: _Schemas, generic: bool) -> None:
        self.schemas = schemas
        self.generic = generic
        self.src = _Source()
        self.fns: dict[str, str] = {}
        self.pending: list[str] = []
        self.enums: dict[str, tuple[str, str]] = {}
        self.unions: dict[int, str] = {}
        self.inlining = True  # records used once are read in place, except in the functions of unions

    def generate(self) -> None:
        while self.pending:
            name = self.pending.pop()
            self.src.emit(0, f"def {self.fns[name]}(buf, pos):")
            self.record_body(name, "v", 1)
            self.src.emit(1, "return v, pos")
            self.src.emit(0, "")

    def record(self, name: str, v: str, ind: int) -> None:
        if self.inlining and self.schemas.inline(name):
            self.record_body(name, v, ind)
            return
        self.src.emit(ind, f"{v}, pos = {self.fn_for(name, 'r')}(buf, pos)")

    def record_body(self, name: str, v: str, ind: int) -> None:
        fields = []
        for f in self.schemas.named[name]["fields"]:
            x = self.src.fresh("f")
            fields.append(f"{f['name']!r}: {x}")
            self.value(f["type"], x, ind)
        self.src.emit(ind, f"{v} = {{{', '.join(fields)}}}")

    def value(self, s: Any, v: str, ind: int) -> None:
        """Statements reading the value of schema `s` at `pos` into local `v`, advancing `pos`."""
        src = self.src
        k, d = self.schemas.resolve(s)
        if k == "null":
            src.emit(ind, f"{v} = None")
        elif k == "boolean":
            src.emit(ind, f"{v} = buf[pos] != 0; pos += 1")  # like fastavro: any non-zero byte is true
        elif k in ("int", "long"):
            src.emit(ind, f"{v} = _ZD[buf[pos]]")
            if k == "long":
                src.emit(ind, f"if {v} is None:")
                for line in _READ_SIX.format(v=v).splitlines():
                    src.emit(ind + 1, line)
            else:
                src.emit(ind, f"if {v} is None: {v}, pos = _rlong(buf, pos)")
            src.emit(ind, "else: pos += 1")
        elif k == "float":
            src.emit(ind, f"{v} = _uf(buf, pos)[0]; pos += 4")
        elif k == "double":
            src.emit(ind, f"{v} = _ud(buf, pos)[0]; pos += 8")
        elif k in ("string", "bytes"):
            # n = size + 1 and the data at buf[pos + 1:pos + n], whatever the length of the size's varint.
            # A short slice of a truncated buffer goes unnoticed here: the entry checks the end position.
            src.emit(ind, "n = _SLEN[buf[pos]]")
            src.emit(ind, "if not n: n, pos = _rlen(buf, pos)")
            piece = "buf[pos + 1:(pos := pos + n)]"
            if k == "string":
                expr = f"str({piece}, 'utf-8')" if self.generic else f"{piece}.decode()"
            else:
                expr = f"bytes({piece})" if self.generic else piece
            src.emit(ind, f"{v} = {expr}")
        elif k == "fixed":
            piece = f"buf[pos:(pos := pos + {d['size']})]"
            src.emit(ind, f"{v} = {f'bytes({piece})' if self.generic else piece}")
        elif k == "enum":
            if d["name"] not in self.enums:  # the symbol by the first byte, for the one-byte indexes
                syms = tuple(d["symbols"])
                by_byte = tuple(syms[b >> 1] if b < 128 and not b & 1 and b >> 1 < len(syms) else None
                                for b in range(256))
                self.enums[d["name"]] = (src.const(by_byte, "_enum"), src.const(syms, "_syms"))
            table, syms_name = self.enums[d["name"]]
            src.emit(ind, f"{v} = {table}[buf[pos]]")
            src.emit(ind, f"if {v} is None: {v}, pos = _renum(buf, pos, {syms_name})")
            src.emit(ind, "else: pos += 1")
        elif k in ("array", "map"):
            self.blocks(k, d, v, ind)
        elif k in ("union", "error_union"):
            src.emit(ind, "i = buf[pos]; pos += 1")
            for i, b in enumerate(d[:64]):  # the one-byte index of branch i is 2 * i
                src.emit(ind, "if not i:" if i == 0 else f"elif i == {2 * i}:")
                self.value(b, v, ind + 1)
            src.emit(ind, f"else: {v}, pos = {self.union_fn(d)}(buf, pos - 1)")
        else:
            self.record(d["name"], v, ind)

    def union_fn(self, branches: list[Any]) -> str:
        """A function reading the union whatever the encoding of its index (the inline code reads one byte);
        it calls record functions rather than repeat their code."""
        key = id(branches)
        if key not in self.unions:
            src = self.src
            name = self.unions[key] = src.fresh("ru")
            outer, inlining = src.aside(), self.inlining
            self.inlining = False
            src.emit(0, f"def {name}(buf, pos):")
            src.emit(1, "i, pos = _rlong(buf, pos)")
            for i, b in enumerate(branches):
                src.emit(1, f"{'if' if i == 0 else 'elif'} i == {i}:")
                self.value(b, "v", 2)
            src.emit(1, "else: raise ValueError(f'union index {i} out of range')")
            src.emit(1, "return v, pos")
            src.emit(0, "")
            src.done(outer)
            self.inlining = inlining
        return self.unions[key]

    def blocks(self, k: str, d: Any, v: str, ind: int) -> None:
        """Blocks of items, read by one loop counting down (cheaper than nested loops for short blocks)."""
        src = self.src
        c, x = src.fresh("c"), src.fresh("x")
        more = f"{c}, pos = _rcount(buf, pos, {k == 'array' and self.schemas.zero_width(d['items'])})"
        src.emit(ind, f"{v} = {'[]' if k == 'array' else '{}'}")
        src.emit(ind, f"{c} = _CNT[buf[pos]]")
        src.emit(ind, f"if {c} is None: {more}")
        src.emit(ind, "else: pos += 1")
        src.emit(ind, f"while {c}:")
        if k == "array":
            self.value(d["items"], x, ind + 1)
            store = f"{v}.append({{}})"
        else:
            key = src.fresh("k")
            self.value("string", key, ind + 1)
            self.value(d["values"], x, ind + 1)
            store = f"{v}[{key}] = {{}}"
        last = src.lines[-1].strip()
        if last.startswith(f"{x} = ") and ";" not in last:  # the item's last statement: store it directly
            src.lines[-1] = "    " * (ind + 1) + store.format(last[len(x) + 3:])
        else:
            src.emit(ind + 1, store.format(x))
        src.emit(ind + 1, f"{c} -= 1")
        src.emit(ind + 1, f"if not {c}:")  # the end marker, usually; or another block
        src.emit(ind + 2, f"if buf[pos]: {more}")
        src.emit(ind + 2, "else: pos += 1")


def _reader_fn(schemas: _Schemas, generic: bool, other: Callable[..., Any] | None = None
               ) -> Callable[..., tuple[Any, int]]:
    """The decoder `decode(buf, pos)`; unless `generic`, for bytes only, handing anything else to `other`."""
    gen = _ReaderGen(schemas, generic)
    src = gen.src
    src.ns.update(_other=other, _invalid=_invalid)
    src.emit(0, "def decode(buf, pos=0):")
    if generic:
        src.emit(1, "if pos < 0: raise ValueError(f'negative offset {pos}')")
    else:
        src.emit(1, "if buf.__class__ is not bytes or pos < 0: return _other(buf, pos)")
    src.emit(1, "try:")
    gen.value(schemas.top, "v", 2)  # the top record inline, unless recursive
    src.emit(1, "except Exception as exc:  # IndexError, struct.error, UnicodeDecodeError...: all bad input")
    src.emit(2, "raise _invalid(exc) from exc")
    src.emit(1, "if pos > len(buf): raise ValueError(f'truncated Avro data: {pos - len(buf)} bytes missing')")
    src.emit(1, "return v, pos")
    src.emit(0, "")
    gen.generate()
    return src.compile("reader", "decode")  # type: ignore[no-any-return]


def _invalid(exc: Exception) -> ValueError:
    return ValueError(f"invalid Avro data: {type(exc).__name__}: {exc}")


def compile_reader(schema: Any) -> Reader:
    """A decoder `read(buf, pos)` of one datum of `schema` (parsed or raw JSON) in Avro binary starting at
    `pos` of `buf` (bytes, bytearray or memoryview; never copied), returning (value, end position).

    Values equal fastavro.schemaless_reader's: records are dicts in field order, enums their symbol, unions the
    plain value. Bytes after the datum are left alone. Truncated or invalid input raises ValueError."""
    schemas = _parse(schema)
    generic: list[Callable[..., tuple[Any, int]]] = []

    def other(buf: Any, pos: int) -> tuple[Any, int]:
        if not generic:  # compiled on first use: most callers only ever pass bytes
            generic.append(_reader_fn(schemas, generic=True))
        return generic[0](buf, pos)

    return _reader_fn(schemas, generic=False, other=other)


def compile_reader_full(schema: Any) -> Callable[[bytes | bytearray | memoryview], Any]:
    """A decoder of one datum from the start of a buffer; like fastavro, trailing bytes are ignored."""
    read = compile_reader(schema)

    def read_full(buf: bytes | bytearray | memoryview) -> Any:
        return read(buf, 0)[0]

    return read_full
