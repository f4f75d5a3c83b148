"""Avro schema resolution: values read with a writer's schema version turned into the pipeline's reader schema.

`compile_projection(writer, reader)` is built once per writer schema id and applied to what the compiled
writer reader returns: fields the writer lacks get the reader's default, fields the reader does not know are
dropped, numbers are promoted (int -> long/float/double, long -> float/double, float -> double) and string and
bytes convert, as the Avro specification (and fastavro) resolve schemas. It is generated code, like the
compiled readers: a dict display per record. An ExperienceEvent of another version decodes 3-9% slower than one
of the pipeline's own (which needs no projection); fastavro's resolving reader takes 6.5 times as long.
A writer no reader value can come from (a reader field with no default the writer lacks, another type) raises
SerdeError('incompatible-schema') when compiled; a value that cannot be resolved (an enum symbol or union
branch the reader lacks) raises ValueError when projected. Unions whose branches cannot be told apart by the
Python type of the value (two record branches, say) raise NeedsFallback: the caller reads those with fastavro.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pipeline.errors import SerdeError
from pipeline.serde.compiled import _PRIMITIVES, _parse, _Schemas

__all__ = ["NeedsFallback", "Projection", "compile_projection"]

Projection = Callable[[Any], Any]

# The Python type of a value the compiled reader returns for each Avro kind (unions give the plain value).
_PY_TYPE: dict[str, type] = {"null": type(None), "boolean": bool, "int": int, "long": int, "float": float,
                             "double": float, "string": str, "bytes": bytes, "enum": str, "fixed": bytes,
                             "array": list, "map": dict, "record": dict, "error": dict}
# writer kind -> reader kinds it is promoted to, with the conversion (None: the Python value is already right)
_PROMOTE: dict[str, dict[str, str | None]] = {
    "int": {"long": None, "float": "float", "double": "float"},
    "long": {"float": "float", "double": "float"},
    "float": {"double": None},
    "string": {"bytes": "_to_bytes"},
    "bytes": {"string": "_to_str"},
}
_IMMUTABLE = (type(None), bool, int, float, str, bytes)


class NeedsFallback(Exception):
    """The writer schema has a union this module cannot resolve from the value alone."""


def _to_bytes(v: str) -> bytes:
    return v.encode()


def _to_str(v: bytes) -> str:
    return v.decode()  # invalid UTF-8 raises UnicodeDecodeError, a ValueError


def _unqualified(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Gen:
    """Generates the projection functions of one (writer, reader) pair of schemas."""

    def __init__(self, writer: _Schemas, reader: _Schemas) -> None:
        self.w, self.r = writer, reader
        self.lines: list[str] = []
        self.tail: list[str] = []  # union dispatch tables, built once the functions they name exist
        self.ns: dict[str, Any] = {"_to_bytes": _to_bytes, "_to_str": _to_str, "_deepcopy": copy.deepcopy,
                                   "float": float}
        self._n = 0
        # (writer name, reader name) -> function name, or None once known to need none; "" while being built
        self._records: dict[tuple[str, str], str | None] = {}

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value: Any) -> str:
        name = self.fresh("_c")
        self.ns[name] = value
        return name

    def fn(self, stem: str, body: list[str]) -> str:
        name = self.fresh(stem)
        self.lines += [f"def {name}(v):", *("    " + line for line in body)]
        return name

    def conv(self, ws: Any, rs: Any, path: str) -> str | None:
        """The name of a function turning a writer value into a reader value; None when it is the same."""
        wk, wd = self.w.resolve(ws)
        rk, rd = self.r.resolve(rs)
        if wk in ("union", "error_union"):
            return self.from_union(wd, rs, path)
        if rk in ("union", "error_union"):
            target = self.branch_for(ws, rd)
            if target is None:
                raise SerdeError("incompatible-schema", f"{path}: the writer's {_describe(wk, wd)} is none of the "
                                 f"reader's union ({', '.join(_describe(*self.r.resolve(b)) for b in rd)})")
            return self.conv(ws, target, path)
        if wk == rk and wk in _PRIMITIVES:
            return None
        if rk in _PROMOTE.get(wk, {}):
            return _PROMOTE[wk][rk]
        if wk == rk == "array":
            item = self.conv(wd["items"], rd["items"], f"{path}[]")
            return None if item is None else self.fn("_a", [f"return [{item}(x) for x in v]"])
        if wk == rk == "map":
            value = self.conv(wd["values"], rd["values"], f"{path}{{}}")
            return None if value is None else self.fn("_m", [f"return {{k: {value}(x) for k, x in v.items()}}"])
        if wk in ("record", "error") and rk in ("record", "error") and _same_name(wd, rd):
            return self.record(wd, rd, path)
        if wk == rk == "enum" and _same_name(wd, rd):
            return self.enum(wd, rd, path)
        if wk == rk == "fixed" and _same_name(wd, rd) and wd["size"] == rd["size"]:
            return None
        raise SerdeError("incompatible-schema", f"{path}: the writer's {_describe(wk, wd)} cannot be read as the "
                         f"reader's {_describe(rk, rd)}")

    def branch_for(self, ws: Any, branches: list[Any]) -> Any | None:
        """The reader union branch a writer schema resolves to: the first of the same type, else the first it is
        promoted to (the specification says the first that matches)."""
        wk, wd = self.w.resolve(ws)
        kinds = [self.r.resolve(b) for b in branches]
        for b, (rk, rd) in zip(branches, kinds, strict=True):
            if rk == wk and (rk not in ("record", "error", "enum", "fixed") or _same_name(wd, rd)):
                return b
        for b, (rk, _rd) in zip(branches, kinds, strict=True):
            if rk in _PROMOTE.get(wk, {}):
                return b
        return None

    def from_union(self, wbranches: list[Any], rs: Any, path: str) -> str | None:
        """A writer union: each branch resolved on its own, picked by the Python type of the value."""
        rk, rd = self.r.resolve(rs)
        by_type: dict[type, str | None] = {}
        unreadable: list[str] = []
        for b in wbranches:
            wk, wd = self.w.resolve(b)
            target = self.branch_for(b, rd) if rk in ("union", "error_union") else rs
            try:
                name = None if target is None else self.conv(b, target, path)
            except SerdeError as exc:  # only a value of that branch fails, when one comes
                target, why = None, exc.detail
            else:
                why = f"{path}: the writer's {_describe(wk, wd)} is no branch of the reader's union"
            if target is None:
                unreadable.append(why)
                name = self.fn("_x", [f"raise ValueError({self.const(why)})"])
            py = _PY_TYPE[wk]
            if py in by_type and by_type[py] != name:
                raise NeedsFallback(f"{path}: two branches of the writer's union are both {py.__name__}")
            by_type[py] = name
        if len(unreadable) == len(wbranches):  # no value of the writer's can be read
            raise SerdeError("incompatible-schema", "; ".join(unreadable))
        if all(name is None for name in by_type.values()):
            return None
        if len(by_type) == 2 and type(None) in by_type and by_type[type(None)] is None:
            other = next(n for t, n in by_type.items() if t is not type(None))
            return self.fn("_u", [f"return None if v is None else {other}(v)"])
        table = self.fresh("_t")
        entries = ", ".join(f"{self.const(t)}: {n or 'None'}" for t, n in by_type.items())
        self.tail.append(f"{table} = {{{entries}}}")
        return self.fn("_u", [f"f = {table}[type(v)]", "return v if f is None else f(v)"])

    def record(self, wd: dict[str, Any], rd: dict[str, Any], path: str) -> str | None:
        key = (wd["name"], rd["name"])
        if key in self._records:
            known = self._records[key]
            if known == "":  # recursion: the function is being written, and will be written
                known = self._records[key] = self.fresh("_r")
            return known
        self._records[key] = ""
        wfields = {f["name"]: f for f in wd["fields"]}
        items: list[str] = []
        same = [f["name"] for f in wd["fields"]] == [f["name"] for f in rd["fields"]]
        for rf in rd["fields"]:
            name = rf["name"]
            fpath = f"{path}.{name}"
            wf = next((wfields[n] for n in (name, *rf.get("aliases", ())) if n in wfields), None)
            if wf is None:
                if "default" not in rf:
                    raise SerdeError("incompatible-schema", f"{fpath}: the reader's field has no default and the "
                                     "writer does not write it")
                items.append(f"{name!r}: {self.default(rf['type'], rf['default'], fpath)}")
                continue
            sub = self.conv(wf["type"], rf["type"], fpath)
            same = same and sub is None
            value = f"v[{wf['name']!r}]"
            items.append(f"{name!r}: {value if sub is None else f'{sub}({value})'}")
        reserved = self._records[key]
        if same and not reserved:
            self._records[key] = None
            return None
        fname = reserved or self.fresh("_r")
        self._records[key] = fname
        self.lines += [f"def {fname}(v):", f"    return {{{', '.join(items)}}}"]
        return fname

    def enum(self, wd: dict[str, Any], rd: dict[str, Any], path: str) -> str | None:
        known = set(rd["symbols"])
        if set(wd["symbols"]) <= known:
            return None
        symbols = self.const(frozenset(known))
        if "default" in rd:
            return self.fn("_e", [f"return v if v in {symbols} else {rd['default']!r}"])
        why = self.const(f"{path}: a symbol of the writer's enum {wd['name']} is not in the reader's")
        return self.fn("_e", [f"if v in {symbols}: return v", f"raise ValueError({why})"])

    def default(self, rs: Any, value: Any, path: str) -> str:
        """An expression giving a fresh reader value for the field default `value` (JSON, as in the schema)."""
        python = self.default_value(rs, value, path)
        if isinstance(python, _IMMUTABLE):
            return self.const(python)
        if python == {} or python == []:
            return repr(python)
        return f"_deepcopy({self.const(python)})"  # no record shares a mutable default with another

    def default_value(self, rs: Any, value: Any, path: str) -> Any:
        k, d = self.r.resolve(rs)
        if k in ("union", "error_union"):  # the default is of the first branch (the specification)
            return self.default_value(d[0], value, path)
        if k in ("bytes", "fixed") and isinstance(value, str):
            return value.encode("latin-1")  # Avro's JSON encoding of bytes: one code point per byte
        if k in ("float", "double") and isinstance(value, int | float):
            return float(value)
        if k == "array":
            return [self.default_value(d["items"], x, path) for x in value]
        if k == "map":
            return {key: self.default_value(d["values"], x, path) for key, x in value.items()}
        if k in ("record", "error"):
            out = {}
            for f in d["fields"]:
                if f["name"] not in value and "default" not in f:
                    raise SerdeError("incompatible-schema", f"{path}: the default has no {f['name']!r}")
                out[f["name"]] = self.default_value(f["type"], value.get(f["name"], f.get("default")), path)
            return out
        return value


def _same_name(wd: dict[str, Any], rd: dict[str, Any]) -> bool:
    """Named types match by full name, by unqualified name (namespaces differ between producers), or by an
    alias of the reader's."""
    w, r = wd["name"], rd["name"]
    names = {r, _unqualified(r), *rd.get("aliases", ()), *(_unqualified(a) for a in rd.get("aliases", ()))}
    return w in names or _unqualified(w) in names


def _describe(kind: str, d: Any) -> str:
    return f"{kind} {d['name']}" if isinstance(d, dict) and "name" in d else kind


def compile_projection(writer: Any, reader: Any) -> Projection | None:
    """A function turning a value read with `writer` into one of `reader` (both parsed or JSON schemas); None
    when the values are already the same. SerdeError('incompatible-schema') says which field cannot be read."""
    gen = _Gen(_parse(writer), _parse(reader))
    _kind, top_schema = gen.r.resolve(gen.r.top)
    name = _unqualified(top_schema["name"]) if isinstance(top_schema, dict) and "name" in top_schema else "value"
    top = gen.conv(gen.w.top, gen.r.top, name)
    if top is None:
        return None
    exec(compile("\n".join(gen.lines + gen.tail) + "\n", "<avro projection>", "exec"), gen.ns)
    return gen.ns[top]  # type: ignore[no-any-return]
