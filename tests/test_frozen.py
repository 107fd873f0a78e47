"""transport.frozen's @frozen behaves as @dataclass(frozen=True) does, wherever a caller can tell."""
from __future__ import annotations

import copy
import inspect
import dataclasses
import pickle
from dataclasses import field

import pytest

from transport.frozen import frozen


@frozen
class Point:
    x: int
    y: str = "a"
    secret: bytes = field(default=b"", repr=False)
    note: str = field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Twin:
    x: int
    y: str = "a"
    secret: bytes = field(default=b"", repr=False)
    note: str = field(default="", compare=False)


@frozen
class Child(Point):
    z: int = 0


@frozen
class Empty:
    pass


@frozen
class OwnEq:
    x: int

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OwnEq) and abs(self.x - other.x) <= 1


@frozen
class Single:
    x: int


@pytest.mark.parametrize("args", [(1,), (1, "z"), (1, "z", b"s", "n")])
def test_the_same_as_a_frozen_dataclass(args: tuple) -> None:
    ours, theirs = Point(*args), Twin(*args)
    assert repr(ours) == repr(theirs).replace("Twin", "Point")
    assert ours == Point(*args) and hash(ours) == hash(Point(*args))
    assert dataclasses.astuple(ours) == dataclasses.astuple(theirs)
    assert dataclasses.replace(ours, x=9).x == 9 and copy.deepcopy(ours) == ours
    assert pickle.loads(pickle.dumps(ours)) == ours
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.x = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del ours.x  # type: ignore[misc]


def test_equality_follows_the_fields_and_the_class() -> None:
    assert Point(1) != Point(2) and Point(1, "a") != Point(1, "b")
    assert Point(1, note="one") == Point(1, note="other")        # compare=False
    assert Point(1).__eq__(Twin(1)) is NotImplemented and Point(1) != Twin(1)
    assert Child(1) != Point(1) and Child(1, z=2) == Child(1, z=2) != Child(1, z=3)
    assert Single(1) == Single(1) != Single(2) and hash(Single(1)) == hash(Single(1))
    assert Empty() == Empty() and hash(Empty()) == hash(Empty())
    assert {Point(1): "p"}[Point(1)] == "p"


def test_a_class_keeps_the_methods_it_writes() -> None:
    assert OwnEq(1) == OwnEq(2) and OwnEq(1) != OwnEq(3)
    assert hash(OwnEq(1)) == hash(OwnEq(1))     # hashable, as dataclasses makes it
    assert repr(Child(1, z=2)) == "Child(x=1, y='a', note='', z=2)"


@frozen(kw_only=True)
class Made:
    """Fields of every kind an __init__ takes."""
    a: int
    b: list[int] = field(default_factory=list)
    c: tuple[int, ...] = field(default=(), init=False)
    d: dict[str, int] = field(default_factory=dict, init=False)
    e: str = "e"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MadeTwin:
    a: int
    b: list[int] = field(default_factory=list)
    c: tuple[int, ...] = field(default=(), init=False)
    d: dict[str, int] = field(default_factory=dict, init=False)
    e: str = "e"


@frozen
class Checked:
    low: int
    high: int = 10
    seen: list[str] = field(default_factory=list, compare=False)

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low above high")
        self.seen.append("post")


@frozen
class OwnInit:
    x: int

    def __init__(self, text: str) -> None:
        object.__setattr__(self, "x", int(text))


class Plain(Point):
    """Not a dataclass: may set attributes of its own, not the fields."""


def test_init_takes_what_a_frozen_dataclass_takes() -> None:
    ours, theirs = Made(a=1), MadeTwin(a=1)
    assert dataclasses.asdict(ours) == dataclasses.asdict(theirs) == {"a": 1, "b": [], "c": (), "d": {}, "e": "e"}
    assert Made(a=1).b is not Made(a=1).b                       # a factory's value each time
    given = [5]
    assert Made(a=2, b=given, e="x").b is given and Made(a=2, b=given, e="x").e == "x"
    bad_calls: list[tuple[tuple, dict]] = [((1,), {}), ((), {"a": 1, "c": (1,)}), ((), {}), ((), {"a": 1, "z": 2})]
    for args, kwargs in bad_calls:               # refused alike
        for cls in (Made, MadeTwin):
            with pytest.raises(TypeError):
                cls(*args, **kwargs)
    assert Point(1, "b", b"s", "n") == Point(x=1, y="b", secret=b"s", note="n")
    with pytest.raises(TypeError):
        Point(1, "b", b"s", "n", 5)  # type: ignore[call-arg]


def test_post_init_runs_and_may_refuse() -> None:
    assert Checked(1).seen == ["post"] and Checked(1, 2) == Checked(1, 2)
    with pytest.raises(ValueError, match="low above high"):
        Checked(11)


def test_a_class_keeps_its_own_init_and_frozen_fields_stay_frozen() -> None:
    assert OwnInit("42").x == 42
    p = Plain(1)
    p.extra = "mine"  # type: ignore[attr-defined]
    assert p.extra == "mine"  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    q = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del q.extra  # type: ignore[attr-defined]


def test_the_first_instance_makes_the_real_init() -> None:
    @frozen
    class Fresh:
        x: int
        y: int = 2

    first = Fresh.__init__
    assert Fresh(1) == Fresh(x=1, y=2)
    assert Fresh.__init__ is not first and Fresh.__init__.__qualname__.endswith("Fresh.__init__")
    params = inspect.signature(Fresh).parameters
    assert list(params) == ["x", "y"] and params["y"].default == 2


def test_ready_all_compiles_every_pending_init_before_a_freeze() -> None:
    """prepare_codecs (before any freeze) leaves no class to compile at its first instance:
    a checkpoint's state collection made eight such first instances while the job was frozen."""
    from transport import frozen as frozen_module
    from transport.schema import prepare_codecs

    @frozen
    class Late:
        x: int = 1

    assert getattr(Late.__dict__["__init__"], "_frozen_first", False)
    prepare_codecs()
    assert not getattr(Late.__dict__["__init__"], "_frozen_first", False) and Late().x == 1
    assert frozen_module._PENDING == []
