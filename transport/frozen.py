"""``@frozen``: a frozen dataclass whose ``==``, ``hash`` and ``repr`` are shared, not compiled.

``dataclasses`` writes each method of each class as source text and compiles it when the
class is made: about 0.2 ms a method on Python 3.11. kcr-migrate has some 150 frozen
dataclasses (records, plans, states) and every command and agent imports most of them, so
compiling their six methods each was a good part of every process's start: the local
agents, the holder and a command's own. Of the six, ``__init__`` and the frozen
``__setattr__``/``__delattr__`` stay dataclasses' own; ``__eq__``, ``__hash__`` and
``__repr__`` are the three functions below, which read the fields dataclasses lists for the
class (``compare``, ``hash`` and ``repr`` of each honoured) through one
``operator.attrgetter`` made per class. They behave as dataclasses' would: ``==`` between
two instances of the very same class compares their fields in order (anything else is
``NotImplemented``), equal instances hash alike, and the repr is ``Name(field=value, ...)``.
A class that writes one of the three itself keeps its own.
"""
from __future__ import annotations

import dataclasses
from operator import attrgetter
from typing import Any, Callable, TypeVar, cast, dataclass_transform, overload

T = TypeVar("T", bound=type)

_EQ_KEY = "_frozen_eq_key"
_HASH_KEY = "_frozen_hash_key"
_REPR_NAMES = "_frozen_repr_names"


def _getter(names: list[str]) -> Callable[[Any], Any]:
    """A function of an instance giving its ``names`` fields as one tuple, as dataclasses
    compares and hashes them (a tuple compares items by identity first: a field holding the
    same NaN is equal, as there)."""
    if not names:
        return lambda _: ()
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return attrgetter(*names)


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    key = getattr(self, _EQ_KEY)
    return key(self) == key(other)


def _hash(self: Any) -> int:
    return hash(getattr(self, _HASH_KEY)(self))


def _repr(self: Any) -> str:
    fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in getattr(self, _REPR_NAMES))
    return f"{self.__class__.__qualname__}({fields})"


def _make(cls: T, options: dict[str, Any]) -> T:
    own = {name for name in ("__eq__", "__hash__", "__repr__") if name in cls.__dict__}
    if cls.__dict__.get("__hash__", 0) is None and "__eq__" in own:
        own.discard("__hash__")     # the None Python puts beside a class's own __eq__: hashed as dataclasses would
    made = cast(T, dataclasses.dataclass(frozen=True, eq=False, repr=False, **options)(cls))
    fields = dataclasses.fields(made)
    setattr(made, _EQ_KEY, staticmethod(_getter([f.name for f in fields if f.compare])))
    setattr(made, _HASH_KEY, staticmethod(_getter([f.name for f in fields
                                                   if (f.compare if f.hash is None else f.hash)])))
    setattr(made, _REPR_NAMES, tuple(f.name for f in fields if f.repr))
    for name, shared in (("__eq__", _eq), ("__hash__", _hash), ("__repr__", _repr)):
        if name not in own:
            setattr(made, name, shared)
    return made


@overload
def frozen(cls: T, /) -> T: ...
@overload
def frozen(*, kw_only: bool = False) -> Callable[[T], T]: ...


@dataclass_transform(frozen_default=True)
def frozen(cls: T | None = None, /, **options: Any) -> Any:
    """``@frozen`` or ``@frozen(kw_only=True)``: ``@dataclass(frozen=True)``, made faster to
    import (see the module)."""
    if cls is None:
        return lambda c: _make(c, options)
    return _make(cls, options)
