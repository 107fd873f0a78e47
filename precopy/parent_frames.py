"""Which pages of a tree's child are its parent's very pages: the source's side of keeping
what a fork shares copy-on-write shared (``agent.inherited`` is the restore's).

Two processes hold one page where pagemap gives both the same frame at the same address (or
the same swapped-out page): a child and its parent since a fork, neither having written it.
A restore forks the child from its parent's stub once the parent's pages are in, so the child
holds those pages already: they go as ``ParentPages`` instead of again (``parent_frames``),
and the destination needs them once (``shared_with_parent``, in preflight). Frames read as 0
without CAP_SYS_ADMIN, and where the kernel's samepage merging runs (KSM makes one frame of
pages that were not one since a fork) nothing is said to be shared.
"""
from __future__ import annotations

import array
import os
from collections.abc import Iterator

from precopy.intervals import Run, Span, append_run, clip, intersect_spans, merge_spans, subtract, subtract_spans
from precopy.layout import PageFinder, read_maps
from precopy.pagemap import PM_PFN_MASK, PM_PRESENT, mapped_once, ones
from transport.schema import (
    ADV_DONTFORK,
    ADV_WIPEONFORK,
    MAX_PARENT_RANGES,
    PAGE_SIZE,
    VMA_DROPPABLE,
    AddressRange,
    ParentPages,
    Vma,
)


def inheritable(v: Vma) -> bool:
    """A mapping of the parent's that a child forked from it holds with the same contents:
    private memory, anonymous or of a file (whose written pages are anonymous too), neither
    dropped nor wiped at a fork (``MADV_DONTFORK``, ``MADV_WIPEONFORK``), nor droppable.
    (The restorer leaves out the files it maps only at the end: ``Restorer._is_deferred``.)"""
    return (v.kind in ("anon", "heap", "stack", "file") and not v.shared and v.shm is None
            and not v.advice & (ADV_DONTFORK | ADV_WIPEONFORK | VMA_DROPPABLE))


PAGEMAP_PAGES = 1 << 16         # pagemap entries read at a time


def shared_with_parent(pid: int, parent: int) -> int:
    """Bytes of ``pid``'s private anonymous memory that are its ``parent``'s very pages, at the
    same addresses (copy-on-write since a fork, written by neither): a restore of the tree
    shares them again, so the job needs that much less at the destination. 0 where the
    pages' frames cannot be read (PFNs need CAP_SYS_ADMIN)."""
    def private(p: int) -> list[Span]:
        return merge_spans((e.start, e.end) for e in read_maps(p)
                           if not e.shared and (not e.name or e.name in ("[heap]", "[stack]")))
    spans = intersect_spans(private(pid), private(parent))
    if not spans:
        return 0
    with PageFinder(pid) as finder:
        runs = [run for start, end in spans for run in finder.populated_span(start, end, file_backed=False)]
    try:
        return sum(_equal_entries(mine, its) for _, mine, its in _pagemap_pairs(pid, parent, runs)) * PAGE_SIZE
    except _NoFrames:
        return 0


def _equal_entries(a: bytes, b: bytes) -> int:
    """How many of the 8-byte pagemap entries of ``a`` and ``b`` (as long) are equal and not
    both zero (not present, nothing known): in C, on two big integers, not entry by entry."""
    x, y = int.from_bytes(a, "little"), int.from_bytes(b, "little")
    equal = array.array("Q", (x ^ y).to_bytes(len(a), "little")).count(0)
    neither = array.array("Q", (x | y).to_bytes(len(a), "little")).count(0)
    return equal - neither


def parent_ranges(child: list[Vma], parent: list[Vma]) -> list[Span]:
    """Where a restore leaves the child holding its parent's memory (``Restorer``): the
    parent's ``inheritable`` anonymous mappings, over which the child has anonymous private
    memory of its own of the same kind (``agent.layout_plan.same_backing``)."""
    out: list[Span] = []
    theirs = [v for v in parent if inheritable(v) and v.kind != "file"]
    for v in child:
        if v.kind not in ("anon", "heap", "stack") or v.shared or v.shm is not None or v.advice & VMA_DROPPABLE:
            continue
        out += intersect_spans([(v.start, v.end)], [(p.start, p.end) for p in theirs if p.growsdown == v.growsdown])
    # (not where the child's vDSO and its data go: the restore moves them there first)
    cluster = merge_spans((v.start, v.end) for v in child if v.kind in ("vdso", "vvar", "vvar_vclock", "vsyscall"))
    return subtract_spans(merge_spans(out), cluster)


def parent_frames(pid: int, parent: int, runs: list[Run], where: list[Span]) -> list[Run] | None:
    """Of ``runs`` (populated pages of ``pid``), those inside ``where`` that are ``parent``'s
    very pages: the same frame at the same address (or the same swapped-out page), as
    pagemap says. None where that cannot be told: frames cannot be read (CAP_SYS_ADMIN), or
    the kernel's samepage merging runs (KSM makes pages one frame that were not one since a fork)."""
    if _ksm_runs():
        return None
    runs = clip(runs, where)
    if not runs:
        return []
    out: list[Run] = []
    try:
        for base, mine, its in _pagemap_pairs(pid, parent, runs):
            # One byte an entry, 1 where the two are equal and say something: in C, on the
            # entries as big integers and bytes, not entry by entry (a page costs nanoseconds).
            ours = int.from_bytes(mine, "little")
            equal = _nonzero_bytes(ours ^ int.from_bytes(its, "little"), len(mine)).translate(_IS_ZERO)
            known = _nonzero_bytes(ours, len(mine)).translate(_IS_NONZERO)
            both = (int.from_bytes(equal, "little") & int.from_bytes(known, "little")).to_bytes(len(equal), "little")
            for first, count in ones(both):
                append_run(out, base + first * PAGE_SIZE, count)
    except _NoFrames:
        return None
    return out


_IS_ZERO = bytes([1] + [0] * 255)
_IS_NONZERO = bytes([0] + [1] * 255)


def _nonzero_bytes(x: int, size: int) -> bytes:
    """For each 8-byte entry of ``x`` (``size`` bytes, little-endian), one byte: 0 where the
    entry is 0. Each entry's bytes are folded into its lowest (what shifts in from the next
    entry lands above it)."""
    x |= x >> 32
    x |= x >> 16
    x |= x >> 8
    return x.to_bytes(size, "little")[0::8]


class _NoFrames(Exception):
    """Frames read as 0 (no CAP_SYS_ADMIN): no telling what is shared."""


def _pagemap_pairs(pid: int, parent: int, runs: list[Run]) -> Iterator[tuple[int, bytes, bytes]]:
    """For ``runs`` of ``pid``, a piece at a time: its first address, and ``pid``'s and
    ``parent``'s pagemap entries there (a piece either cannot read whole is left out).
    Raises ``_NoFrames`` where the frames read as 0. A piece whose every page is present and
    mapped once (PM_MMAP_EXCLUSIVE: the child's alone, written since the fork) holds none of
    its parent's pages, and is left out without reading the parent's entries (a launcher's
    workers that filled their own memory: half the pagemap reads)."""
    ours = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        theirs = os.open(f"/proc/{parent}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for addr, n in runs:
                for first in range(0, n, PAGEMAP_PAGES):
                    count = min(PAGEMAP_PAGES, n - first)
                    at = (addr // PAGE_SIZE + first) * 8
                    mine = os.pread(ours, count * 8, at)
                    if len(mine) != count * 8 or mapped_once(mine) == bytes([1]) * count:
                        continue
                    its = os.pread(theirs, count * 8, at)
                    if len(its) != count * 8:
                        continue
                    present = next((e for e in array.array("Q", mine) if e & PM_PRESENT), 0)
                    if present and not present & PM_PFN_MASK:
                        raise _NoFrames()
                    yield addr + first * PAGE_SIZE, mine, its
        finally:
            os.close(theirs)
    finally:
        os.close(ours)


def parent_pages(pid: int, parent: int, runs: list[Run], child_layout: list[Vma],
                 parent_layout: list[Vma]) -> tuple[list[ParentPages], list[Run]]:
    """Of ``runs`` (populated pages of ``pid``'s first copy), those that are ``parent``'s very
    pages where a restore leaves the child holding them (``parent_ranges`` of the two
    layouts), as records, and the rest, to be sent. Where the frames were read, the records
    say they are complete (one with no ranges if none is shared): every other page there is
    the child's own at the source, and the restore writes it without comparing."""
    where = parent_ranges(child_layout, parent_layout)
    if not where:
        return [], runs
    theirs = parent_frames(pid, parent, runs, where)
    if theirs is None:
        return [], runs
    return parent_pages_records(theirs, complete=True), subtract(runs, theirs)


def parent_pages_records(runs: list[Run], *, complete: bool = False) -> list[ParentPages]:
    """``runs`` as ``ParentPages`` records (``complete``: at least one, each saying so)."""
    ranges = [AddressRange(a, a + n * PAGE_SIZE) for a, n in runs]
    return [ParentPages(tuple(ranges[i:i + MAX_PARENT_RANGES]), complete=int(complete))
            for i in range(0, max(len(ranges), 1 if complete else 0), MAX_PARENT_RANGES)]


def _ksm_runs() -> bool:
    try:
        with open("/sys/kernel/mm/ksm/run") as f:
            return f.read().strip() != "0"
    except OSError:
        return False
