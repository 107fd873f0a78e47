"""The compression level follows the link: simulated links with known best levels."""
from __future__ import annotations

from collections import Counter

import pytest

from transport.levels import AUTO, LADDER, LevelController, check_level

MIB = 1 << 20


def simulate(rates: dict[int | None, int], batches: int = 3000, noise: float = 0.0) -> Counter[int | None]:
    """Feed the controller batches whose delivery rate depends on the level; count the levels
    used in the second half (after it settled)."""
    ctl = LevelController(AUTO)
    now = 0.0
    used: Counter[int | None] = Counter()
    for i in range(batches):
        level = ctl.level
        wobble = 1 + noise * ((i * 7919) % 13 - 6) / 6
        now += 2 * MIB / (rates[level] * wobble)
        ctl.observe(raw=2 * MIB, now=now)
        if i >= batches // 2:
            used[level] += 1
    return used


def test_a_fast_link_ends_up_raw() -> None:
    rates = {None: 1200 * MIB, -7: 800 * MIB, -3: 780 * MIB, -1: 760 * MIB, 1: 700 * MIB, 3: 500 * MIB}
    used = simulate(rates, noise=0.05)
    assert used.most_common(1)[0][0] is None and used[None] > 0.7 * sum(used.values())


def test_a_slow_link_compresses_hard() -> None:
    rates = {None: 100 * MIB, -7: 200 * MIB, -3: 215 * MIB, -1: 235 * MIB, 1: 260 * MIB, 3: 300 * MIB}
    used = simulate(rates, noise=0.05)
    assert used.most_common(1)[0][0] == 3


def test_a_sender_limited_elsewhere_stays_compressed() -> None:
    used = simulate({level: 300 * MIB for level in LADDER}, noise=0.05)
    assert used[None] < 0.2 * sum(used.values())


def test_a_fixed_level_never_moves() -> None:
    ctl = LevelController(-3)
    for i in range(100):
        ctl.observe(raw=MIB, now=i / 100)
    assert ctl.level == -3 and ctl.changes == 0
    assert LevelController(None).level is None


@pytest.mark.parametrize("bad", [20, -8, "fast", True, 1.5])
def test_bad_levels_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="compression level"):
        check_level(bad)  # type: ignore[arg-type]
