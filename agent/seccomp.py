"""Seccomp: each thread's mode and filters, read while frozen, installed again last at restore.

A thread runs with seccomp off, in strict mode (``Seccomp: 1``: read, write, exit and
sigreturn only) or under a chain of classic BPF filters (``Seccomp: 2``), inherited across
clone and fork. The chain is read per thread with ``PTRACE_SECCOMP_GET_FILTER`` (the program
as it was given, oldest first) and each filter's ``SECCOMP_FILTER_FLAG_LOG`` with
``PTRACE_GET_SECCOMP_METADATA``; both need CAP_SYS_ADMIN (root) and a stopped thread. The
kernel shows no identity of a filter (kcmp has no seccomp type), so threads whose chains are
alike are taken to share one: the restore installs it once for all of them
(``SECCOMP_FILTER_FLAG_TSYNC``), or per thread where they differ.

Our own injected calls must not meet the process's filters: on the source every thread we
stop gets ``PTRACE_O_SUSPEND_SECCOMP`` while it is stopped (``agent.freeze``; a detach ends
it), so the dump's injected calls pass whatever the filters say; on the destination the
filters go in after every other injected call, and the one call that follows (the gadget's
munmap, in the leader) runs with the leader's filters suspended the same way.

Refused in one line, before anything is frozen (``check_running``) and again in the dump: a
filter whose action is SECCOMP_RET_USER_NOTIF (its listener is held by a supervisor that
stays behind) or computed at run time (``ret A``: it could be that); filters without
no_new_privs unless the process has CAP_SYS_ADMIN (the restored process could not install
them again), and any seccomp where kcr-migrate does not run as root.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Iterable, Mapping, Sequence

from agent import ptrace
from agent.procfs import read_status
from transport.errors import UnsupportedResource
from transport.schema import (
    BPF_INSN_SIZE,
    BPF_MAXINSNS,
    SECCOMP_FILTER_FLAG_LOG,
    SECCOMP_MODE_DISABLED,
    SECCOMP_MODE_FILTER,
    SECCOMP_MODE_STRICT,
    SeccompFilter,
    ThreadState,
)

PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
BPF_CLASS, BPF_RET, BPF_RVAL, BPF_A = 0x07, 0x06, 0x18, 0x10
CAP_SYS_ADMIN = 21
FIX = "see README, Limits"


def mode(tid: int) -> int:
    """The thread's seccomp mode, from /proc (/proc/TID names a thread too); 0 for a thread
    that has exited meanwhile."""
    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return SECCOMP_MODE_DISABLED
    try:
        text = os.read(fd, 1 << 16)       # one read: this runs per thread while frozen
    except ProcessLookupError:
        return SECCOMP_MODE_DISABLED
    finally:
        os.close(fd)
    at = text.find(b"\nSeccomp:")
    return int(text[at + 9: text.index(b"\n", at + 1)]) if at >= 0 else SECCOMP_MODE_DISABLED


def read_filters(tid: int) -> tuple[SeccompFilter, ...]:
    """The stopped thread's filters, oldest first."""
    out: list[SeccompFilter] = []
    buf = ctypes.create_string_buffer(BPF_MAXINSNS * BPF_INSN_SIZE)
    meta = ctypes.create_string_buffer(16)
    while True:
        index = len(out)
        try:
            n = ptrace._request(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return tuple(out)
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise UnsupportedResource(f"thread {tid} runs under seccomp filters, which only root can read: "
                                          "run kcr-migrate as root", pid=tid) from None
            if exc.errno in (errno.EINVAL, errno.EMEDIUMTYPE) and not out:
                raise UnsupportedResource(f"thread {tid} runs under seccomp filters, which this kernel does not "
                                          "show (it needs CONFIG_CHECKPOINT_RESTORE)", pid=tid) from None
            raise
        if not 0 < n <= BPF_MAXINSNS:
            raise UnsupportedResource(f"thread {tid}'s seccomp filter {index} has {n} instructions", pid=tid)
        struct.pack_into("<QQ", meta, 0, index, 0)
        ptrace._request(PTRACE_SECCOMP_GET_METADATA, tid, 16, ctypes.addressof(meta))
        flags = struct.unpack_from("<QQ", meta.raw)[1] & SECCOMP_FILTER_FLAG_LOG    # the one it reports
        out.append(SeccompFilter(flags=flags, program=buf.raw[: n * BPF_INSN_SIZE]))


def check_programs(pid: int, filters: Iterable[SeccompFilter]) -> None:
    """Refuse a filter that can hand a call to a user-space supervisor."""
    for f in filters:
        for off in range(0, len(f.program), BPF_INSN_SIZE):
            code, _, _, k = struct.unpack_from("<HBBI", f.program, off)
            if code & BPF_CLASS != BPF_RET:
                continue
            if code & BPF_RVAL == BPF_A:
                raise UnsupportedResource(
                    f"pid {pid} runs under a seccomp filter whose action is computed as it runs (it could hand "
                    f"calls to a supervisor, SECCOMP_RET_USER_NOTIF): kcr-migrate cannot move it ({FIX})", pid=pid)
            if k & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_USER_NOTIF:
                raise UnsupportedResource(
                    f"pid {pid} runs under a seccomp filter that hands calls to a supervisor "
                    f"(SECCOMP_RET_USER_NOTIF), which does not move with it: kcr-migrate cannot move it ({FIX})",
                    pid=pid)


def check_rights(pid: int, modes: Sequence[int], status: Mapping[str, str] | None = None) -> None:
    """What must hold, before anything is frozen, for seccomp state to be carried. ``status``:
    the process's /proc status, if the caller read it already."""
    if not any(modes):
        return
    if os.geteuid() != 0:
        raise UnsupportedResource(f"pid {pid} runs under seccomp, whose filters only root can read and carry: "
                                  "run kcr-migrate as root", pid=pid)
    status = status if status is not None else read_status(pid)
    if SECCOMP_MODE_FILTER in modes and status.get("NoNewPrivs") != "1" and \
            not int(status.get("CapEff", "0"), 16) >> CAP_SYS_ADMIN & 1:
        raise UnsupportedResource(
            f"pid {pid} runs under seccomp filters installed while it had a capability it has dropped since "
            f"(CAP_SYS_ADMIN, without no_new_privs): restored, it could not install them again ({FIX})", pid=pid)


def check_running(pid: int, tids: Sequence[int]) -> None:
    """Preflight, the process running: rights from /proc, and the filters read from the
    threads stopped for an instant (as ``agent.freeze.hold`` does)."""
    modes = [mode(t) for t in tids]
    check_rights(pid, modes)
    if SECCOMP_MODE_FILTER not in modes:
        return
    from agent import freeze        # freeze imports this module
    held = freeze.seize(pid)
    try:
        for tid in held.stopped:
            if mode(tid) == SECCOMP_MODE_FILTER:
                check_programs(pid, read_filters(tid))
    finally:
        freeze.let_go(held)


def collect(pid: int, tid: int) -> tuple[int, tuple[SeccompFilter, ...]]:
    """The stopped thread's mode and filters, for its ThreadState."""
    m = mode(tid)
    if m == SECCOMP_MODE_DISABLED:
        return m, ()
    check_rights(pid, [m])
    if m == SECCOMP_MODE_STRICT:
        return m, ()
    filters = read_filters(tid)
    check_programs(pid, filters)
    return m, filters


def suspend(tid: int, options: int = 0) -> bool:
    """Let our injected calls pass the stopped thread's filters (until it is let go or its
    options are set again). False where this tracer may not (not root): the thread then has
    no seccomp we could carry anyway (``check_rights``)."""
    try:
        ptrace.set_options(tid, options | PTRACE_O_SUSPEND_SECCOMP)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL):
            return False
        raise
    return True


def shared_chain(threads: Sequence[ThreadState]) -> bool:
    """Do all the threads run under one chain of filters (install it once, with TSYNC)?"""
    first = threads[0]
    return first.seccomp == SECCOMP_MODE_FILTER and all(
        t.seccomp == first.seccomp and t.seccomp_filters == first.seccomp_filters for t in threads)


def fprog(program_addr: int, program: bytes) -> bytes:
    """struct sock_fprog: unsigned short len, padding, struct sock_filter *filter."""
    return struct.pack("<HxxxxxxQ", len(program) // BPF_INSN_SIZE, program_addr)
