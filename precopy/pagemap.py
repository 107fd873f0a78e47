"""Which pages of a process exist: the PAGEMAP_SCAN ioctl, and /proc/PID/pagemap where it is missing.

PAGEMAP_SCAN (Linux >= 6.7) walks a range once and returns runs of pages sharing
categories (present, swapped, file-backed, zero-page, written since write-protect, ...). It
can also write-protect what it reports (``PM_SCAN_WP_MATCHING``), which is how the uffd-wp
tracker reads and re-arms dirty tracking in one call.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import struct
from typing import Iterator, NamedTuple

from precopy.kernel import ioctl
from transport.schema import PAGE_SIZE

PAGEMAP_SCAN = 0xC0606610

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8           # a guard page (MADV_GUARD_INSTALL); Linux 6.14, EINVAL before

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

# /proc/PID/pagemap entry bits.
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class page_region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class Region(NamedTuple):
    """A run of pages sharing ``categories``. A named tuple: a scan of a large dirty set makes
    thousands of them, and a frozen dataclass costs several times as much to make (the final
    round's scan is frozen time)."""

    start: int
    end: int
    categories: int


class PagemapScanner:
    """PAGEMAP_SCAN over one process's /proc/PID/pagemap."""

    VEC_LEN = 4096

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = (page_region * self.VEC_LEN)()
        self._words = memoryview(self._vec).cast("B").cast("Q")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PagemapScanner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan(self, start: int, end: int, *, required: int = 0, inverted: int = 0, anyof: int = 0,
             returned: int = 0, flags: int = 0, max_pages: int = 0) -> list[Region]:
        """Regions of [start, end) whose pages match; walks the whole range, in slices if needed."""
        out: list[Region] = []
        pos = start
        pages_left = max_pages
        while pos < end:
            arg = pm_scan_arg(
                size=ctypes.sizeof(pm_scan_arg), flags=flags, start=pos, end=end, walk_end=0,
                vec=ctypes.addressof(self._vec), vec_len=self.VEC_LEN, max_pages=pages_left,
                category_inverted=inverted, category_mask=required, category_anyof_mask=anyof,
                return_mask=returned)
            n = ioctl(self.fd, PAGEMAP_SCAN, arg)
            # The answer read in one go (three u64 a region), not field by field through ctypes.
            words = iter(self._words[:3 * n].tolist())
            got = 0
            for s, e, c in zip(words, words, words):
                got += e - s
                if out and out[-1].end == s and out[-1].categories == c:
                    out[-1] = Region(out[-1].start, e, c)
                else:
                    out.append(Region(s, e, c))
            if max_pages:
                pages_left -= got // PAGE_SIZE
                if pages_left <= 0:
                    break
            if arg.walk_end <= pos:
                break
            pos = arg.walk_end
        return out


# Set to "off" to take the paths of kernels without PAGEMAP_SCAN (before 6.7) on one that has
# it: the tests use it to run those paths everywhere.
NO_SCAN_ENV = "KCR_PAGEMAP_SCAN"


@functools.cache
def pagemap_scan_works() -> bool:
    """Probe: does this kernel answer PAGEMAP_SCAN on our own pagemap? The one answer every
    user of PAGEMAP_SCAN goes by (asked once per process)."""
    if os.environ.get(NO_SCAN_ENV) == "off":
        return False
    try:
        with PagemapScanner(os.getpid()) as s:
            buf = ctypes.create_string_buffer(PAGE_SIZE * 2)
            addr = (ctypes.addressof(buf) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            s.scan(addr, addr + PAGE_SIZE, anyof=PAGE_IS_PRESENT, returned=PAGE_IS_PRESENT)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise


def read_pagemap(fd: int, start: int, end: int) -> list[int]:
    """Legacy interface: one 64-bit entry per page of [start, end)."""
    n = (end - start) // PAGE_SIZE
    data = os.pread(fd, n * 8, (start // PAGE_SIZE) * 8)
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


# Byte 7 of an entry (little-endian) holds bits 56-63: PM_PRESENT is its top bit,
# PM_MMAP_EXCLUSIVE its lowest.
_ONCE = (PM_PRESENT | PM_MMAP_EXCLUSIVE) >> 56
_MAPPED_ONCE = bytes(1 if b & _ONCE == _ONCE else 0 for b in range(256))
_ONES = re.compile(rb"\x01+")


def mapped_once(entries: bytes) -> bytes:
    """One byte for each pagemap entry of ``entries``: 1 where its page is present and mapped
    once (PM_MMAP_EXCLUSIVE: the process's alone, at this address only), else 0."""
    return entries[7::8].translate(_MAPPED_ONCE)


def ones(mask: bytes) -> Iterator[tuple[int, int]]:
    """(index, length) of each run of 1 bytes of ``mask``, in order."""
    for m in _ONES.finditer(mask):
        yield m.start(), m.end() - m.start()
