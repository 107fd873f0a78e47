"""Choosing the zstd level so that compression keeps up with the link.

What counts is page bytes delivered per second. The sender measures it per window of
batches (raw bytes written / wall time: writes block when the link or the peer is the
limit, the queue drains when compression is), keeps an estimate per level, and now and then
tries a neighbouring level for one window: it moves there only if that delivered clearly
more (``MARGIN``). Levels run from "raw" (no compression) through zstd's fast negative
levels to 3, so a link faster than compression ends up raw, a slow one compressed harder,
and a sender limited by its producer stays where it is. Measuring throughput itself keeps
it right when sender and receiver share CPUs, where compression's cost shows up as a slower
"link". Batches that do not compress go raw whatever the level (``transport.pages``).
"""
from __future__ import annotations

from typing import Literal, Union

AUTO: Literal["auto"] = "auto"
# None = never compress, an int = that zstd level, "auto" = chosen as the link allows.
Level = Union[int, None, Literal["auto"]]

LADDER: tuple[int | None, ...] = (None, -7, -3, -1, 1, 3)
START = 1
WINDOW = 8                 # batches per measurement, at least
MIN_WINDOW_S = 0.05        # and at least this long (shorter ones are mostly scheduling noise)
EXPLORE_EVERY = 2          # measurements at the current level before trying a neighbour,
MAX_EXPLORE_EVERY = 8      # doubling after each try that did not pay, up to this
MARGIN = 0.08              # a neighbour must deliver this much more to be chosen


def check_level(level: Level) -> None:
    if level is None or level == AUTO:
        return
    if isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 19:
        raise ValueError(f"compression level {level!r}: use None, 'auto' or a zstd level from -7 to 19")


class LevelController:
    """Hill-climbs the compression level on measured throughput, one step at a time."""

    def __init__(self, level: Level = AUTO, *, settle: int = 4, ladder: tuple[int | None, ...] = LADDER,
                 window: int = WINDOW) -> None:
        check_level(level)
        self.auto = level == AUTO
        self._ladder = ladder
        self._index = ladder.index(START)
        self._fixed: int | None = None if level == AUTO else level  # type: ignore[assignment]
        self._window = window
        self._settle = settle          # batches queued before a change (still the old level)
        self._skip = 0
        self._estimate: list[float | None] = [None] * len(ladder)
        self._home: int | None = None  # where to return after a try
        self._since_try = 0
        self._explore_every = EXPLORE_EVERY
        self._rotation = 0             # 0: a step down, 1: a step up, 2: raw <-> compressed
        self._last_compressed = self._index
        self._t0: float | None = None
        self._seen = 0
        self._raw = 0
        self.changes = 0

    @property
    def level(self) -> int | None:
        return self._ladder[self._index] if self.auto else self._fixed

    def observe(self, *, raw: int, now: float) -> None:
        """A batch of ``raw`` page bytes finished writing at ``now`` (seconds, any clock)."""
        if not self.auto:
            return
        if self._skip:
            self._skip -= 1
            self._t0 = now
            return
        if self._t0 is None:
            self._t0 = now
            return
        self._seen += 1
        self._raw += raw
        if self._seen >= self._window and now - self._t0 >= MIN_WINDOW_S:
            self._decide(self._raw / max(now - self._t0, 1e-9))
            self._t0, self._seen, self._raw = now, 0, 0

    def _move(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self._skip = self._settle
            self.changes += 1

    def _candidate(self, here: int) -> int:
        """The next level to try: one step down, one step up, or the jump between raw and
        compressed (throughput is often flat across zstd levels and different raw)."""
        last = len(self._ladder) - 1
        for _ in range(3):
            kind = self._rotation
            self._rotation = (self._rotation + 1) % 3
            if kind == 0 and here - 1 >= 1:
                return here - 1
            if kind == 1 and here + 1 <= last and here != 0:
                return here + 1
            if kind == 2:
                return 0 if here != 0 else self._last_compressed
        return here

    def _decide(self, rate: float) -> None:
        here = self._index
        if self._home is not None:                       # the end of a try: fresh against home
            home, self._home = self._home, None
            self._estimate[here] = rate
            if rate <= (self._estimate[home] or 0.0) * (1 + MARGIN):
                self._move(home)
                self._explore_every = min(2 * self._explore_every, MAX_EXPLORE_EVERY)
            else:                                        # it paid: try that way again at once
                self._explore_every = EXPLORE_EVERY
                self._since_try = EXPLORE_EVERY
                self._rotation = (self._rotation - 1) % 3
            return
        if here != 0:
            self._last_compressed = here
        old = self._estimate[here]
        self._estimate[here] = rate if old is None else (old + rate) / 2
        self._since_try += 1
        if self._since_try < self._explore_every:
            return
        self._since_try = 0
        target = self._candidate(here)
        if target != here:
            self._home = here
            self._move(target)
