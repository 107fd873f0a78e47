"""The home stand-in: after a move, the source process stays as a shell of itself.

When the moved process's parent stays on the source (a batch shell, ``slurmstepd``, a
launcher), killing the source process would tell that parent its child died of SIGKILL. With
``--stand-in``, past the point of no return the holder (``agent.holder``, the process that
traces the source) does not kill the frozen root: it makes it a **stand-in** and becomes its
**keeper**. The stand-in keeps what its parent and the system know it by (its pid, parent,
session, process group, credentials, cgroup, command name) and nothing of the job: by
injected system calls, its other threads exit, its fds are closed, its timers are disarmed,
its pending signals are discarded (those that arrived after its state was read go to the
destination first: ``agent.signals``) and every disposition is reset, rseq and the robust futex
list are unregistered, it moves to ``/``, becomes non-dumpable, and every mapping but the vDSO
(in a process without one: the code mapping of the ``syscall`` instruction it borrows, as
``agent.inject`` finds it) is unmapped. It then sleeps in ``pause()`` (run from that
``syscall`` instruction) and never runs a line of its own code again: it stays traced
(with ``PTRACE_O_EXITKILL``: a keeper that dies takes the stand-in with it, so no stand-in
outlives its keeper), so every signal sent to it stops it first, and the keeper:

- sends it to the deputy on the destination (``agent.deputy``, over ``agent.homelink``),
  which sends it to the moved process; SIGCHLD (from the job's killed children) is not sent;
- lets the stand-in stop for SIGSTOP (and for SIGTSTP, SIGTTIN, SIGTTOU where the job left
  their default action), so that its parent sees it stopped; SIGCONT continues it, and is
  sent on too;
- sees the stand-in die of what it cannot intercept (SIGKILL) and tells the deputy, which
  kills the moved process with SIGKILL;
- writes what the moved process wrote to its relayed fds (``--relay``: pipes to the parent,
  whose write ends the keeper took before closing the stand-in's fds) to those pipes;
- when the deputy reports the moved process's end, ends the stand-in the same way: an
  injected ``exit_group(N)``, or the same signal delivered with its default action (no core
  dump: the stand-in is not dumpable). Its parent's wait() sees exactly that;
- when the link is lost, writes one line on the job's stderr (and in its log,
  ``/run/kcr-migrate/standin/PID.log``) and ends the stand-in by the user's rule
  (``agent.homelink.LostRule``).

The other processes of a moved tree are killed as before: only the root's parent stays behind.

Everything here runs on the holder's main thread (the tracer's), under trio.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import time
from typing import Any, Callable, Sequence

import trio

from agent import freeze as freezer
from agent import ptrace, seccomp
from agent.homechannel import Link, LinkLost
from agent.homelink import (
    Bye,
    Exited,
    Forward,
    Hello,
    HomeEnded,
    Output,
    LostRule,
    describe_status,
    parse_lost,
)
from agent.inject import NR, U64, Injector, RemoteMemory, Scratch, syscall_gadget
from agent.logs import log_path, open_log
from agent.procfs import read_status
from agent.signals import LateSignals, is_guard
from precopy.kernel import pidfd_getfd, pidfd_send_signal
from precopy.layout import read_maps
from transport.errors import MigrationError, ProcessError, ProtocolError
from transport.tcp import HANDSHAKE_TIMEOUT, KEY_SIZE, connect_data_channel

VDSO_CLUSTER = ("[vvar]", "[vvar_vclock]", "[vdso]")
STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
SIG_DFL, SIG_IGN = 0, 1
PR_SET_DUMPABLE = 4
RSEQ_FLAG_UNREGISTER = 1
WNOHANG = 1
NR_TIMER_DELETE = 226
ROBUST_LIST_HEAD_SIZE = 24
SYS_EXIT = 60
UNKNOWN = -1


@dataclasses.dataclass
class StandIn:
    """A converted process: what the keeper needs to drive it."""

    held: freezer.Held
    gadget: int                       # the syscall instruction it keeps: pause(), exit_group()
    default_stops: frozenset[int]     # stop signals whose action the job left at default
    stderr: int                       # the keeper's copy of the job's fd 2, or -1
    relays: dict[int, int] = dataclasses.field(default_factory=dict)   # relayed fd -> the keeper's copy

    @property
    def pid(self) -> int:
        return self.held.pid


def _sigaction(handler: int) -> bytes:
    """struct kernel_sigaction: handler, flags, restorer, mask."""
    return struct.pack("<QQQQ", handler, 0, 0, 0)


def _exit_thread(tid: int, gadget: int) -> None:
    """Make one stopped non-leader thread call exit(0), and reap its trace."""
    regs = ptrace.get_regs(tid)
    ptrace.set_regs(tid, dataclasses.replace(regs, rax=SYS_EXIT, rdi=0, rip=gadget, orig_rax=U64))
    ptrace.cont(tid, 0)
    while True:
        try:
            _, status = os.waitpid(tid, ptrace.WALL)
        except ChildProcessError:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return
        ptrace.cont(tid, 0)           # a stop on the way out: go on


def _posix_timer_ids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/timers") as f:
            return [int(line.split()[1]) for line in f if line.startswith("ID:")]
    except (OSError, ValueError, IndexError):
        return []


def convert(held: freezer.Held, relay: Sequence[int] = (),
            before_discard: Callable[[], object] | None = None) -> StandIn:
    """Make the frozen ``held`` a stand-in (see the module docstring). Leaves it stopped.
    ``before_discard`` is called just before its pending signals are discarded."""
    pid = held.pid
    for tid in held.seized:
        # From now on a keeper that dies takes the process with it: half converted, it must not run.
        # Its seccomp filters stay suspended: it runs only our calls (munmap, pause, exit) now.
        ptrace.set_options(tid, ptrace.PTRACE_O_EXITKILL | (seccomp.PTRACE_O_SUSPEND_SECCOMP if held.suspend_seccomp
                                                            else 0))
    mem = RemoteMemory(pid)
    try:
        gadget = syscall_gadget(pid, mem)
        for tid in sorted(held.seized - {pid}):
            _exit_thread(tid, gadget)
            held.seized.discard(tid)
            held.stopped.pop(tid, None)
        status = read_status(pid)
        caught = int(status.get("SigCgt", "0"), 16)
        ignored = int(status.get("SigIgn", "0"), 16)
        default_stops = frozenset(s for s in STOP_SIGNALS
                                  if not (caught | ignored) & (1 << (s - 1)) or s == signal.SIGSTOP)
        try:
            stderr = pidfd_getfd(held.pidfd, 2)
        except OSError:
            stderr = -1
        relays = {fd: pidfd_getfd(held.pidfd, fd) for fd in relay}    # the pipes home, kept open
        rseq = ptrace.get_rseq(pid)
        with Injector(pid, gadget) as inj:
            while inj.raw(NR["wait4"], -1, 0, WNOHANG | ptrace.WALL, 0) > 0:
                pass                      # the job's children, killed: no zombies left
            inj.call("close_range", 0, 0xFFFF_FFFF, 0)
            inj.raw(NR["alarm"], 0)
            for timer in _posix_timer_ids(pid):
                inj.raw(NR_TIMER_DELETE, timer)
            if rseq[0]:
                inj.raw(NR["rseq"], rseq[0], rseq[1], RSEQ_FLAG_UNREGISTER, rseq[2])
            inj.raw(NR["set_robust_list"], 0, ROBUST_LIST_HEAD_SIZE)
            inj.raw(NR["set_tid_address"], 0)
            inj.call("prctl", PR_SET_DUMPABLE, 0)
            scratch = Scratch(inj, mem)
            try:
                zero = scratch.put(0, bytes(32))
                for which in (0, 1, 2):          # ITIMER_REAL, _VIRTUAL, _PROF
                    inj.raw(NR["setitimer"], which, zero, 0)
                ign = scratch.put(64, _sigaction(SIG_IGN))
                dfl = scratch.put(128, _sigaction(SIG_DFL))
                if before_discard is not None:
                    before_discard()
                for sig in range(1, 65):
                    if sig in (signal.SIGKILL, signal.SIGSTOP):
                        continue
                    # Ignoring a signal discards its pending instances: they were carried to
                    # the destination with the process, or read just now as late (the
                    # destination delivers those), and must not be sent on twice.
                    inj.raw(NR["rt_sigaction"], sig, ign, 0, 8)
                    inj.raw(NR["rt_sigaction"], sig, dfl, 0, 8)
                inj.call("chdir", scratch.put(192, b"/\0"))
            finally:
                scratch.release()
            maps = read_maps(pid)
            # The vDSO, or in a process without one the mapping of code its gadget is in.
            kept = [m for m in maps if m.name in VDSO_CLUSTER] or [m for m in maps if m.start <= gadget < m.end]
            if not kept:
                raise ProcessError(f"pid {pid} lost the mapping of its syscall instruction", pid=pid)
            low = min(m.start for m in kept)
            high = max(m.end for m in kept)
            top = max(m.end for m in maps if m.name != "[vsyscall]")
            if low > 0:
                inj.call("munmap", 0, low)
            if top > high:
                inj.call("munmap", high, top - high)
            inj.close(regs=dataclasses.replace(inj.saved_regs, rax=NR["pause"], rip=gadget, orig_rax=U64),
                      sigmask=0)
    finally:
        mem.close()
    held.inflight.clear()             # carried to the destination with the rest
    return StandIn(held, gadget, default_stops, stderr, relays)


def vm_rss_kb(pid: int) -> int:
    try:
        return int(read_status(pid).get("VmRSS", "0 kB").split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} kcr-standin[{os.getpid()}]: {text}", flush=True)


class Keeper:
    """Drives one stand-in until it has ended (see the module docstring)."""

    def __init__(self, standin: StandIn, link: Link, lost: LostRule, where: str) -> None:
        self.s = standin
        self.link = link
        self.lost = lost
        self.where = where              # the moved process, for messages: "pid 123 on hostB"
        self.final: int | None = None   # the wait status the stand-in is to end with
        self.final_done = False
        self.gone = trio.Event()
        self.result = 0                 # how the stand-in ended

    async def run(self) -> None:
        pid = self.s.pid
        with trio.open_signal_receiver(signal.SIGCHLD) as children:
            ptrace.cont(pid, 0)
            self.s.held.stopped.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tracee, children)
                nursery.start_soon(self._listen)
                nursery.start_soon(self.link.beats)
                await self.gone.wait()
                nursery.cancel_scope.cancel()
        self._close_relays()
        try:
            await self.link.send(Bye())
        except LinkLost:
            pass
        await self.link.close()
        self.s.held.seized.clear()
        freezer.release(self.s.held)
        log(f"pid {pid} ended: {describe_status(self.result)}")

    # -- the stand-in's side --------------------------------------------------------------

    async def _tracee(self, children: Any) -> None:
        await self._drain()
        async for _ in children:
            await self._drain()

    async def _drain(self) -> None:
        pid = self.s.pid
        while not self.gone.is_set():
            try:
                got, status = os.waitpid(pid, ptrace.WALL | os.WNOHANG)
            except ChildProcessError:
                await self._ended(UNKNOWN)
                return
            if got == 0:
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                await self._ended(status)
                return
            sig, event = os.WSTOPSIG(status), (status >> 16) & 0xFF
            if self.final is not None:
                self._act_final(sig, event)
            elif event == ptrace.PTRACE_EVENT_STOP:
                if sig in STOP_SIGNALS:
                    ptrace.listen(pid)      # a group stop: it stays stopped, its parent sees it so
                else:
                    ptrace.cont(pid, 0)
            elif event == 0:
                await self._signal(sig)
            else:
                ptrace.cont(pid, 0)

    async def _signal(self, sig: int) -> None:
        pid = self.s.pid
        if sig == signal.SIGSTOP and is_guard(ptrace.get_siginfo(pid), sig):
            ptrace.cont(pid, 0)          # the holder's guard (``agent.holder``), not the job's: dropped
            return
        if sig != signal.SIGCHLD:
            try:
                await self.link.send(Forward(sig))
            except LinkLost:
                pass                     # the listener notices and applies the rule
        if sig in self.s.default_stops:
            ptrace.cont(pid, sig)        # it stops too (SIGSTOP; the others where their action is default)
        else:
            ptrace.cont(pid, 0)

    def _act_final(self, sig: int, event: int) -> None:
        """The stand-in is stopped and is to end as ``self.final`` says."""
        pid = self.s.pid
        assert self.final is not None
        term = self.final & 0x7F
        if term:
            if event == 0 and sig == term:
                ptrace.cont(pid, term)    # its default action: the stand-in dies of it
                return
            if not self.final_done:
                pidfd_send_signal(self.s.held.pidfd, term)
                self.final_done = True
            ptrace.cont(pid, 0)
            return
        if not self.final_done:
            regs = ptrace.get_regs(pid)
            ptrace.set_regs(pid, dataclasses.replace(regs, rax=NR["exit_group"], rdi=(self.final >> 8) & 0xFF,
                                                     rip=self.s.gadget, orig_rax=U64))
            self.final_done = True
        ptrace.cont(pid, 0)

    async def _ended(self, status: int) -> None:
        self.result = status
        if self.final is None:
            log(f"pid {self.s.pid} ended of {describe_status(status)}, which cannot be passed on: the deputy "
                "ends the moved process with SIGKILL")
            try:
                await self.link.send(HomeEnded(max(status, 0) or signal.SIGKILL))
            except LinkLost:
                pass
        self.gone.set()

    def finish(self, status: int) -> None:
        """End the stand-in with wait status ``status``."""
        if self.final is not None or self.gone.is_set():
            return
        self.final = status
        if status & 0x7F == signal.SIGKILL:
            pidfd_send_signal(self.s.held.pidfd, signal.SIGKILL)
            self.final_done = True
        else:
            ptrace.interrupt(self.s.pid)     # its stop brings ``_act_final``

    # -- the link's side ------------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            while True:
                msg = await self.link.receive()
                if isinstance(msg, Output):
                    await self._output(msg)
                    continue
                if isinstance(msg, Exited):
                    self._close_relays()
                    if msg.status == UNKNOWN:
                        self._lost("the deputy could not learn how it ended")
                    else:
                        log(f"{self.where} ended: {describe_status(msg.status)}")
                        self.finish(msg.status)
                    return
                if isinstance(msg, Bye):
                    raise LinkLost("the deputy left")
        except (LinkLost, ProtocolError) as exc:
            if not self.gone.is_set():
                self._lost(str(exc))

    async def _output(self, msg: Output) -> None:
        """Write relayed output to its pipe at home (blocking while the parent does not read,
        as the job would; the link then waits too). A reader gone: SIGPIPE for the process."""
        fd = self.s.relays.get(msg.fd, -1)
        if fd < 0:
            return
        if not msg.data:
            self._close_relay(msg.fd)
            return
        view = memoryview(msg.data)
        try:
            while view:
                n = await trio.to_thread.run_sync(os.write, fd, view)
                view = view[n:]
        except BrokenPipeError:
            self._close_relay(msg.fd)
            await self.link.send(Forward(signal.SIGPIPE))
        except OSError as exc:
            log(f"writing relayed fd {msg.fd} failed: {exc.strerror}; its output is dropped from now on")
            self._close_relay(msg.fd)

    def _close_relay(self, fd: int) -> None:
        copy = self.s.relays.pop(fd, -1)
        if copy >= 0:
            os.close(copy)

    def _close_relays(self) -> None:
        """The parent's pipes end with the stand-in (they would have with the job)."""
        for fd in list(self.s.relays):
            self._close_relay(fd)

    def _lost(self, why: str) -> None:
        self._close_relays()
        how = "ending with SIGKILL" if self.lost.kill else f"exiting with status {self.lost.status}"
        line = (f"kcr-migrate: stand-in for pid {self.s.pid}: lost {self.where} ({why}); {how} "
                f"(--stand-in-lost {self.lost})\n")
        log(line.strip())
        if self.s.stderr >= 0:
            try:
                os.write(self.s.stderr, line.encode())
            except OSError:
                pass
        self.finish(signal.SIGKILL if self.lost.kill else self.lost.status << 8)


def _detach(pid: int) -> None:
    """Leave the agent's session and stdio (an SSH channel stays open while we hold it)."""
    try:
        os.setsid()
    except OSError:
        pass
    out = open_log("standin", str(pid))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _check_to(to: dict[str, Any]) -> tuple[str, int, bytes, LostRule, float, str]:
    try:
        address, port, key = str(to["address"]), int(to["port"]), to["key"]
        lost = parse_lost(str(to.get("lost", "exit")))
        timeout = float(to.get("timeout", 30.0))
        where = str(to.get("where", "its process"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"stand_in: a bad deputy address ({exc})") from None
    if not isinstance(key, bytes) or len(key) != KEY_SIZE or not 0 < port < 65536 or not 0 < timeout <= 3600:
        raise ProtocolError("stand_in: a bad deputy address, port, key or timeout")
    return address, port, key, lost, timeout, where


def run(root: freezer.Held, others: list[freezer.Held], to: dict[str, Any],
        reply: Callable[[dict[str, Any]], None], late: LateSignals | None = None) -> None:
    """Kill ``others`` (children first), make ``root`` a stand-in linked to the deputy ``to``
    names, ``reply`` to the agent, and keep it until it has ended. If the deputy cannot be
    reached or the stand-in cannot be made, every process is killed as without a stand-in,
    and the reply is the error. ``late``: the holder's record of the signal queues carried;
    what arrived since, read before anything is discarded, is in the reply (``signals``)."""
    trio.run(_run, root, others, to, reply, late or LateSignals())


def _kill_all(root: freezer.Held, others: list[freezer.Held]) -> None:
    for held in [*reversed(others), root]:
        try:
            freezer.kill(held)
        except OSError:
            pass


async def _run(root: freezer.Held, others: list[freezer.Held], to: dict[str, Any],
               reply: Callable[[dict[str, Any]], None], late: LateSignals) -> None:
    try:
        address, port, key, lost, timeout, where = _check_to(to)
        stream = await connect_data_channel(address, port, key=key, timeout=min(timeout, HANDSHAKE_TIMEOUT))
    except MigrationError as exc:
        _kill_all(root, others)
        reply({"ok": False, "error": ProcessError(
            f"the stand-in could not reach its deputy ({exc}); the source was ended instead").to_wire()})
        return
    link = Link(stream, timeout)
    signals = late.take([root, *others], freezer.alive)
    try:
        for held in reversed(others):
            freezer.kill(held)
        standin = convert(root, [int(fd) for fd in to.get("relay", [])],
                          before_discard=lambda: signals.extend(late.take([root], freezer.alive)))
        await link.send(Hello(root.pid))
    except (OSError, ptrace.TraceeGone, MigrationError) as exc:
        _kill_all(root, [])
        await link.close()
        reply({"ok": False, "error": ProcessError(
            f"the source could not be made a stand-in ({exc}); it was ended instead").to_wire()})
        return
    reply({"ok": True, "result": {"pid": root.pid, "keeper_pid": os.getpid(), "vm_rss_kb": vm_rss_kb(root.pid),
                                  "signals": signals,
                                  "host": socket.gethostname(),
                                  "log": log_path("standin", str(root.pid))}})
    _detach(root.pid)
    log(f"standing in for {where} as pid {root.pid}; if the link is lost: {lost}")
    await Keeper(standin, link, lost, where).run()
