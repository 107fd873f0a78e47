"""Memory a tree's process inherits from its parent's stub, kept shared copy-on-write.

At the source, a child shares with its parent every private page neither has written since
the fork (anonymous memory, and the pages of a privately mapped file that were written
before): one page in memory for both (a Python pool forked after loading its data, a
launcher's workers). A restore that made each process's memory on its own would hold one copy
per process, and a job that fits at the source would not fit at the destination.

``agent.restore_session`` forks a child's stub once its parent's memory is in, so the child's
stub starts out with the parent's private memory, shared. ``Restorer`` keeps the mappings the
child has there too (``precopy.parent_frames.inheritable``), and writes a page into them only
where it differs from what the child holds already (``changed``): a page left alone stays
shared with the parent's, as it was at the source. Comparing with what the process holds is
right whatever was written when, in either process: a page that already holds the bytes the
stream brings need not be written. What the child's first copy does not bring is a hole at the
source, dropped here too (``Restorer.end_first_copy``).

The source says which of a child's pages are its parent's very pages, and sends them once
(``precopy.parent_frames``): those the child holds as inherited already.
"""
from __future__ import annotations

import bisect
import ctypes
import os

from precopy.intervals import Span
from transport.buffers import buffer_address, data_address
from transport.schema import PAGE_SIZE

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int

Runs = tuple[tuple[int, int], ...]     # (address, pages), as ``PageBatch.runs``


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
