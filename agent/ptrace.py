"""ptrace requests: python-ptrace's raw call and register struct, plus what it lacks.

python-ptrace gives ``ptrace()``, ``user_regs_struct``, GETREGS/SETREGS, SINGLESTEP, CONT
and DETACH. This module adds SEIZE/INTERRUPT, the XSAVE regset, signal masks, PEEKSIGINFO,
the rseq configuration, and a waitpid that understands ptrace event stops. All calls must
come from the thread that seized the tracee (see ``agent.tracer``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import time
import types


def _hand_over_libc() -> None:
    """python-ptrace looks the C library up with ``ctypes.util.find_library("c")``, which runs
    ``ldconfig -p`` in a child process as it is imported: some 10 ms of every agent's and
    command's start. The C library is the one this process runs on already: python-ptrace is
    given that (``ptrace.ctypes_libc``, which it reads ``libc`` from, made here first)."""
    if "ptrace.ctypes_libc" not in sys.modules:
        ours = types.ModuleType("ptrace.ctypes_libc")
        vars(ours).update(LIBC_FILENAME=None, libc=ctypes.CDLL(None, use_errno=True))   # None: this process's own
        sys.modules["ptrace.ctypes_libc"] = ours


_hand_over_libc()

from ptrace import PtraceError  # noqa: E402  (after _hand_over_libc)
from ptrace.binding import func as _pt  # noqa: E402
from ptrace.binding.linux_struct import user_regs_struct  # noqa: E402

from transport.frozen import frozen  # noqa: E402
from transport.schema import GP_REG_NAMES, SIGINFO_SIZE, GpRegs  # noqa: E402

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NT_X86_XSTATE = 0x202
XSTATE_BUF = 1 << 14      # larger than any XSAVE area without AMX tiles
WALL = 0x40000000

# sw_reserved bytes of the FXSAVE area: struct _fpx_sw_bytes.
FX_SW_OFFSET = 464
FP_XSTATE_MAGIC1 = 0x46505853


class TraceeGone(Exception):
    """The traced thread exited or was killed while we held it."""

    def __init__(self, tid: int, status: str) -> None:
        super().__init__(f"thread {tid} {status}")
        self.tid = tid
        self.status = status


def _request(cmd: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return _pt.ptrace(cmd, tid, addr, data)
    except PtraceError as exc:
        err = exc.errno or errno.EIO
        raise OSError(err, f"ptrace({cmd:#x}, {tid}): {os.strerror(err)}") from None


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class peeksiginfo_args(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


class rseq_configuration(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def seize(tid: int, options: int = 0) -> None:
    _request(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _request(PTRACE_INTERRUPT, tid)


def set_options(tid: int, options: int) -> None:
    _request(PTRACE_SETOPTIONS, tid, 0, options)


def detach(tid: int, sig: int = 0) -> None:
    _request(PTRACE_DETACH, tid, 0, sig)


def cont(tid: int, sig: int = 0) -> None:
    _request(PTRACE_CONT, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    _request(PTRACE_SINGLESTEP, tid, 0, sig)


def listen(tid: int) -> None:
    _request(PTRACE_LISTEN, tid)


def event_msg(tid: int) -> int:
    val = ctypes.c_ulong(0)
    _request(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(val))
    return val.value


def get_regs(tid: int) -> GpRegs:
    regs = user_regs_struct()
    _request(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return GpRegs(**{name: getattr(regs, name) for name in GP_REG_NAMES})


def set_regs(tid: int, regs: GpRegs) -> None:
    raw = user_regs_struct()
    for name in GP_REG_NAMES:
        setattr(raw, name, getattr(regs, name) & 0xFFFF_FFFF_FFFF_FFFF)
    _request(PTRACE_SETREGS, tid, 0, ctypes.addressof(raw))


def get_xstate(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(XSTATE_BUF)
    iov = iovec(ctypes.addressof(buf), XSTATE_BUF)
    _request(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def set_xstate(tid: int, xstate: bytes) -> None:
    buf = ctypes.create_string_buffer(xstate, len(xstate))
    iov = iovec(ctypes.addressof(buf), len(xstate))
    _request(PTRACE_SETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))


def xstate_features(xstate: bytes) -> int:
    """The XSTATE_BV bitmap: components actually present in this saved state."""
    if len(xstate) < 520:
        return 0x3
    return int.from_bytes(xstate[512:520], "little")


def get_sigmask(tid: int) -> int:
    mask = ctypes.c_uint64(0)
    _request(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    val = ctypes.c_uint64(mask & 0xFFFF_FFFF_FFFF_FFFF)
    _request(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(val))


def peek_siginfo(tid: int, shared: bool) -> list[bytes]:
    """Queued signals (without dequeuing them): thread-private or process-wide."""
    out: list[bytes] = []
    chunk = 32
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * chunk)
    while True:
        args = peeksiginfo_args(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, chunk)
        n = _request(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
        for i in range(n):
            out.append(buf.raw[i * SIGINFO_SIZE: (i + 1) * SIGINFO_SIZE])
        if n < chunk:
            return out


def get_siginfo(tid: int) -> bytes:
    """The siginfo of the signal a thread is stopped for (signal-delivery stop)."""
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    _request(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


def get_rseq(tid: int) -> tuple[int, int, int]:
    """(address, size, signature) of the thread's rseq area; (0, 0, 0) if none."""
    conf = rseq_configuration()
    try:
        _request(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), ctypes.addressof(conf))
    except OSError as exc:
        if exc.errno == errno.EIO:   # kernel without rseq
            return 0, 0, 0
        raise
    return conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature


@frozen
class Stop:
    """What waitpid reported for a traced thread."""

    tid: int
    sig: int          # stop signal (SIGTRAP for events)
    event: int        # PTRACE_EVENT_* or 0


class NotStopping(Exception):
    """The traced thread did not stop within the time given (an uninterruptible wait)."""

    def __init__(self, tid: int, waited: float) -> None:
        super().__init__(f"thread {tid} did not stop within {waited:g} s")
        self.tid = tid


def wait_stop(tid: int, timeout: float | None = None) -> Stop:
    """Wait for ``tid``'s next ptrace stop; raise TraceeGone if it exits instead, NotStopping
    if ``timeout`` seconds pass first (looked at with WNOHANG, at first every 20 us: a stop
    asked for comes within microseconds, and the freeze is inside the downtime)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    nap = 20e-6
    while True:
        try:
            got, status = os.waitpid(tid, WALL | (os.WNOHANG if deadline is not None else 0))
        except ChildProcessError:
            raise TraceeGone(tid, "is no longer traced") from None
        except InterruptedError:
            continue
        if deadline is not None and got == 0:
            if time.monotonic() >= deadline:
                raise NotStopping(tid, timeout or 0.0)
            time.sleep(nap)
            nap = min(nap * 2, 0.005)
            continue
        if os.WIFSTOPPED(status):
            return Stop(tid, os.WSTOPSIG(status), (status >> 16) & 0xFF)
        if os.WIFEXITED(status):
            raise TraceeGone(tid, f"exited with status {os.WEXITSTATUS(status)}")
        if os.WIFSIGNALED(status):
            raise TraceeGone(tid, f"was killed by {signal.Signals(os.WTERMSIG(status)).name}")


def is_group_stop(stop: Stop) -> bool:
    return stop.event == PTRACE_EVENT_STOP and stop.sig in (signal.SIGSTOP, signal.SIGTSTP,
                                                           signal.SIGTTIN, signal.SIGTTOU)
