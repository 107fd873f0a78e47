"""transport.frozen's @frozen behaves as @dataclass(frozen=True) does, wherever a caller can tell."""
from __future__ import annotations

import copy
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
