"""Typed records: frozen dataclasses that encode to msgpack maps and decode with validation.

A record on the wire is a map ``{"t": type id, "v": record version, <field>: <value>, ...}``.
Decoding is driven by the dataclass's type hints and checks every value's type and size
before anything is built from it; fields a newer writer added are ignored, fields with
defaults may be absent. A ``dict[str, Any]`` field holds plain values only (None, bool, int,
float, str, bytes, lists and string-keyed maps of them), bounded like everything else. The
concrete records and their type-id table live in ``transport.schema``.

Every field says what it may hold, in its type: an integer is ``Annotated[int, Int(lo, hi)]``
(the aliases ``U8`` ... ``I64`` are the C types; the schema adds pids, user addresses, ...), a
string ``Annotated[str, Text(n)]`` (``AbsPath()`` where it becomes a path: absolute, no NUL,
at most PATH_MAX bytes),
bytes ``Annotated[bytes, Blob(n)]``, a list ``Annotated[tuple[X, ...], Count(n)]``.
Decoding checks each before the value is used (a list's length before its items), and a
dataclass's ``validate`` (checks across fields) once its fields are in; every failure is a
``ProtocolError`` naming the record and the field (``ThreadState.regs.gs_base: ...``).
``tests/test_protocol.py`` checks that every field of every record type is bounded this way.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Sized
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin

import msgpack

from transport.errors import ProtocolError
from transport.frozen import frozen

MAX_STR = 1 << 16          # paths, names: far above PATH_MAX
MAX_BYTES = 1 << 20        # xstate, auxv, siginfo, small blobs
MAX_ITEMS = 1 << 20        # list lengths (vmas, fds, ...)
MAX_DEPTH = 16          # nesting of plain maps (``dict[str, Any]`` fields)
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1

PATH_MAX = 4096            # bytes of a path the kernel takes, its NUL included

R = TypeVar("R", bound="Record")


class Invalid(ProtocolError):
    """A ``validate`` check failed; decoding adds the record and field it concerns."""

    def __init__(self, what: str) -> None:
        super().__init__(f"invalid record: {what}")
        self.what = what


def check(cond: bool, what: str) -> None:
    """For ``validate`` methods: ``what`` names the value and what is wrong with it."""
    if not cond:
        raise Invalid(what)


# --- bounds: what a field may hold ----------------------------------------------------------

@frozen
class Int:
    """An integer field's range, both ends included; ``what`` names it in errors."""

    lo: int
    hi: int
    what: str = ""

    def check(self, value: int, where: str) -> None:
        if not self.lo <= value <= self.hi:
            raise _fail(where, f"{_num(value)} is out of range for {self.what or 'this field'} "
                               f"({_num(self.lo)}..{_num(self.hi)})")


@frozen
class Text:
    """A string of at most ``max_len`` characters."""

    max_len: int

    def check(self, value: Sized, where: str) -> None:
        if len(value) > self.max_len:
            raise _fail(where, f"string of {len(value)} characters, more than {self.max_len}")


@frozen
class AbsPath:
    """A string that becomes a path: absolute, no NUL, encodable, at most PATH_MAX bytes;
    empty only where ``optional``."""

    optional: bool = False

    def check(self, value: str, where: str) -> None:
        if not value and self.optional:
            return
        try:
            size = len(value.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            raise _fail(where, "a path that is not a file name") from None
        if size >= PATH_MAX:
            raise _fail(where, f"a path of {size} bytes, at least PATH_MAX ({PATH_MAX})")
        if not value.startswith("/") or "\0" in value:
            raise _fail(where, f"{value[:64]!r} is not an absolute path")


@frozen
class Blob:
    """Bytes, between ``min_len`` and ``max_len`` long (0 allowed also where ``empty``)."""

    max_len: int
    min_len: int = 0
    empty: bool = False

    def check(self, value: Sized, where: str) -> None:
        if not (self.min_len <= len(value) <= self.max_len or (self.empty and not value)):
            raise _fail(where, f"{len(value)} bytes; must be {self.min_len}..{self.max_len}"
                               + (" or none" if self.empty else ""))


@frozen
class Count:
    """A list of at most ``max_items`` items (checked before any item is decoded)."""

    max_items: int
    min_items: int = 0

    def check(self, value: Sized, where: str) -> None:
        if not self.min_items <= len(value) <= self.max_items:
            raise _fail(where, f"{len(value)} items; must be {self.min_items}..{self.max_items}")


Bound = Int | Text | AbsPath | Blob | Count

# The C types. Wider values do not fit where the kernel takes them (a struct, a register).
U8 = Annotated[int, Int(0, (1 << 8) - 1, "a u8")]
U16 = Annotated[int, Int(0, (1 << 16) - 1, "a u16")]
U32 = Annotated[int, Int(0, (1 << 32) - 1, "a u32")]
U64 = Annotated[int, Int(0, (1 << 64) - 1, "a u64")]
I32 = Annotated[int, Int(-(1 << 31), (1 << 31) - 1, "an i32")]
I64 = Annotated[int, Int(-(1 << 63), (1 << 63) - 1, "an i64")]
NonNegI64 = Annotated[int, Int(0, (1 << 63) - 1, "a non-negative i64")]
Flag = Annotated[int, Int(0, 1, "a 0/1 flag")]


def _num(value: int) -> str:
    return f"{value:#x}" if abs(value) >= 1 << 16 else str(value)


class Record:
    """Base of every record. Subclasses are frozen dataclasses with ``TYPE`` set."""

    TYPE: ClassVar[int] = 0
    VERSION: ClassVar[int] = 1

    def to_wire(self) -> dict[str, Any]:
        body = _encode_dataclass(self)
        return {"t": self.TYPE, "v": self.VERSION, **body}

    def pack(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_wire(cls: type[R], body: dict[str, Any]) -> R:
        try:
            fast: R = _fast(cls)(body)
            return fast
        except Exception:    # whatever the fast path refuses, the checked path says why (or takes)
            pass
        rec: R = _decode_dataclass(cls, body, cls.__name__)
        return rec

    def validate(self) -> None:
        """Checks across fields (alignment, order, references); fail with ``check``."""


class WireRecord(Record):
    """A record already in its wire form (what ``to_wire`` gives), sent as it is: the state an
    agent passes on from the holder, another of our own processes, is not rebuilt and taken
    apart again while the job is frozen (1.9 ms for a process holding 53 kernel objects).
    Never for what comes from the other side: that is decoded and checked (``from_wire``)."""

    def __init__(self, wire: dict[str, Any]) -> None:
        self.wire = wire

    def to_wire(self) -> dict[str, Any]:
        return self.wire


def _encode_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_dataclass(value)
    if isinstance(value, (tuple, list)):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def _encode_dataclass(obj: Any) -> dict[str, Any]:
    plain, other = _encoding(type(obj))
    body = {name: getattr(obj, name) for name in plain}
    for name in other:
        body[name] = _encode_value(getattr(obj, name))
    return body


_ENCODING: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}
_PLAIN = (int, str, bool, float)


def _encoding(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fields whose declared type is an int, str, bool or float: taken as they are; the
    others: encoded value by value), worked out once per class."""
    found = _ENCODING.get(cls)
    if found is None:
        hints = _hints(cls)
        plain: list[str] = []
        other: list[str] = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
            (plain if base in _PLAIN else other).append(f.name)
        found = _ENCODING[cls] = (tuple(plain), tuple(other))
    return found


_HINTS: dict[type, dict[str, Any]] = {}


def prepare(classes: Any) -> None:
    """Work out now, once, how each record class (and every dataclass inside one) is encoded
    and decoded: the first use costs milliseconds a type (``get_type_hints`` evaluates every
    annotation), which would otherwise fall in a migration's frozen window."""
    seen: set[type] = set()

    def walk(tp: Any) -> None:
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if tp in seen:
                return
            seen.add(tp)
            _encoding(tp)
            for t in _hints(tp).values():
                walk(t)
            return
        for arg in get_args(tp):
            walk(arg)

    for cls in classes:
        walk(cls)
        _fast(cls)


_EVALUATED: dict[tuple[str, str], Any] = {}


def _hints(cls: type) -> dict[str, Any]:
    """``get_type_hints(cls, include_extras=True)`` for a dataclass of these modules, whose
    annotations are strings (``from __future__ import annotations``): each is evaluated in its
    class's module, as get_type_hints does, but once per module and text (``typing`` compiles
    the text again for every field; most fields share a few dozen texts)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = {}
        for base in reversed(cls.__mro__):
            module = sys.modules[base.__module__].__dict__
            for name, annotation in base.__dict__.get("__annotations__", {}).items():
                if isinstance(annotation, str):
                    key = (base.__module__, annotation)
                    if key not in _EVALUATED:
                        _EVALUATED[key] = eval(annotation, module)   # noqa: S307 (our own source)
                    annotation = _EVALUATED[key]
                hints[name] = annotation
        _HINTS[cls] = hints
    return hints


def _fail(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"invalid record: {where}: {what}")


def _decode_value(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *bounds = get_args(tp)
        for bound in bounds:
            # A list's or string's length before its items are decoded (a wrong type fails below).
            if isinstance(bound, (Count, Blob, Text)) and isinstance(value, (list, tuple, bytes, str)):
                bound.check(value, where)
        decoded = _decode_value(base, value, where)
        for bound in bounds:
            if isinstance(bound, (Int, AbsPath)):
                bound.check(decoded, where)
        return decoded
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            return _decode_value(arg, value, where)
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(where, f"expected an integer, got {type(value).__name__}")
        if not INT_MIN <= value <= INT_MAX:
            raise _fail(where, "integer out of range")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, f"expected a boolean, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise _fail(where, "a number that is not finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(where, f"expected a string, got {type(value).__name__}")
        if len(value) > MAX_STR:
            raise _fail(where, "string too long")
        return value
    if tp is bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise _fail(where, f"expected bytes, got {type(value).__name__}")
        if len(value) > MAX_BYTES:
            raise _fail(where, "byte string too long")
        return bytes(value)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _fail(where, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) > MAX_ITEMS:
                raise _fail(where, "list too long")
            return tuple(_decode_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(where, f"expected {len(args)} items, got {len(value)}")
        return tuple(_decode_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, f"expected a map, got {type(value).__name__}")
        return _decode_plain(value, where, 0)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(where, f"expected a map, got {type(value).__name__}")
        return _decode_dataclass(tp, value, where)
    raise _fail(where, f"unsupported field type {tp!r}")  # a bug in the schema, not the input


def _decode_plain(value: Any, where: str, depth: int) -> Any:
    """A ``dict[str, Any]`` field: plain msgpack values only, bounded in depth and size."""
    if depth > MAX_DEPTH:
        raise _fail(where, "values nested too deeply")
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise _fail(where, "integer out of range")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise _fail(where, "string too long")
        return value
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_BYTES:
            raise _fail(where, "byte string too long")
        return bytes(value)
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise _fail(where, "list too long")
        return [_decode_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise _fail(where, "map too long")
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > MAX_STR:
                raise _fail(where, "map keys must be short strings")
            out[k] = _decode_plain(v, f"{where}.{k}", depth + 1)
        return out
    raise _fail(where, f"unsupported value of type {type(value).__name__}")


def _decode_dataclass(cls: type, body: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            kwargs[f.name] = _decode_value(hints[f.name], body[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(where, f"missing field {f.name!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except Invalid as exc:
            raise _fail(where, exc.what) from None
    return obj


# --- the fast path: the same checks, compiled once per type ------------------------------
# ``_decode_value`` works out each field's type and builds the path of every value it looks
# at, for the error it may have to name: 25 us per mapping of a layout, 1.7 s for 65,530.
# ``_fast`` builds, once per type, a decoder that makes the same checks and the same objects
# without naming anything; when it refuses a value, ``Record.from_wire`` decodes again with
# ``_decode_value``, which says what is wrong and where.

class _Reject(Exception):
    pass


_FAST: dict[Any, Any] = {}


def _fast(tp: Any) -> Any:
    dec = _FAST.get(tp)
    if dec is None:
        dec = _FAST[tp] = _compile(tp)
    return dec


def _compile(tp: Any) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *bounds = get_args(tp)
        pre = [b for b in bounds if isinstance(b, (Count, Blob, Text))]
        post = [b for b in bounds if isinstance(b, (Int, AbsPath))]
        if base is int and not pre and len(post) == 1 and isinstance(post[0], Int):
            lo, hi = max(post[0].lo, INT_MIN), min(post[0].hi, INT_MAX)

            def ranged(v: Any) -> Any:
                if type(v) is not int or not lo <= v <= hi:
                    raise _Reject
                return v
            return ranged
        inner = _fast(base)

        def bounded(v: Any) -> Any:
            if pre and isinstance(v, (list, tuple, bytes, str)):
                for sized in pre:
                    sized.check(v, "")
            d = inner(v)
            for bound in post:
                bound.check(d, "")
            return d
        return bounded
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        none_ok = type(None) in args
        first = _fast(next(a for a in args if a is not type(None)))

        def union(v: Any) -> Any:
            return None if v is None and none_ok else first(v)
        return union
    if tp is int:
        def integer(v: Any) -> Any:
            if type(v) is not int or not INT_MIN <= v <= INT_MAX:
                raise _Reject
            return v
        return integer
    if tp is bool:
        def boolean(v: Any) -> Any:
            if type(v) is not bool:
                raise _Reject
            return v
        return boolean
    if tp is str:
        def text(v: Any) -> Any:
            if type(v) is not str or len(v) > MAX_STR:
                raise _Reject
            return v
        return text
    if tp is bytes:
        def blob(v: Any) -> Any:
            if not isinstance(v, (bytes, bytearray)) or len(v) > MAX_BYTES:
                raise _Reject
            return bytes(v)
        return blob
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _fast(args[0])

            def items(v: Any) -> Any:
                if not isinstance(v, (list, tuple)) or len(v) > MAX_ITEMS:
                    raise _Reject
                return tuple(map(item, v))
            return items
        parts = [_fast(a) for a in args]

        def fixed(v: Any) -> Any:
            if not isinstance(v, (list, tuple)) or len(v) != len(parts):
                raise _Reject
            return tuple(f(x) for f, x in zip(parts, v))
        return fixed
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        spec = [(f.name, _fast(hints[f.name]),
                 f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                for f in dataclasses.fields(tp)]
        cls = tp
        checks = getattr(cls, "validate", None) is not None

        def record(v: Any) -> Any:
            if type(v) is not dict:
                raise _Reject
            kwargs = {}
            for name, dec, required in spec:
                if name in v:
                    kwargs[name] = dec(v[name])
                elif required:
                    raise _Reject
            obj: Any = cls(**kwargs)
            if checks:
                obj.validate()
            return obj
        return record
    # float, dict and anything else: the checked path, for every value.
    where = "a value"
    return lambda v: _decode_value(tp, v, where)


def unbounded_fields(cls: type, where: str = "") -> list[str]:
    """Fields of ``cls`` (and of the dataclasses in it) whose type does not bound them: every
    integer, string, bytes and list of a record must say what it may hold."""
    out: list[str] = []
    for name, tp in _hints(cls).items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            out += _unbounded(tp, f"{where or cls.__name__}.{name}")
    return out


def _unbounded(tp: Any, where: str, bounds: tuple[Any, ...] = ()) -> list[str]:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *more = get_args(tp)
        return _unbounded(base, where, bounds + tuple(more))
    if origin in (typing.Union, types.UnionType):
        return [w for arg in get_args(tp) if arg is not type(None) for w in _unbounded(arg, where, bounds)]
    need = {int: (Int,), str: (Text, AbsPath), bytes: (Blob,)}.get(tp)
    if need is not None:
        return [] if any(isinstance(b, need) for b in bounds) else [where]
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            own = [] if any(isinstance(b, Count) for b in bounds) else [f"{where} (its length)"]
            return own + _unbounded(args[0], f"{where}[]")
        return [w for i, a in enumerate(args) for w in _unbounded(a, f"{where}[{i}]")]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return unbounded_fields(tp, where)
    return []      # bool, float, plain maps (bounded as they are decoded)
