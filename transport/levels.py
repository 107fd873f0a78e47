"""Choosing the zstd level so that compression keeps up with the link.

The sender of a ``FramedStream`` reports, for every page batch it writes, how long it waited
for the batch's compression and how long writing it took. Over a window of batches: if
waiting for compression dominates, compression is the bottleneck and the level steps down
(faster, bigger output); if compression is almost never waited for, the link is the
bottleneck and the level steps up (slower, smaller output). The level settles where both
keep pace. Batches that do not compress go raw whatever the level (``transport.pages``).
"""
from __future__ import annotations

from typing import Literal, Union

AUTO: Literal["auto"] = "auto"
# None = never compress, an int = that zstd level, "auto" = chosen as the link allows.
Level = Union[int, None, Literal["auto"]]

LADDER: tuple[int, ...] = (-7, -3, -1, 1, 3)
START = 1
WINDOW = 8                 # batches per decision
STEP_UP_BELOW = 0.05       # compression waited for under 5% of write time: the link is the limit


def check_level(level: Level) -> None:
    if level is None or level == AUTO:
        return
    if isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 19:
        raise ValueError(f"compression level {level!r}: use None, 'auto' or a zstd level from -7 to 19")


class LevelController:
    """Adapts the zstd level to the link, one ladder step per ``window`` batches."""

    def __init__(self, level: Level = AUTO, *, ladder: tuple[int, ...] = LADDER,
                 window: int = WINDOW) -> None:
        check_level(level)
        self.auto = level == AUTO
        self._ladder = ladder
        self._index = ladder.index(START) if START in ladder else len(ladder) // 2
        self._fixed: int | None = None if level == AUTO else level  # type: ignore[assignment]
        self._window = window
        self._seen = 0
        self._wait = 0.0
        self._write = 0.0
        self.changes = 0

    @property
    def level(self) -> int | None:
        return self._ladder[self._index] if self.auto else self._fixed

    def observe(self, compress_wait_s: float, write_s: float) -> None:
        """One batch written: it was waited for ``compress_wait_s`` and took ``write_s`` to send."""
        if not self.auto:
            return
        self._seen += 1
        self._wait += compress_wait_s
        self._write += write_s
        if self._seen < self._window:
            return
        step = 0
        if self._wait > self._write:
            step = -1
        elif self._wait < STEP_UP_BELOW * self._write:
            step = 1
        new = min(max(self._index + step, 0), len(self._ladder) - 1)
        if new != self._index:
            self._index = new
            self.changes += 1
        self._seen = 0
        self._wait = self._write = 0.0
