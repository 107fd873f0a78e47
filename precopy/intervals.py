"""Arithmetic on page runs: union, difference and intersection of sorted address ranges.

A *run* is ``(address, number of pages)``, as page batches carry them; a *span* is
``(start, end)`` in bytes. Every function takes and returns sorted, non-overlapping,
merged lists, so a round's bookkeeping is linear in the number of runs, not of pages.
"""
from __future__ import annotations

import bisect
from typing import Iterable, Sequence

from transport.schema import PAGE_SIZE

Run = tuple[int, int]      # (address, pages)
Span = tuple[int, int]     # (start, end), bytes


def to_spans(runs: Iterable[Run]) -> list[Span]:
    return [(a, a + n * PAGE_SIZE) for a, n in runs]


def to_runs(spans: Iterable[Span]) -> list[Run]:
    return [(s, (e - s) // PAGE_SIZE) for s, e in spans if e > s]


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Sort and coalesce overlapping or touching spans."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def add_runs(base: list[Run], extra: Sequence[Run]) -> list[Run]:
    """``union(base, extra)`` (both normalized), in time for ``extra`` (a bisect and a splice
    each) where it is small next to ``base``: a round's few written pages against every page
    a process has."""
    if not extra:
        return base
    if len(extra) * 16 > len(base):
        return union(base, extra)
    out = list(base)
    for a, n in extra:
        e = a + n * PAGE_SIZE
        i = bisect.bisect_left(out, (a,))
        if i > 0 and out[i - 1][0] + out[i - 1][1] * PAGE_SIZE >= a:
            i -= 1
            a = out[i][0]
        j = i
        while j < len(out) and out[j][0] <= e:
            e = max(e, out[j][0] + out[j][1] * PAGE_SIZE)
            j += 1
        out[i:j] = [(a, (e - a) // PAGE_SIZE)]
    return out


def append_run(runs: list[Run], addr: int, n: int = 1) -> None:
    """Add the run (``addr``, ``n`` pages) at the end of ``runs``, which it follows: joined
    to the last run where it starts where that one ends."""
    if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == addr:
        runs[-1] = (runs[-1][0], runs[-1][1] + n)
    else:
        runs.append((addr, n))


def normalize(runs: Iterable[Run]) -> list[Run]:
    return to_runs(merge_spans(to_spans(runs)))


def npages(runs: Iterable[Run]) -> int:
    return sum(n for _, n in runs)


def union(a: Iterable[Run], b: Iterable[Run]) -> list[Run]:
    return to_runs(merge_spans(to_spans(a) + to_spans(b)))


def within(spans: Sequence[Span], addr: int) -> bool:
    """Is ``addr`` inside one of ``spans`` (sorted, disjoint)?"""
    i = bisect.bisect_right(spans, (addr, 1 << 64)) - 1
    return i >= 0 and spans[i][0] <= addr < spans[i][1]


def intersect_spans(a: list[Span], b: list[Span]) -> list[Span]:
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract_spans(a: list[Span], b: list[Span]) -> list[Span]:
    out: list[Span] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        cur = s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


class SpanIndex:
    """Sorted, disjoint spans asked many times which of them lie in a range: a bisect each,
    so asking once per mapping costs the spans found, not all of them (``intersect_spans``
    of the whole list for every mapping grows with the square of the mappings)."""

    def __init__(self, spans: Iterable[Span]) -> None:
        self.spans = list(spans)
        self._ends = [e for _, e in self.spans]

    def __bool__(self) -> bool:
        return bool(self.spans)

    def clip(self, start: int, end: int) -> list[Span]:
        """The parts of the spans inside [start, end)."""
        out: list[Span] = []
        spans = self.spans
        i = bisect.bisect_right(self._ends, start)
        while i < len(spans) and spans[i][0] < end:
            s, e = spans[i]
            out.append((s if s > start else start, e if e < end else end))
            i += 1
        return out


def _span_end(s: Span) -> int:
    return s[1]


def _span_start(s: Span) -> int:
    return s[0]


def splice_spans(spans: list[Span], region: list[Span], inside: list[Span]) -> list[Span]:
    """``merge_spans(subtract_spans(spans, region) + inside)`` for ``inside`` within ``region``
    (all sorted and merged), in time for the spans near ``region``: a bisect and a splice per
    range of it, but for one copy of the list."""
    out = list(spans)
    for a, b in reversed(region):
        i = bisect.bisect_left(out, a, key=_span_end)        # the first that ends at a or later
        j = bisect.bisect_right(out, b, key=_span_start)     # past the last that starts at b or before
        k = bisect.bisect_left(inside, a, key=_span_start)
        m = bisect.bisect_left(inside, b, key=_span_start)
        out[i:j] = merge_spans(subtract_spans(out[i:j], [(a, b)]) + inside[k:m])
    return out


def intersect(a: Iterable[Run], b: Iterable[Run]) -> list[Run]:
    return to_runs(intersect_spans(to_spans(a), to_spans(b)))


def subtract(a: Iterable[Run], b: Iterable[Run]) -> list[Run]:
    return to_runs(subtract_spans(to_spans(a), to_spans(b)))


def clip(runs: Iterable[Run], spans: list[Span]) -> list[Run]:
    """The parts of ``runs`` inside ``spans`` (sorted, merged)."""
    return to_runs(intersect_spans(to_spans(runs), spans))


def pages_of(runs: Iterable[Run]) -> set[int]:
    """Every page address of the runs (for tests and small sets only)."""
    return {a + i * PAGE_SIZE for a, n in runs for i in range(n)}


def runs_of(pages: Iterable[int]) -> list[Run]:
    """Runs covering a set of page addresses."""
    out: list[Run] = []
    for a in sorted(pages):
        append_run(out, a)
    return out
