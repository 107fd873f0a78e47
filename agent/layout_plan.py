"""What a restorer must do to turn one memory layout into the next, as data (no I/O).

A live migration applies a new layout after every pre-copy round. The trackers send only what
changed (``precopy.rounds.PageSink``), so the destination must keep the contents of every range
still mapped with the same backing, even where the mapping grew (brk, mremap in place), split
or merged (mprotect): only ranges of another backing start out empty, and what is no longer
mapped goes. ``plan_layout`` says which ranges to unmap, which pieces to map anew, and which
kept ranges need their protection or advice changed.
"""
from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Sequence

from precopy.intervals import Span, merge_spans, subtract_spans
from transport.frozen import frozen
from transport.schema import VMA_DROPPABLE, MappingsDelta, Vma


@frozen
class Reprotect:
    start: int
    end: int
    prot: int


@frozen
class Readvise:
    start: int
    end: int
    advice: int          # the ADV_* bits wanted
    before: int          # the ADV_* bits the range has now


@frozen
class LayoutPlan:
    unmap: tuple[Span, ...]            # mapped now, not in the new layout
    map: tuple[Vma, ...]               # pieces to map anew (they start out empty)
    reprotect: tuple[Reprotect, ...]   # kept ranges whose protection changes
    readvise: tuple[Readvise, ...]     # kept ranges whose advice changes
    kept: tuple[Span, ...]             # ranges that keep their contents (merged, sorted)


def same_backing(a: Vma, b: Vma) -> bool:
    """Is ``b`` (part of) the memory ``a`` maps, seen at a later time? Anonymous private
    memory is, wherever the two overlap (the heap that grew, a mapping that split); file and
    shared memory when it is the same object at the same offset."""
    if a.shared != b.shared or a.growsdown != b.growsdown or (a.kind == "file") != (b.kind == "file"):
        return False
    if (a.advice ^ b.advice) & VMA_DROPPABLE:
        return False        # droppable memory is a mapping of another type, not the same memory
    if a.kind != "file" and not a.shared:
        return True
    if (a.shm.shmid if a.shm else -1) != (b.shm.shmid if b.shm else -1):
        return False        # another SysV segment (or none) at the same place
    if a.ino and b.ino and a.ino != b.ino:
        return False        # another object at the same place: a file replaced, new shared memory
    return a.path == b.path and a.pgoff - a.start == b.pgoff - b.start


def piece(v: Vma, start: int, end: int) -> Vma:
    """The part [start, end) of ``v``, with its file offset moved along."""
    if start == v.start and end == v.end:
        return v
    offset = start - v.start if v.kind == "file" or v.shared else 0
    return replace(v, start=start, end=end, pgoff=v.pgoff + offset)


def plan_layout(old: Sequence[Vma], new: Sequence[Vma]) -> LayoutPlan:
    """From ``old`` (sorted, what is mapped now) to ``new`` (sorted)."""
    ends = [o.end for o in old]
    mapped: list[Vma] = []
    reprotect: list[Reprotect] = []
    readvise: list[Readvise] = []
    kept: list[Span] = []
    for v in new:
        here: list[Span] = []
        for o in old[bisect.bisect_right(ends, v.start):]:
            if o.start >= v.end:
                break
            if not same_backing(o, v):
                continue
            start, end = max(o.start, v.start), min(o.end, v.end)
            here.append((start, end))
            if o.prot != v.prot:
                reprotect.append(Reprotect(start, end, v.prot))
            if o.advice != v.advice:
                readvise.append(Readvise(start, end, v.advice, o.advice))
        kept += here
        mapped += [piece(v, start, end) for start, end in subtract_spans([(v.start, v.end)], merge_spans(here))]
    unmap = subtract_spans(merge_spans((o.start, o.end) for o in old), merge_spans((v.start, v.end) for v in new))
    return LayoutPlan(tuple(unmap), tuple(mapped), tuple(reprotect), tuple(readvise), tuple(merge_spans(kept)))


def _end(v: Vma) -> int:
    return v.end


def _start(v: Vma) -> int:
    return v.start


def in_ranges(vmas: Sequence[Vma], ranges: Sequence[Span]) -> list[Vma]:
    """The parts of ``vmas`` (sorted, disjoint) inside ``ranges`` (sorted, disjoint): a bisect
    per range, then the mappings there."""
    out: list[Vma] = []
    for a, b in ranges:
        i = bisect.bisect_right(vmas, a, key=_end)
        while i < len(vmas) and vmas[i].start < b:
            v = vmas[i]
            s, e = max(v.start, a), min(v.end, b)
            out.append(v if (s, e) == (v.start, v.end) else piece(v, s, e))
            i += 1
    return out


def applied(vmas: Sequence[Vma], delta: MappingsDelta) -> list[Vma]:
    """``vmas`` (sorted) changed by ``delta``: what lies in its cleared ranges goes (the parts
    of a mapping outside them stay), its mappings come. Bisects and splices: the time of the
    change, not of the layout, but for one copy of the list."""
    out = list(vmas)
    news = list(delta.vmas)
    for r in reversed(delta.cleared):
        i = bisect.bisect_right(out, r.start, key=_end)
        j = bisect.bisect_left(out, r.end, key=_start)
        kept = [piece(v, s, e) for v in out[i:j] for s, e in subtract_spans([(v.start, v.end)], [(r.start, r.end)])]
        k = bisect.bisect_left(news, r.start, key=_start)
        m = bisect.bisect_left(news, r.end, key=_start)
        out[i:j] = sorted(kept + news[k:m], key=_start)
    return out
