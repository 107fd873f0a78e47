"""userfaultfd write-protection, as the uffd-wp dirty tracker uses it (and missing-page
filling, as the destination uses it: ``agent.fill``).

The userfaultfd is created *inside the target* (its context belongs to the mm of the process
that calls ``userfaultfd()``), then taken over with ``pidfd_getfd`` and closed there, so the
target never holds it. From then on every ioctl runs here: ``UFFDIO_API`` enables
``UFFD_FEATURE_WP_ASYNC`` (the kernel resolves write faults itself and only clears the
page's write-protect bit: the target never blocks) and ``UFFD_FEATURE_WP_UNPOPULATED``
(holes are protected too, with pte markers), ``UFFDIO_REGISTER`` marks mappings, and
PAGEMAP_SCAN (``precopy.pagemap``) reads and re-protects written pages. Such a scan skips the
mappings that are not registered (new or moved ones) and leaves them untouched; the
``PAGE_IS_WPALLOWED`` category finds them. (``PM_SCAN_CHECK_WPASYNC`` would rather fail with
EPERM at the first one, but only after re-protecting the pages before it and discarding what
it found there: the tracker does not use it, as that loses writes.)

Closing our descriptor unregisters every mapping and clears every protection: a target is
left as it was when tracking ends or when this process dies.
"""
from __future__ import annotations

import ctypes
import errno
import os
from ctypes import c_int64, c_uint64

from precopy.control import RemoteSyscalls
from precopy.kernel import SYS_pidfd_getfd, ioctl, syscall
from precopy.pagemap import (
    PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN,
    PM_SCAN_WP_MATCHING,
    PagemapScanner,
)
from transport.schema import PAGE_SIZE

SYS_userfaultfd = 323
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
WANTED_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

# _IOWR(0xAA, nr, struct) and _IOR(0xAA, 1, struct uffdio_range).
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_COPY = 0xC028AA03

# How the target opens it: close-on-exec, never blocks, and allowed without privilege when
# vm.unprivileged_userfaultfd is 0 (only faults from user mode would be reported; with
# WP_ASYNC none are reported at all).
REMOTE_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_uint64), ("features", c_uint64), ("ioctls", c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_uint64), ("len", c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("ioctls", c_uint64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", c_uint64), ("src", c_uint64), ("len", c_uint64), ("mode", c_uint64), ("copy", c_int64)]


class Userfaultfd:
    """Our descriptor for a userfaultfd context (ours or another process's mm)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.features = 0

    def api(self, features: int = WANTED_FEATURES) -> int:
        """Handshake; returns the features the kernel granted (raises if any wanted one is missing)."""
        arg = uffdio_api(UFFD_API, features, 0)
        ioctl(self.fd, UFFDIO_API, arg)
        missing = features & ~arg.features
        if missing:
            raise OSError(errno.EOPNOTSUPP, f"userfaultfd lacks features {missing:#x}")
        self.features = arg.features
        return arg.features

    def register_wp(self, start: int, end: int) -> None:
        ioctl(self.fd, UFFDIO_REGISTER, uffdio_register(uffdio_range(start, end - start), UFFDIO_REGISTER_MODE_WP, 0))

    def register_missing(self, start: int, end: int) -> None:
        ioctl(self.fd, UFFDIO_REGISTER,
              uffdio_register(uffdio_range(start, end - start), UFFDIO_REGISTER_MODE_MISSING, 0))

    def copy(self, dst: int, src: int, length: int) -> int:
        """Fill the missing pages from ``dst`` with ``length`` bytes at our ``src``; the bytes
        filled, up to the first page already there (0: ``dst`` itself is there)."""
        arg = uffdio_copy(dst, src, length, 0, 0)
        try:
            ioctl(self.fd, UFFDIO_COPY, arg)
        except OSError as exc:
            if arg.copy > 0:
                return int(arg.copy)
            if exc.errno == errno.EEXIST:
                return 0
            raise
        return length

    def unregister(self, start: int, end: int) -> None:
        ioctl(self.fd, UFFDIO_UNREGISTER, uffdio_range(start, end - start))

    def writeprotect(self, start: int, end: int, protect: bool = True) -> None:
        mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        ioctl(self.fd, UFFDIO_WRITEPROTECT, uffdio_writeprotect(uffdio_range(start, end - start), mode))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_in_target(remote: RemoteSyscalls, pidfd: int) -> Userfaultfd:
    """Create a userfaultfd inside the (stopped) target and take it over; the target keeps no fd."""
    their_fd = remote.call("userfaultfd", REMOTE_FLAGS)
    try:
        ours = syscall(SYS_pidfd_getfd, pidfd, their_fd, 0)
    finally:
        remote.call("close", their_fd)
    return Userfaultfd(ours)


def open_local() -> Userfaultfd:
    return Userfaultfd(syscall(SYS_userfaultfd, REMOTE_FLAGS))


def probe() -> tuple[bool, str]:
    """A real end-to-end check on a scratch mapping of our own: (works, why)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mmap, munmap = libc.mmap, libc.munmap
    mmap.restype = ctypes.c_void_p
    mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    try:
        uffd = open_local()
    except OSError as exc:
        return False, f"userfaultfd() failed: {os.strerror(exc.errno or 0)}"
    size = 4 * PAGE_SIZE
    base = mmap(None, size, 3, 0x22, -1, 0)     # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    if base in (None, ctypes.c_void_p(-1).value):
        uffd.close()
        return False, "could not map a scratch page for the probe"
    try:
        with uffd, PagemapScanner(os.getpid()) as scanner:
            try:
                uffd.api()
            except OSError as exc:
                return False, f"userfaultfd lacks WP_ASYNC/WP_UNPOPULATED (Linux >= 6.7 needed): {exc.strerror}"
            ctypes.memset(base, 1, PAGE_SIZE)          # page 0 populated, pages 1-3 holes
            flags = PM_SCAN_WP_MATCHING

            def unregistered() -> list[tuple[int, int]]:
                return [(r.start, r.end) for r in scanner.scan(
                    base, base + size, required=PAGE_IS_WPALLOWED, inverted=PAGE_IS_WPALLOWED,
                    returned=PAGE_IS_WPALLOWED)]

            # The tracker relies on a write-protecting scan skipping unregistered mappings without
            # touching them (fixed during Linux 6.7's release candidates: before, it protected them
            # too) and on the WPALLOWED category to find them.
            if scanner.scan(base, base + size, required=PAGE_IS_WRITTEN, returned=PAGE_IS_WRITTEN, flags=flags):
                return False, "PAGEMAP_SCAN reported pages of an unregistered mapping"
            if not any(r.start == base for r in scanner.scan(base, base + size, required=PAGE_IS_WRITTEN,
                                                             returned=PAGE_IS_WRITTEN)):
                return False, "PAGEMAP_SCAN write-protected a mapping that is not registered"
            if unregistered() != [(base, base + size)]:
                return False, "PAGEMAP_SCAN does not tell unregistered mappings apart (PAGE_IS_WPALLOWED)"
            try:
                uffd.register_wp(base, base + size)
            except OSError as exc:
                return False, f"UFFDIO_REGISTER in write-protect mode failed: {exc.strerror}"
            if unregistered():
                return False, "PAGEMAP_SCAN does not see the registration (PAGE_IS_WPALLOWED)"
            armed = scanner.scan(base, base + size, required=PAGE_IS_WRITTEN, returned=PAGE_IS_WRITTEN, flags=flags)
            if not any(r.start == base for r in armed):
                return False, "PAGEMAP_SCAN did not report a page written before write-protection"
            ctypes.memset(base + 2 * PAGE_SIZE, 2, 1)   # a write into a protected hole
            seen = scanner.scan(base, base + size, required=PAGE_IS_WRITTEN, returned=PAGE_IS_WRITTEN, flags=flags)
            if [(r.start, r.end) for r in seen] != [(base + 2 * PAGE_SIZE, base + 3 * PAGE_SIZE)]:
                return False, "PAGEMAP_SCAN with PAGE_IS_WRITTEN reported the wrong pages after one write"
    except OSError as exc:
        return False, f"PAGEMAP_SCAN is missing (Linux >= 6.7 needed): {exc.strerror}"
    finally:
        munmap(base, size)
    return True, "userfaultfd async write-protection and PAGEMAP_SCAN work on this kernel"
