"""The holder zygote: a process forked from the agent as it starts, that forks holders.

A holder (``agent.holder``) started as a new interpreter spent 120-200 ms on start-up, imports
and preparing the codecs in every migration's preflight before it could seize the job. The
zygote is forked from the agent once, as the agent starts: after its imports, before it runs
anything else (one thread, no event loop, no connection). It prepares the codecs and waits.
Asked for a holder, it forks one, which serves the socket the agent passed; the agent gets the
holder's pid and a pidfd of it (to wait for it, or kill it). The zygote ends when the agent does
(its socket closes), and reaps its holders as they end. Its stdin and stdout, the agent's
channel, are /dev/null in it: a holder that lives on as a stand-in's keeper does not hold the
agent's session open.

Where no zygote runs (an agent's methods served in another program, or an agent that had
threads already as it started), ``fork_holder`` says so and the holder starts as a new
interpreter, as before.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import threading
import traceback

from precopy.kernel import pidfd_send_signal

PID = struct.Struct("<q")
REAP_EVERY = 1.0          # seconds between the zygote's looks for holders that ended
ASK_TIMEOUT = 10.0        # seconds the agent waits for a holder forked (a fork takes milliseconds)

_zygote: socket.socket | None = None
_zygote_pid = 0
_lock = threading.Lock()     # one request at a time (agents open sources from worker threads)


def start() -> None:
    """Fork the zygote (once, as the agent starts: this process must have one thread)."""
    global _zygote, _zygote_pid
    if _zygote is not None or threading.active_count() != 1:
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            ours.close()
            _serve(theirs)
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    theirs.close()
    ours.settimeout(ASK_TIMEOUT)
    _zygote, _zygote_pid = ours, pid


def _name(comm: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(comm)
    except OSError:
        pass


MADV_POPULATE_WRITE = 23      # Linux 5.14


def _own_memory() -> None:
    """Copy now every page shared with the zygote that a write would copy later: the
    interpreter writes the objects it uses (their reference counts), and each first write to
    a page inherited from the zygote is a fault and a copy. Left for later, those came while
    the job was frozen, when the holder first ran the code that reads its state."""
    import ctypes
    from precopy.layout import read_maps
    from transport.schema import PROT_WRITE
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for m in read_maps(os.getpid()):
        # Private writable memory: not the stack (it grows as it is used), nor vvar and the like.
        if m.prot & PROT_WRITE and not m.shared and (not m.name.startswith("[") or m.name == "[heap]"):
            madvise(m.start, m.end - m.start, MADV_POPULATE_WRITE)     # (a kernel without it: left as it is)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _serve(sock: socket.socket) -> None:
    from transport.schema import prepare_codecs
    _name("kcr-holder-fork")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    # As a holder: only the agent's death (its socket closing) ends it (``agent.holder.run``).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    prepare_codecs()
    while True:
        ready, _, _ = select.select([sock], [], [], REAP_EVERY)
        _reap()
        if not ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
        except OSError:
            return
        if not msg:
            return                     # the agent is gone
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            sock.send(PID.pack(-1))
            continue
        child = os.fork()
        if child == 0:
            status = 0
            try:
                sock.close()
                _name("kcr-holder")
                _own_memory()
                from agent.holder import run
                run(fds[0], codecs_ready=True)
            except BaseException:
                traceback.print_exc()
                status = 1
            finally:
                os._exit(status)
        os.close(fds[0])
        # Not reaped before the pidfd is open (this process alone reaps it): it names that child.
        pidfd = os.pidfd_open(child)
        try:
            socket.send_fds(sock, [PID.pack(child)], [pidfd])
        finally:
            os.close(pidfd)


class ForkedHolder:
    """A holder the zygote forked: waited for and killed through its pidfd, as a
    ``subprocess.Popen`` is (the zygote, its parent, reaps it)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd

    def wait(self, timeout: float | None = None) -> None:
        if self.pidfd < 0:
            return
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(None if timeout is None else int(timeout * 1000)):
            raise subprocess.TimeoutExpired(f"kcr-holder (pid {self.pid})", timeout or 0)
        os.close(self.pidfd)
        self.pidfd = -1

    def kill(self) -> None:
        if self.pidfd >= 0:
            try:
                pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass


def fork_holder(fd: int) -> ForkedHolder | None:
    """A holder forked by the zygote, serving ``fd`` (a socket; the caller closes its copy);
    None where no zygote runs, or it could not (the caller starts one itself)."""
    global _zygote
    with _lock:
        if _zygote is None:
            return None
        try:
            socket.send_fds(_zygote, [b"h"], [fd])
            msg, fds, _, _ = socket.recv_fds(_zygote, PID.size, 1)
        except OSError:          # gone, or not answering within ASK_TIMEOUT: not asked again
            _zygote.close()
            _zygote = None
            try:
                os.kill(_zygote_pid, signal.SIGKILL)
                os.waitpid(_zygote_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            return None
    if len(msg) != PID.size or len(fds) != 1:
        for got in fds:
            os.close(got)
        return None
    return ForkedHolder(PID.unpack(msg)[0], fds[0])
