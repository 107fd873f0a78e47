"""Memory a tree's process inherits from its parent's stub, kept shared copy-on-write.

At the source, a child shares with its parent every private page neither has written since
the fork (anonymous memory, and the pages of a privately mapped file that were written
before): one page in memory for both (a Python pool forked after loading its data, a
launcher's workers). A restore that made each process's memory on its own would hold one copy
per process, and a job that fits at the source would not fit at the destination.

``agent.restore_session`` forks a child's stub once its parent's memory is in, so the child's
stub starts out with the parent's private memory, shared. ``Restorer`` keeps the mappings the
child has there too (``inheritable``), and writes a page into them only where it differs from
what the child holds already (``changed``): a page left alone stays shared with the parent's,
as it was at the source. Comparing with what the process holds is right whatever was written
when, in either process: a page that already holds the bytes the stream brings need not be
written. What the child's first copy does not bring is a hole at the source, dropped here too
(``Restorer.end_first_copy``).

The source's preflight counts what the job needs at the destination with it
(``shared_with_parent``): a process's resident memory, less the pages it holds as its
parent's very pages.
"""
from __future__ import annotations

import array
import bisect
import ctypes
import os

from precopy.intervals import Run, Span, clip, intersect_spans, merge_spans, subtract_spans
from precopy.layout import PageFinder, read_maps
from precopy.kernel import buffer_address, data_address
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

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int

Runs = tuple[tuple[int, int], ...]     # (address, pages), as ``PageBatch.runs``


def inheritable(v: Vma) -> bool:
    """A mapping of the parent's that a child forked from it holds with the same contents:
    private memory, anonymous or of a file (whose written pages are anonymous too), neither
    dropped nor wiped at a fork (``MADV_DONTFORK``, ``MADV_WIPEONFORK``), nor droppable.
    (The restorer leaves out the files it maps only at the end: ``Restorer._is_deferred``.)"""
    return (v.kind in ("anon", "heap", "stack", "file") and not v.shared and v.shm is None
            and not v.advice & (ADV_DONTFORK | ADV_WIPEONFORK | VMA_DROPPABLE))


GROUP_PAGES = 64     # pages compared together: a group whose first and last pages differ is written unread


def changed(mem_fd: int, runs: Runs, view: memoryview, inherited: list[Span]) -> tuple[Runs, memoryview]:
    """The pages of ``runs`` (their data in ``view``, one after another) that the process
    whose /proc/PID/mem is ``mem_fd`` must be written: all of them but those inside
    ``inherited`` (sorted, merged) that hold those very bytes already. Returns the runs and
    data to write (``runs`` and ``view`` themselves when every page must be).

    Pages go by groups of ``GROUP_PAGES``: a group whose first and last pages both differ is
    written without reading the rest (a child that allocated its own memory where its parent
    has other memory: nothing there is shared, and reading it would cost as much again as
    writing it). A page that cannot be read is written."""
    pieces = _split(runs, inherited)
    if not any(inside for *_, inside in pieces):
        return runs, view
    base = data_address(view)
    held = bytearray(GROUP_PAGES * PAGE_SIZE)
    ours = buffer_address(held)
    out: list[tuple[int, int, int]] = []           # (address, bytes, offset in view) to write
    same = 0

    def write(addr: int, size: int, offset: int) -> None:
        last = out[-1] if out else None
        if last is not None and last[0] + last[1] == addr and last[2] + last[1] == offset:
            out[-1] = (last[0], last[1] + size, last[2])
        else:
            out.append((addr, size, offset))

    for addr, size, offset, inside in pieces:
        if not inside:
            write(addr, size, offset)
            continue
        for first in range(0, size, GROUP_PAGES * PAGE_SIZE):
            length = min(GROUP_PAGES * PAGE_SIZE, size - first)
            kept = _kept(mem_fd, addr + first, base + offset + first, length, held, ours)
            for page in range(0, length, PAGE_SIZE):
                if kept[page // PAGE_SIZE]:
                    same += PAGE_SIZE
                else:
                    write(addr + first + page, PAGE_SIZE, offset + first + page)
    if not same:
        return runs, view
    data = b"".join(view[o:o + s] for _, s, o in out)
    return tuple((a, s // PAGE_SIZE) for a, s, _ in out), memoryview(data)


def _split(runs: Runs, inherited: list[Span]) -> list[tuple[int, int, int, bool]]:
    """``runs`` cut where ``inherited`` starts and ends: (address, bytes, offset of its data,
    inside ``inherited``), in order."""
    starts = [s for s, _ in inherited]
    pieces: list[tuple[int, int, int, bool]] = []
    off = 0
    for addr, n in runs:
        end = addr + n * PAGE_SIZE
        at = addr
        i = bisect.bisect_right(starts, at) - 1
        while at < end:
            if i >= 0 and at < inherited[i][1]:
                upto = min(end, inherited[i][1])
                pieces.append((at, upto - at, off + at - addr, True))
            else:
                upto = min(end, inherited[i + 1][0]) if i + 1 < len(inherited) else end
                pieces.append((at, upto - at, off + at - addr, False))
            at = upto
            if i + 1 < len(inherited) and at >= inherited[i + 1][0]:
                i += 1
        off += n * PAGE_SIZE
    return pieces


def _kept(mem_fd: int, addr: int, data: int, length: int, held: bytearray, ours: int) -> list[bool]:
    """For each page of [addr, addr + length) (at most ``GROUP_PAGES``), whether the process
    holds the bytes at ``data`` there already; ``held`` (at ``ours``): room to read into.

    Read through /proc/PID/mem, not process_vm_readv: that pins the pages it reads
    (FOLL_PIN), and the kernel gives a process its own copy of a copy-on-write page before
    it lets it be pinned, so reading would unshare every page compared. /proc/PID/mem takes
    references, not pins."""
    pages = length // PAGE_SIZE
    view = memoryview(held)

    def read(at: int, size: int) -> int:
        try:
            return os.preadv(mem_fd, [view[at:at + size]], addr + at)
        except OSError:
            return 0

    def same(at: int) -> bool:
        return _memcmp(data + at, ours + at, PAGE_SIZE) == 0

    last = length - PAGE_SIZE
    if not (read(0, PAGE_SIZE) == PAGE_SIZE and same(0)) and \
            not (pages > 1 and read(last, PAGE_SIZE) == PAGE_SIZE and same(last)):
        return [False] * pages
    got = read(0, length)
    if got == length and _memcmp(data, ours, length) == 0:
        return [True] * pages
    kept = []
    for page in range(pages):
        at = page * PAGE_SIZE
        readable = at + PAGE_SIZE <= got or read(at, PAGE_SIZE) == PAGE_SIZE
        kept.append(readable and same(at))
    return kept


PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
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
    same = 0
    ours = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        theirs = os.open(f"/proc/{parent}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for addr, n in runs:
                for first in range(0, n, PAGEMAP_PAGES):
                    count = min(PAGEMAP_PAGES, n - first)
                    at = (addr // PAGE_SIZE + first) * 8
                    mine, its = os.pread(ours, count * 8, at), os.pread(theirs, count * 8, at)
                    if len(mine) != count * 8 or len(its) != count * 8:
                        continue
                    present = next((e for e in array.array("Q", mine) if e & PRESENT), 0)
                    if present and not present & PFN_MASK:
                        return 0            # frames read as 0: no telling what is shared
                    same += _equal_entries(mine, its)
        finally:
            os.close(theirs)
    finally:
        os.close(ours)
    return same * PAGE_SIZE


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


def parent_frames(pid: int, parent: int, runs: list[Run], where: list[Span]) -> list[Run]:
    """Of ``runs`` (populated pages of ``pid``), those inside ``where`` that are ``parent``'s
    very pages: the same frame at the same address (or the same swapped-out page), as
    pagemap says. None where frames cannot be read (CAP_SYS_ADMIN), or where the kernel's
    samepage merging runs (KSM makes pages one frame that were not one since a fork)."""
    if _ksm_runs():
        return []
    runs = clip(runs, where)
    if not runs:
        return []
    out: list[Run] = []
    ours = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        theirs = os.open(f"/proc/{parent}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for addr, n in runs:
                for first in range(0, n, PAGEMAP_PAGES):
                    count = min(PAGEMAP_PAGES, n - first)
                    at = (addr // PAGE_SIZE + first) * 8
                    mine, its = os.pread(ours, count * 8, at), os.pread(theirs, count * 8, at)
                    if len(mine) != count * 8 or len(its) != count * 8:
                        continue
                    entries = array.array("Q", mine)
                    present = next((e for e in entries if e & PRESENT), 0)
                    if present and not present & PFN_MASK:
                        return []
                    x = int.from_bytes(mine, "little") ^ int.from_bytes(its, "little")
                    differ = array.array("Q", x.to_bytes(len(mine), "little"))
                    base = addr + first * PAGE_SIZE
                    for i, d in enumerate(differ):
                        if d or not entries[i]:
                            continue
                        page = base + i * PAGE_SIZE
                        if out and out[-1][0] + out[-1][1] * PAGE_SIZE == page:
                            out[-1] = (out[-1][0], out[-1][1] + 1)
                        else:
                            out.append((page, 1))
        finally:
            os.close(theirs)
    finally:
        os.close(ours)
    return out


def parent_pages_records(runs: list[Run]) -> list[ParentPages]:
    """``runs`` as ``ParentPages`` records."""
    ranges = [AddressRange(a, a + n * PAGE_SIZE) for a, n in runs]
    return [ParentPages(tuple(ranges[i:i + MAX_PARENT_RANGES])) for i in range(0, len(ranges), MAX_PARENT_RANGES)]


def _ksm_runs() -> bool:
    try:
        with open("/sys/kernel/mm/ksm/run") as f:
            return f.read().strip() != "0"
    except OSError:
        return False
