"""Holding a process: a pidfd while it runs; seize and PTRACE_INTERRUPT every thread to
freeze it; thaw or kill it.

While it runs the process is held by a pidfd only: a traced process stops for every signal
it receives until its tracer lets it go, so staying seized between freezes would stall a
process that takes signals. ``freeze`` seizes and interrupts every thread, repeating until no
thread exists that we have not stopped (one may be created between listing and
interrupting), then checks through the pidfd that the process it stopped is still the one
held (a pid is not reused while its process lives). A thread that was about to take a signal
when frozen shows a signal-delivery stop: that signal is kept and handed back on thaw, or
recorded as pending in an image.

All functions run on the tracer thread.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time
from dataclasses import dataclass, field

from agent import ptrace, seccomp
from agent.procfs import read_stat, thread_ids
from precopy.kernel import KCMP_VM, kcmp, pidfd_open, pidfd_send_signal
from transport.errors import NoSuchProcess, PermissionDenied, ProcessError, ProcessExited


ERESTART_RESTARTBLOCK = (1 << 64) - 516
STOP_TIMEOUT = 5.0       # seconds a thread may take to stop once interrupted
NR_RESTART_SYSCALL = 219


@dataclass
class Held:
    """A process whose threads we trace; ``stopped`` is filled while frozen."""

    pid: int
    pidfd: int
    seized: set[int] = field(default_factory=set)
    stopped: dict[int, ptrace.Stop] = field(default_factory=dict)
    inflight: dict[int, bytes] = field(default_factory=dict)   # tid -> siginfo caught at freeze
    # tid -> the system call a thread was in when we first froze it, if the kernel can only
    # restart it through restart_syscall (-ERESTART_RESTARTBLOCK): after a thaw the thread
    # sits in restart_syscall, whose original call lives only in the kernel.
    restart_nr: dict[int, int] = field(default_factory=dict)
    frozen_at: float = 0.0                                      # time.monotonic() of first interrupt
    # Stopped threads get PTRACE_O_SUSPEND_SECCOMP (``agent.seccomp``): our injected calls pass
    # their filters. False once the kernel said we may not (not root), and then not asked again.
    suspend_seccomp: bool = True

    @property
    def frozen(self) -> bool:
        return bool(self.stopped)


PF_EXITING = 0x4       # include/linux/sched.h: the task is in do_exit


def exiting(pid: int) -> bool:
    """Is ``pid`` gone, a zombie, or on its way out (PTRACE_SEIZE of it then fails with EPERM)?"""
    try:
        stat = read_stat(pid)
    except NoSuchProcess:
        return True
    return stat[3] in ("Z", "X") or bool(int(stat[9]) & PF_EXITING)


def _seize_error(pid: int, exc: OSError) -> Exception:
    if exc.errno == errno.ESRCH or (exc.errno == errno.EPERM and exiting(pid)):
        return NoSuchProcess(f"no process with pid {pid} (or it exited)", pid=pid)
    if exc.errno == errno.EPERM:
        return PermissionDenied(
            f"may not trace pid {pid}: run kcr-migrate as the process's owner or as root, and make sure "
            "no debugger (gdb, strace) is attached to it", pid=pid)
    return exc


def hold(pid: int) -> Held:
    """Hold ``pid`` by a pidfd, having checked that we may trace it (it is stopped for an instant)."""
    held = seize(pid)
    try:
        thaw(held)
    except BaseException:
        let_go(held)
        raise
    return held


def seize(pid: int) -> Held:
    """Hold ``pid`` and freeze it at once (a checkpoint)."""
    try:
        pidfd = pidfd_open(pid)
    except OSError as exc:
        raise _seize_error(pid, exc) from None
    held = Held(pid, pidfd)
    try:
        freeze(held)
    except BaseException:
        let_go(held)
        raise
    return held


def alive(held: Held) -> bool:
    """Is the held process still there (its pidfd is readable once it has exited)?"""
    poller = select.poll()
    poller.register(held.pidfd, select.POLLIN)
    return not poller.poll(0)


def _seize_new_threads(held: Held) -> list[int]:
    new: list[int] = []
    try:
        tids = thread_ids(held.pid)
    except NoSuchProcess:     # held by its pidfd: it was there, so it exited (callers let it leave)
        raise ProcessExited(f"process {held.pid} exited", pid=held.pid) from None
    for tid in tids:
        if tid in held.seized:
            continue
        try:
            ptrace.seize(tid)  # no EXITKILL: if we die, the process runs on
        except OSError as exc:
            if exc.errno == errno.ESRCH and tid != held.pid:
                continue          # the thread exited meanwhile
            if exc.errno == errno.ESRCH or (exc.errno == errno.EPERM and exiting(held.pid)):
                # Held by its pidfd: it was there, so it exited since it was last seen alive.
                raise ProcessExited(f"process {held.pid} exited", pid=held.pid) from None
            raise _seize_error(held.pid, exc) from None
        held.seized.add(tid)
        new.append(tid)
    return new


def freeze(held: Held) -> None:
    """Seize and stop every thread. Safe to call again: newly found threads are stopped too."""
    if not held.frozen_at:
        held.frozen_at = time.monotonic()
    if not held.seized:
        _seize_new_threads(held)
        if not alive(held):     # the pid we seized may already belong to another process
            thaw(held)
            raise ProcessExited(f"process {held.pid} exited", pid=held.pid)
    pending = [t for t in held.seized if t not in held.stopped]
    while True:
        for tid in pending:
            try:
                ptrace.interrupt(tid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        for tid in pending:
            _wait_frozen(held, tid)
        pending = _seize_new_threads(held)
        if not pending:
            break
    if held.pid not in held.stopped:
        raise ProcessExited(f"process {held.pid} exited while being frozen", pid=held.pid)


def _stop_of(tid: int) -> ptrace.Stop:
    """``tid``'s stop once interrupted. One that has not stopped yet and sleeps where the kernel
    lets nothing interrupt it (state D: a parent in vfork(), I/O) is waited for at most
    ``STOP_TIMEOUT`` (looked at now and then); any other stops at once, and is waited for as
    it comes (a blocking wait: no delay added to the freeze)."""
    try:
        return ptrace.wait_stop(tid, 0.0)
    except ptrace.NotStopping:
        pass
    try:
        asleep = read_stat(tid)[3] == "D"
    except NoSuchProcess:
        asleep = False                   # gone: the wait says so
    return ptrace.wait_stop(tid, STOP_TIMEOUT if asleep else None)


def _wait_frozen(held: Held, tid: int) -> None:
    try:
        stop = _stop_of(tid)
    except ptrace.NotStopping:
        why = _not_stopping(held.pid, tid)
        thaw(held)
        raise ProcessError(f"pid {held.pid}{'' if tid == held.pid else f' (thread {tid})'} did not stop within "
                           f"{STOP_TIMEOUT:g} s: {why}; nothing was moved, it runs on: try again", pid=held.pid) from None
    except ptrace.TraceeGone:
        held.seized.discard(tid)
        if tid == held.pid:
            raise ProcessExited(f"process {held.pid} exited while being frozen", pid=held.pid) from None
        return
    if stop.event == 0 and stop.sig != 0:
        # A signal-delivery stop: the signal is dequeued; keep its siginfo and stop for real.
        held.inflight[tid] = ptrace.get_siginfo(tid)
    held.stopped[tid] = stop
    if held.suspend_seccomp:
        # Stopped first: seized with the option, it would run unfiltered until the interrupt.
        held.suspend_seccomp = seccomp.suspend(tid)
    regs = ptrace.get_regs(tid)
    nr = regs.orig_rax if regs.orig_rax < (1 << 63) else -1
    if regs.rax != ERESTART_RESTARTBLOCK:
        held.restart_nr.pop(tid, None)      # no longer in the call we saw
    elif nr not in (-1, NR_RESTART_SYSCALL):
        held.restart_nr[tid] = nr


def _not_stopping(pid: int, tid: int) -> str:
    """Why ``tid`` of ``pid`` does not stop: a vfork() child not exec'd yet, or a wait the
    kernel lets nothing interrupt."""
    try:
        children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            if kcmp(pid, child, KCMP_VM, 0, 0) == 0:
                return (f"it waits in vfork() for its child {child}, which has not called exec or exit yet "
                        "(and shares its memory until then)")
        except OSError:
            continue
    try:
        wchan = open(f"/proc/{pid}/task/{tid}/wchan").read().strip() or "?"
        state = read_stat(tid)[3]
    except (OSError, NoSuchProcess):
        return "it is in a wait nothing may interrupt"
    return f"it is in a wait nothing may interrupt (state {state}, in the kernel's {wchan})"


def thaw(held: Held) -> None:
    """Let every thread run again, exactly as before (in-flight signals handed back), and stop
    tracing it; the pidfd still holds it."""
    for tid in list(held.seized):
        sig = 0
        if tid in held.inflight:
            sig = int.from_bytes(held.inflight[tid][:4], "little", signed=True)
        try:
            ptrace.detach(tid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
        held.seized.discard(tid)
    held.stopped.clear()
    held.inflight.clear()


def let_go(held: Held) -> None:
    """Thaw if frozen, and drop the pidfd: the process is no longer ours in any way."""
    try:
        if held.seized:
            thaw(held)
    finally:
        release(held)


def kill(held: Held) -> None:
    """SIGKILL the held process (through its pidfd: never a recycled pid) and reap our traces."""
    try:
        pidfd_send_signal(held.pidfd, signal.SIGKILL)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
    # Non-leader threads first: the leader's exit is reported only after theirs.
    for tid in sorted(held.seized, key=lambda t: t == held.pid):
        while True:
            try:
                _, status = os.waitpid(tid, ptrace.WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
    held.seized.clear()
    held.stopped.clear()
    release(held)


def release(held: Held) -> None:
    if held.pidfd >= 0:
        os.close(held.pidfd)
        held.pidfd = -1


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until /proc/PID is gone or a zombie (PID 1 reaps orphans lazily)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False
