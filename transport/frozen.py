"""``@frozen``: a frozen dataclass whose methods are shared or made on first use, not compiled
when the class is made.

``dataclasses`` writes each method of each class as source text and compiles it when the
class is made: about 0.2 ms a method on Python 3.11. kcr-migrate has some 150 frozen
dataclasses (records, plans, states) and every command and agent imports most of them, so
compiling their six methods each was a good part of every process's start: the local
agents, the holder and a command's own (restore's imports: 40 ms of 96 in dataclasses).
Here dataclasses only lists the fields (``fields``, ``replace``, ``asdict`` work as ever);
the methods are:

- ``__eq__``, ``__hash__`` and ``__repr__``: the three functions below, which read the
  fields dataclasses lists for the class (``compare``, ``hash`` and ``repr`` of each
  honoured) through one ``operator.attrgetter`` made per class. ``==`` between two
  instances of the very same class compares their fields in order (anything else is
  ``NotImplemented``), equal instances hash alike, and the repr is ``Name(field=value, ...)``.
- ``__setattr__`` and ``__delattr__``: two shared functions that raise
  ``FrozenInstanceError`` for a field, or for any name on an instance of a ``@frozen``
  class itself (a plain subclass may set its own attributes, as with dataclasses).
- ``__init__``: the source dataclasses would write (positional and keyword-only fields,
  defaults, ``default_factory``, ``init=False`` fields, ``__post_init__``), compiled at the
  class's first instance: a process makes instances of few of the classes it imports.

A class that writes one of these itself keeps its own. What differs from
``@dataclass(frozen=True)``: ``__dataclass_params__`` says the class is not frozen (to
dataclasses the classes are plain, so a ``@dataclass(frozen=True)`` class cannot derive from
one, nor one of them from such a class), and ``inspect.signature`` of a class sees its
``__init__`` as ``(*args, **kwargs)`` until its first instance.
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


_FROZEN_CLASS = "_frozen_class"      # in the __dict__ of each class @frozen made
_FIELD_NAMES = "_frozen_field_names"
_FACTORY = object()                    # the default of a parameter whose field has a default_factory


def _setattr(self: Any, name: str, value: Any) -> None:
    if type(self).__dict__.get(_FROZEN_CLASS) or name in getattr(self, _FIELD_NAMES):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _delattr(self: Any, name: str) -> None:
    if type(self).__dict__.get(_FROZEN_CLASS) or name in getattr(self, _FIELD_NAMES):
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


def _init_of(cls: type) -> Callable[..., None]:
    """The ``__init__`` dataclasses would write for ``cls`` (frozen), compiled now."""
    names: dict[str, Any] = {"__setattr": object.__setattr__, "__factory": _FACTORY}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):
        param = value = f.name
        if f.default is not dataclasses.MISSING:
            names[f"__default_{f.name}"] = f.default
            param = f"{f.name}=__default_{f.name}"
            if not f.init:
                value = f"__default_{f.name}"
        elif f.default_factory is not dataclasses.MISSING:
            names[f"__make_{f.name}"] = f.default_factory
            param = f"{f.name}=__factory"
            value = f"__make_{f.name}() if {f.name} is __factory else {f.name}" if f.init else f"__make_{f.name}()"
        elif not f.init:
            continue                   # init=False and no default: left unset, as dataclasses does
        if f.init:
            (keyword if f.kw_only else positional).append(param)
        body.append(f"  __setattr(self, {f.name!r}, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    params = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    source = f"def __init__({params}):\n" + ("\n".join(body) or "  pass") + "\n"
    exec(source, names)                                     # noqa: S102 (our own text, as dataclasses')
    init = names["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return cast(Callable[..., None], init)


def _first_init(cls: type) -> Callable[..., None]:
    """``cls.__init__`` until its first instance, which compiles and puts in place the real one."""
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init = cls.__dict__["__init__"]
        if init is __init__:
            init = _init_of(cls)
            setattr(cls, "__init__", init)     # (two threads at once: both make the same)
        init(self, *args, **kwargs)
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__._frozen_first = True       # type: ignore[attr-defined]
    return __init__


_PENDING: list[type] = []           # classes whose __init__ waits for their first instance


def ready(cls: type) -> None:
    """Compile now the ``__init__`` a ``@frozen`` class would make at its first instance (for
    code that must not pay for it later: inside a migration's frozen window)."""
    first = cls.__dict__.get("__init__")
    if getattr(first, "_frozen_first", False):
        setattr(cls, "__init__", _init_of(cls))


def ready_all() -> None:
    """``ready`` every ``@frozen`` class made so far: before a freeze, where the classes a
    frozen window first makes instances of are too many to name (a checkpoint's state
    collection made eight, ~2 ms)."""
    while _PENDING:
        ready(_PENDING.pop())


def _make(cls: T, options: dict[str, Any]) -> T:
    own = {name for name in ("__eq__", "__hash__", "__repr__", "__init__", "__setattr__", "__delattr__")
           if name in cls.__dict__}
    if cls.__dict__.get("__hash__", 0) is None and "__eq__" in own:
        own.discard("__hash__")     # the None Python puts beside a class's own __eq__: hashed as dataclasses would
    if own & {"__setattr__", "__delattr__"}:
        raise TypeError(f"{cls.__qualname__}: a frozen class cannot write its own __setattr__ or __delattr__")
    undocumented = not cls.__dict__.get("__doc__")
    if undocumented:
        cls.__doc__ = cls.__name__  # else dataclasses asks inspect for the signature of an __init__ not there yet
    made = cast(T, dataclasses.dataclass(init=False, eq=False, repr=False, **options)(cls))
    fields = dataclasses.fields(made)
    if undocumented:
        made.__doc__ = f"{made.__name__}({', '.join(f.name for f in fields if f.init)})"
    setattr(made, _FROZEN_CLASS, True)
    setattr(made, _FIELD_NAMES, frozenset(f.name for f in fields))
    setattr(made, _EQ_KEY, staticmethod(_getter([f.name for f in fields if f.compare])))
    setattr(made, _HASH_KEY, staticmethod(_getter([f.name for f in fields
                                                   if (f.compare if f.hash is None else f.hash)])))
    setattr(made, _REPR_NAMES, tuple(f.name for f in fields if f.repr))
    for name, shared in (("__eq__", _eq), ("__hash__", _hash), ("__repr__", _repr), ("__setattr__", _setattr),
                         ("__delattr__", _delattr), ("__init__", _first_init(made))):
        if name not in own:
            setattr(made, name, shared)
    if "__init__" not in own:
        _PENDING.append(made)
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
