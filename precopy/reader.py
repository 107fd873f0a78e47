"""Bulk reads of a process's pages into page batches.

``process_vm_readv`` moves up to IOV_MAX runs per call into one buffer; where it stops short
(a mapping without PROT_READ, or one the process just unmapped), ``/proc/PID/mem`` reads
what it can (it ignores protection), and runs that no longer exist are dropped: the next
layout scan accounts for them. Safe to run in worker threads: neither call needs the tracer.

Batches are read into fresh buffers, or into an ``Arena``: memory mapped and populated
beforehand, so that a read while the process is frozen copies at memory speed instead of
faulting in new pages of our own (several times slower on first touch here).
"""
from __future__ import annotations

import errno
import mmap
import os
from typing import Iterable, Iterator

from precopy.intervals import append_run
from precopy.kernel import IOV_MAX, process_vm_readv
from precopy.pagemap import mapped_once, ones
from transport.buffers import buffer_address
from transport.pages import DEFAULT_BATCH_BYTES, PageBatch
from transport.schema import PAGE_SIZE

Run = tuple[int, int]
ZERO_PAGE = bytes(PAGE_SIZE)


def split_runs(runs: Iterable[Run], batch_pages: int) -> Iterator[list[Run]]:
    """Group runs into batches of at most ``batch_pages`` pages (splitting long runs)."""
    batch: list[Run] = []
    count = 0
    for addr, n in runs:
        while n > 0:
            take = min(n, batch_pages - count)
            batch.append((addr, take))
            count += take
            addr += take * PAGE_SIZE
            n -= take
            if count == batch_pages:
                yield batch
                batch, count = [], 0
    if batch:
        yield batch


class Arena:
    """One anonymous mapping of ``size`` bytes, populated now, handed out in slices that stay
    valid while anything views them (the mapping goes with its last view)."""

    def __init__(self, size: int) -> None:
        self.size = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
        self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        self._view: memoryview | None = memoryview(self._map)
        self._used = 0

    def take(self, n: int) -> memoryview | None:
        """``n`` bytes of it, or None once it has no room left."""
        if self._view is None or self._used + n > self.size:
            return None
        out = self._view[self._used: self._used + n]
        self._used += n
        return out

    def close(self) -> None:
        """Hand out nothing more; the memory is returned once the last slice is dropped."""
        if self._view is not None:
            self._view.release()
            self._view = None
            self._map = None     # type: ignore[assignment]


class BufferPool:
    """Buffers for page batches, used again once their batch is written: a new bytearray
    costs its zeroing and the first touch of its pages, a second read's worth of CPU (64 MiB
    read in 2 MiB batches: 33 ms into new buffers, 18 ms into ones used before). At most
    ``keep`` buffers of ``size`` bytes are kept; a batch that finds none free, or wants more
    than ``size``, gets a buffer of its own, as without a pool.

    A buffer comes back only by ``give_back``, from whoever wrote its batch out last (nothing
    may view it after that: ``transport.image.ImageWriter``'s ``recycle``). Main thread only."""

    def __init__(self, size: int = DEFAULT_BATCH_BYTES, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []
        self._ours: dict[int, bytearray] = {}     # the buffers this pool made, by id (kept alive: ids stay theirs)

    def take(self, n: int) -> memoryview | None:
        """``n`` bytes of a buffer of the pool's, or None."""
        if n > self.size:
            return None
        if self._free:
            buf = self._free.pop()
        elif len(self._ours) < self.keep:
            buf = bytearray(self.size)
            self._ours[id(buf)] = buf
        else:
            return None
        return memoryview(buf)[:n]

    def give_back(self, data: bytes | bytearray | memoryview) -> None:
        """The batch data ``data`` is written: its buffer, if the pool's, serves again."""
        buf = data.obj if isinstance(data, memoryview) else data
        if isinstance(buf, bytearray) and self._ours.get(id(buf)) is buf and all(b is not buf for b in self._free):
            self._free.append(buf)


class PageReader:
    """Reads a process's pages into batches: with process_vm_readv (``pin``), else, and where
    that stops, through /proc/PID/mem.

    process_vm_readv pins the pages it reads, and the kernel gives a process its own copy of
    a copy-on-write page before it lets it be pinned: reading the processes of a tree that
    share memory since a fork that way would leave each with its own copy (a pool of eight
    workers sharing 8 GiB with their parent: 72 GiB). /proc/PID/mem takes references, not
    pins, but copies each page twice (half again the CPU here). ``pin`` off reads that way
    only the pages pagemap says are not the process's alone (mapped elsewhere too, or
    swapped out), and pins the rest, which costs no copy: a tree's processes pay the slower
    read for what they share, not for all they hold. (A page the process shares between the
    pagemap read and the pin, which a fork in that moment would do, gets a copy of its own.)
    Pages a process wrote since it was last read are its own (a write gives it its own
    copy): those may be pinned unasked (``read``'s ``pin``)."""

    def __init__(self, pid: int, *, batch_bytes: int = DEFAULT_BATCH_BYTES, arena: Arena | None = None,
                 pin: bool = True, pool: BufferPool | None = None) -> None:
        self.pid = pid
        self.pin = pin
        self.arena = arena          # where batches are read into while it has room
        self.pool = pool            # else, buffers used again where one is free
        self.batch_pages = max(1, batch_bytes // PAGE_SIZE)
        self._mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self._pagemap_fd = -1       # opened at the first read that asks which pages are shared
        self.bytes_read = 0
        self.pages_skipped_zero = 0     # all-zero pages ``batches(drop_zero=True)`` left out

    def close(self) -> None:
        for fd in (self._mem_fd, self._pagemap_fd):
            if fd >= 0:
                os.close(fd)
        self._mem_fd = self._pagemap_fd = -1

    def __enter__(self) -> "PageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batches(self, runs: Iterable[Run], *, drop_zero: bool = False, pin: bool | None = None) -> Iterator[PageBatch]:
        for group in split_runs(runs, self.batch_pages):
            batch = self.read(group, pin=pin)
            if drop_zero:
                kept = _without_zero_pages(batch)
                self.pages_skipped_zero += batch.npages - kept.npages
                if self.pool is not None:
                    self.pool.give_back(batch.data)      # (copied)
                batch = kept
            if batch.runs:
                yield batch

    def read(self, runs: list[Run], *, pin: bool | None = None) -> PageBatch:
        """Read the runs; runs that vanished are left out of the batch. ``pin``: whether to
        pin them all this time (None: as ``self.pin`` says)."""
        pin = self.pin if pin is None else pin
        total = sum(n for _, n in runs) * PAGE_SIZE
        buf: bytearray | memoryview | None = self.arena.take(total) if self.arena is not None else None
        if buf is None and self.pool is not None:
            buf = self.pool.take(total)
        if buf is None:
            buf = bytearray(total)
        base = buffer_address(buf)
        out = memoryview(buf)
        pieces = [(a, n, True) for a, n in runs] if pin else self._by_sharing(runs)
        kept: list[Run] = []
        done = 0            # bytes filled so far, runs in order
        i = 0
        while i < len(pieces):
            if not pieces[i][2]:
                done = self._pread_run(pieces[i][0], pieces[i][1], out, done, kept)
                i += 1
                continue
            j = i
            while j < len(pieces) and pieces[j][2] and j - i < IOV_MAX:
                j += 1
            chunk = pieces[i:j]
            want = sum(n for _, n, _ in chunk) * PAGE_SIZE
            try:
                got = process_vm_readv(self.pid, [(base + done, want)], [(a, n * PAGE_SIZE) for a, n, _ in chunk])
            except OSError as exc:
                if exc.errno not in (errno.EFAULT, errno.EPERM, errno.ENOMEM):
                    raise
                got = 0
            if got == want:
                for a, n, _ in chunk:
                    append_run(kept, a, n)
                done += want
            else:
                # Short (a mapping without PROT_READ, or one just unmapped): these runs one by
                # one through /proc/PID/mem.
                for a, n, _ in chunk:
                    done = self._pread_run(a, n, out, done, kept)
            i = j
        self.bytes_read += done
        if done != total:
            if isinstance(buf, bytearray):
                del out
                del buf[done:]
            else:
                buf = buf[:done]
        return PageBatch(tuple(kept), buf)

    def _by_sharing(self, runs: list[Run]) -> list[tuple[int, int, bool]]:
        """``runs`` cut into pieces (address, pages, the process's alone), in order, as
        pagemap says now; a run pagemap cannot tell of is read as shared."""
        if self._pagemap_fd < 0:
            self._pagemap_fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        pieces: list[tuple[int, int, bool]] = []
        for addr, n in runs:
            try:
                entries = os.pread(self._pagemap_fd, n * 8, addr // PAGE_SIZE * 8)
            except OSError:
                entries = b""
            if len(entries) != n * 8:
                pieces.append((addr, n, False))
                continue
            at = 0
            for first, count in ones(mapped_once(entries)):
                if first > at:
                    pieces.append((addr + at * PAGE_SIZE, first - at, False))
                pieces.append((addr + first * PAGE_SIZE, count, True))
                at = first + count
            if at < n:
                pieces.append((addr + at * PAGE_SIZE, n - at, False))
        return pieces

    def _pread_run(self, addr: int, n: int, out: memoryview, done: int, kept: list[Run]) -> int:
        """Read a run through /proc/PID/mem into ``out`` at ``done``; returns where the next
        goes. A run may span several mappings: a page that cannot be read (its mapping just
        went away) is skipped alone, and reading goes on after it."""
        page = 0
        while page < n:
            length = (n - page) * PAGE_SIZE
            got = self._pread_into(out[done: done + length], addr + page * PAGE_SIZE)
            whole = got // PAGE_SIZE
            if whole:
                append_run(kept, addr + page * PAGE_SIZE, whole)
                done += whole * PAGE_SIZE
            page += whole + 1
        return done

    def _pread_into(self, view: memoryview, addr: int) -> int:
        got = 0
        while got < len(view):
            try:
                k = os.preadv(self._mem_fd, [view[got:]], addr + got)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EFAULT, errno.ENOMEM):
                    break
                raise
            if k <= 0:
                break
            got += k
        return got


def zero_batches(runs: Iterable[Run], batch_pages: int) -> Iterator[PageBatch]:
    """Batches of zero pages for runs known to be empty now (nothing is read)."""
    for group in split_runs(runs, batch_pages):
        yield PageBatch(tuple(group), bytes(sum(n for _, n in group) * PAGE_SIZE))


def _without_zero_pages(batch: PageBatch) -> PageBatch:
    data = memoryview(batch.data)
    runs: list[Run] = []
    keep = bytearray()
    off = 0
    for addr, n in batch.runs:
        for i in range(n):
            page = data[off: off + PAGE_SIZE]
            off += PAGE_SIZE
            if page == ZERO_PAGE:
                continue
            append_run(runs, addr + i * PAGE_SIZE)
            keep += page
    return PageBatch(tuple(runs), keep)
