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

from precopy.intervals import Span, intersect_spans, merge_spans
from precopy.layout import PageFinder, read_maps
from precopy.kernel import buffer_address, data_address
from transport.schema import ADV_DONTFORK, ADV_WIPEONFORK, PAGE_SIZE, VMA_DROPPABLE, Vma

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


def changed(mem_fd: int, runs: Runs, view: memoryview, inherited: list[Span]) -> tuple[Runs, memoryview]:
    """The pages of ``runs`` (their data in ``view``, one after another) that the process
    whose /proc/PID/mem is ``mem_fd`` must be written: all of them but those inside ``inherited`` (sorted, merged) that hold
    those very bytes already. Returns the runs and data to write (``runs`` and ``view``
    themselves when every page must be). A page that cannot be read is written."""
    starts = [s for s, _ in inherited]
    inside: list[tuple[int, int, int]] = []        # (address, bytes, offset in view) in ``inherited``
    pieces: list[tuple[int, int, int, bool]] = []  # (address, bytes, offset, inside): the runs, split
    off = 0
    for addr, n in runs:
        end = addr + n * PAGE_SIZE
        at = addr
        i = bisect.bisect_right(starts, at) - 1
        while at < end:
            if i >= 0 and at < inherited[i][1]:          # inside span i
                upto = min(end, inherited[i][1])
                inside.append((at, upto - at, off + at - addr))
                pieces.append((at, upto - at, off + at - addr, True))
            else:
                nxt = inherited[i + 1][0] if i + 1 < len(inherited) else end
                upto = min(end, nxt)
                pieces.append((at, upto - at, off + at - addr, False))
            at = upto
            if i + 1 < len(inherited) and at >= inherited[i + 1][0]:
                i += 1
        off += n * PAGE_SIZE
    if not inside:
        return runs, view
    held = bytearray(sum(size for _, size, _ in inside))
    unread = _read(mem_fd, [(a, size) for a, size, _ in inside], held)
    base, ours = data_address(view), buffer_address(held)
    out: list[tuple[int, int, int]] = []           # (address, bytes, offset in view) to write
    at_held = same = 0
    for addr, size, offset, is_inside in pieces:
        if not is_inside:
            out.append((addr, size, offset))
            continue
        here = at_held
        at_held += size
        if not any(here <= u < here + size for u in unread) and _memcmp(base + offset, ours + here, size) == 0:
            same += size
            continue
        for page in range(0, size, PAGE_SIZE):
            if here + page not in unread and _memcmp(base + offset + page, ours + here + page, PAGE_SIZE) == 0:
                same += PAGE_SIZE
                continue
            last = out[-1] if out else None
            if last is not None and last[0] + last[1] == addr + page and last[2] + last[1] == offset + page:
                out[-1] = (last[0], last[1] + PAGE_SIZE, last[2])
            else:
                out.append((addr + page, PAGE_SIZE, offset + page))
    if not same:
        return runs, view
    data = b"".join(view[o:o + s] for _, s, o in out)
    return tuple((a, s // PAGE_SIZE) for a, s, _ in out), memoryview(data)


def _read(mem_fd: int, ranges: list[tuple[int, int]], into: bytearray) -> set[int]:
    """Read ``ranges`` (page-aligned) of a process, through its /proc/PID/mem ``mem_fd``, into
    ``into``, one after another; returns the offsets in ``into`` of the pages that could not
    be read (the reading goes on after such a page).

    Not process_vm_readv: it pins the pages it reads (FOLL_PIN), and the kernel gives a
    process its own copy of a copy-on-write page before it lets it be pinned, so reading
    would unshare every page compared. /proc/PID/mem takes references, not pins."""
    unread: set[int] = set()
    view = memoryview(into)
    at = 0
    for addr, size in ranges:
        done = 0
        while done < size:
            try:
                got = os.preadv(mem_fd, [view[at + done:at + size]], addr + done)
            except OSError:
                got = 0
            if got == size - done:
                break
            done += got - got % PAGE_SIZE
            unread.add(at + done)          # this page cannot be read: the rest may be
            done += PAGE_SIZE
        at += size
    return unread


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
                    mine, its = array.array("Q"), array.array("Q")
                    mine.frombytes(os.pread(ours, count * 8, at))
                    its.frombytes(os.pread(theirs, count * 8, at))
                    same += sum(1 for a, b in zip(mine, its) if a == b and a & PRESENT and a & PFN_MASK)
        finally:
            os.close(theirs)
    finally:
        os.close(ours)
    return same * PAGE_SIZE
