"""Linux system calls the standard library lacks, through ctypes.

process_vm_readv/writev, pidfd_open/getfd/send_signal, get_robust_list, prlimit, kcmp, tee,
arch_prctl(ARCH_GET_XCOMP_SUPP) and ioctl with a struct argument, and the boot id. Every wrapper raises
OSError with the real errno, so callers handle failures as they would for ``os`` calls.
"""
from __future__ import annotations

import ctypes
import os
from ctypes import c_int, c_long, c_size_t, c_ulong, c_void_p

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = c_long

# x86_64 system call numbers.
SYS_process_vm_readv = 310
SYS_process_vm_writev = 311
SYS_pidfd_send_signal = 424
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
SYS_get_robust_list = 274
SYS_prlimit64 = 302
SYS_arch_prctl = 158
SYS_gettid = 186
SYS_tgkill = 234
SYS_kcmp = 312
SYS_tee = 276

# kcmp(2)'s kinds: an fd's file, the memory, fd table and fs struct (cwd, root, umask) of a task
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS = 0, 1, 2, 3
KCMP_EPOLL_TFD = 7
SPLICE_F_NONBLOCK = 2

ARCH_GET_XCOMP_SUPP = 0x1021
IOV_MAX = 1024


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class rlimit64(ctypes.Structure):
    _fields_ = [("rlim_cur", ctypes.c_uint64), ("rlim_max", ctypes.c_uint64)]


def boot_id() -> str:
    """This boot of this kernel: two agents (or an image and a host) that read the same one
    share a machine. "" where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""

def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def syscall(nr: int, *args: object) -> int:
    """Raw syscall: ints go by value, ctypes objects by reference, None as NULL."""
    conv: list[object] = []
    for a in args:
        if isinstance(a, int):
            conv.append(c_long(a) if a < (1 << 63) else c_ulong(a))
        elif a is None:
            conv.append(None)
        else:  # a ctypes object: pass its address
            conv.append(ctypes.byref(a))  # type: ignore[arg-type]
    return _check(_syscall(c_long(nr), *conv))


def _iovecs(parts: list[tuple[int, int]]) -> ctypes.Array:
    arr = (iovec * len(parts))()
    for i, (addr, length) in enumerate(parts):
        arr[i].iov_base = addr
        arr[i].iov_len = length
    return arr


def process_vm_readv(pid: int, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> int:
    """Read remote ranges into local ranges; returns bytes read (may be short)."""
    return syscall(SYS_process_vm_readv, pid, _iovecs(local), len(local), _iovecs(remote), len(remote), 0)


def process_vm_writev(pid: int, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> int:
    return syscall(SYS_process_vm_writev, pid, _iovecs(local), len(local), _iovecs(remote), len(remote), 0)


def pidfd_open(pid: int) -> int:
    return syscall(SYS_pidfd_open, pid, 0)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return syscall(SYS_pidfd_getfd, pidfd, targetfd, 0)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    syscall(SYS_pidfd_send_signal, pidfd, sig, None, 0)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    syscall(SYS_tgkill, tgid, tid, sig)


def kcmp(pid1: int, pid2: int, kind: int, idx1: int, idx2: int) -> int:
    """0 where the two are the same kernel object; 1 or 2 orders them otherwise."""
    return syscall(SYS_kcmp, pid1, pid2, kind, idx1, idx2)


class kcmp_epoll_slot(ctypes.Structure):
    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


def epoll_watches_fd(pid: int, epfd: int, tfd: int) -> bool:
    """Is the file epoll ``epfd`` watches as ``tfd`` the one at fd ``tfd`` now (not one closed
    since, or replaced)?"""
    try:
        return syscall(SYS_kcmp, pid, pid, KCMP_EPOLL_TFD, tfd, kcmp_epoll_slot(epfd, tfd, 0)) == 0
    except OSError:
        return False


def tee(fd_in: int, fd_out: int, length: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """Copy up to ``length`` bytes from one pipe into another without consuming them."""
    return syscall(SYS_tee, fd_in, fd_out, length, flags)


def get_robust_list(tid: int) -> tuple[int, int]:
    head = c_ulong(0)
    size = c_size_t(0)
    syscall(SYS_get_robust_list, tid, head, size)
    return head.value, size.value


def prlimit(pid: int, resource: int, new: tuple[int, int] | None = None) -> tuple[int, int]:
    old = rlimit64()
    if new is None:
        syscall(SYS_prlimit64, pid, resource, None, old)
    else:
        lim = rlimit64(new[0], new[1])
        syscall(SYS_prlimit64, pid, resource, lim, old)
    return old.rlim_cur, old.rlim_max


def xsave_supported_mask() -> int:
    """The XSAVE features this kernel and CPU offer user space (XCR0 as the kernel uses it)."""
    mask = ctypes.c_uint64(0)
    try:
        syscall(SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, mask)
    except OSError:
        return 0x3  # x87 + SSE: every x86_64 has them
    return mask.value


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array | int) -> int:
    f = _libc.ioctl
    f.restype = c_int
    if isinstance(arg, int):
        return _check(f(c_int(fd), c_ulong(request), c_ulong(arg)))
    return _check(f(c_int(fd), c_ulong(request), ctypes.byref(arg)))


def gettid() -> int:
    return syscall(SYS_gettid)

