"""Typed records: frozen dataclasses that encode to msgpack maps and decode with validation.

A record on the wire is a map ``{"t": type id, "v": record version, <field>: <value>, ...}``.
Decoding is driven by the dataclass's type hints and checks every value's type and size
before anything is built from it; fields a newer writer added are ignored, fields with
defaults may be absent. A ``dict[str, Any]`` field holds plain values only (None, bool, int,
float, str, bytes, lists and string-keyed maps of them), bounded like everything else. The concrete records and their type-id table live in
``transport.schema``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

import msgpack

from transport.errors import ProtocolError

MAX_STR = 1 << 16          # paths, names: far above PATH_MAX
MAX_BYTES = 1 << 20        # xstate, auxv, siginfo, small blobs
MAX_ITEMS = 1 << 20        # list lengths (vmas, fds, ...)
MAX_DEPTH = 16          # nesting of plain maps (``dict[str, Any]`` fields)
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1

R = TypeVar("R", bound="Record")


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
        rec = _decode_dataclass(cls, body, cls.__name__)
        rec.validate()
        return rec

    def validate(self) -> None:
        """Semantic checks beyond types (bounds, alignment). Raise ProtocolError."""


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
    return {f.name: _encode_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _fail(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"invalid record: {where}: {what}")


def _decode_value(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
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
    return cls(**kwargs)
