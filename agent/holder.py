"""The holder: a process of its own that traces the source process for its agent.

A tracee lives and dies with its tracer, so the tracer of a migrating process must not be
the agent that talks to the network: if that agent is killed, the holder sees its socket
close and settles the process as the protocol core (``migrate.phases``, ``HOLDER``) says for
its state — before the point of no return it thaws it (the process runs on as if nothing
happened); after it, it stops the process with SIGSTOP and lets go, so the source never runs
beside a destination copy. Every answer carries the holder's state, which the agent mirrors.

Requests and answers are length-prefixed msgpack maps on a socketpair; ptrace requests all
run on the holder's main thread. ``HolderClient`` is the agent's side.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import msgpack

from agent import fdtable, locks, mempolicy, unix_names
from agent import freeze as freezer
from agent import ptrace
from agent.signals import LateSignals, sigcont_unseen
from agent.startup import grow_fd_table
from agent.dump import collect
from agent.inject import Injector, RemoteMemory, ScratchTaken, syscall_gadget
from agent.procfs import check_supported, process_tree
from precopy.kernel import pidfd_send_signal
from precopy.layout import FrozenFileMaps, MapsCache, read_maps
from agent.tree import check_tree, freeze_tree, zombie
from agent.urgency import Urgency
from agent.zygote import ForkedHolder, fork_holder
from migrate.phases import HOLDER, SETTLE, Action, Failure, HolderEvent, HolderState, Machine, guarded
from transport.errors import (
    MigrationError,
    NoSuchProcess,
    ProcessError,
    ProcessExited,
    ProtocolError,
    UnsupportedResource,
    error_from_wire,
)
from transport.schema import prepare_codecs

LEN = struct.Struct("<I")
MAX_MESSAGE = 64 << 20
SETTLING = frozenset({"kill", "release", "hold", "stand_in"})     # what ends a freeze, one way or another
UNLOCK_TRIES = 20        # freezes tried for a moment the job holds no write lock on a very file


def send_message(sock: socket.socket, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(LEN.pack(len(data)) + data)


def recv_message(sock: socket.socket) -> Any | None:
    head = _recv_exact(sock, LEN.size)
    if head is None:
        return None
    (n,) = LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"holder message of {n} bytes exceeds the cap")
    body = _recv_exact(sock, n)
    if body is None:
        raise ProtocolError("the holder's peer closed mid-message")
    return msgpack.unpackb(body, raw=False)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError("the holder's peer closed mid-message")
            return None
        buf += chunk
    return bytes(buf)


class Holder:
    """The held processes (a process and its descendants: the job) and the operations on
    them (main thread only). The root is first, parents before children."""

    def __init__(self) -> None:
        self.helds: dict[int, freezer.Held] = {}
        self.root = 0
        self.machine = Machine(HOLDER)
        self.first_interrupt_ns = 0
        self.redirect: dict[int, str] = {}
        self.late = LateSignals()      # the signal queues carried, to find what arrives after
        self.fds: tuple[list[int], dict[int, fdtable.FdState]] | None = None   # ``collect_files``'
        self.maps = FrozenFileMaps()       # the frozen job's file mappings, read once per freeze
        # Each process's last maps read: kept up to date while the job runs (``_read_layouts``),
        # so that the freeze parses only the lines that changed since (``dump.collect``).
        self.layouts: dict[int, MapsCache] = {}
        self.checked = False           # the frozen tree was checked (``_check_frozen``)
        self.outside: fdtable.OutsideScan | None = None   # the host's other fds, for the last freeze
        self.outside_watch = fdtable.OutsideWatch()        # ... read while the job runs
        self.collected: set[int] = set()   # processes whose state ``collect`` read since the freeze
        self.sigcont_seen_by: set[int] = set()   # ... of which those that would see a SIGCONT

    def _need(self, pid: int | None = None) -> freezer.Held:
        held = self.helds.get(pid or self.root)
        if held is None:
            raise ProcessError("no process is held" if pid is None else f"process {pid} is not held")
        return held

    @property
    def frozen(self) -> bool:
        return any(h.frozen for h in self.helds.values())

    def op_seize(self, pid: int, redirect: list[list[Any]] | None = None) -> dict[str, Any]:
        """Hold ``pid`` and its descendants; ``redirect`` ([fd, path] pairs) names the root's
        fds to the outside that become files on the destination."""
        self.machine.check(HolderEvent.SEIZE)
        self.redirect = {int(fd): str(path) for fd, path in redirect or []}
        self.root = pid
        try:
            for p in check_tree(pid, self.redirect, outside_watch=self.outside_watch):
                self._hold(p)
        except BaseException:
            self._let_all_go()
            raise
        self.machine.handle(HolderEvent.SEIZE)
        self.outside_watch.refresh(set(self.helds))
        self._read_layouts()
        return {"pids": list(self.helds)}

    def _read_layouts(self) -> None:
        """Read each held process's maps into its cache (the job runs: a process may exit
        meanwhile; its cache is dropped with it)."""
        for p in [p for p in self.layouts if p not in self.helds]:
            del self.layouts[p]
        for p in self.helds:
            try:
                read_maps(p, self.layouts.setdefault(p, MapsCache()))
            except (FileNotFoundError, ProcessLookupError):
                self.layouts.pop(p, None)

    def _hold(self, pid: int) -> None:
        try:
            self.helds[pid] = freezer.hold(pid)
        except (NoSuchProcess, ProcessExited):
            if pid == self.root:
                raise          # a descendant that exited meanwhile: ``members`` sees it gone

    def op_members(self) -> dict[str, Any]:
        """The job's running processes as they are now: processes forked since join (held,
        checked with the rest), processes gone or exited (zombies) leave. The root must
        still run."""
        if not freezer.alive(self._need()):
            raise ProcessExited(f"pid {self.root} exited before it was moved: there is nothing left to move",
                                pid=self.root)
        now = [p for p in process_tree(self.root) if not zombie(p)]
        left = [p for p in self.helds if p not in now or not freezer.alive(self.helds[p])]
        for p in left:
            freezer.let_go(self.helds.pop(p))
        joined = [p for p in now if p not in self.helds and p not in left]
        if joined:
            check_tree(self.root, self.redirect, outside_watch=self.outside_watch)   # a newcomer may hold what cannot move
            for p in joined:
                self._hold(p)
        self.outside_watch.refresh(set(self.helds))
        self._read_layouts()
        return {"pids": list(self.helds), "joined": [p for p in joined if p in self.helds], "left": left}

    def op_freeze(self, pid: int = 0, unlocked: list[list[int]] | None = None) -> dict[str, Any]:
        """Freeze one process (``pid``: a tracker's pause) or the whole job: every process
        stopped, then the tree read again until no process in it is left running (one
        forked meanwhile joins, frozen; one gone or exited leaves). The processes that joined
        are checked here, the whole tree as frozen before its state is read (``collect_files``).
        ``unlocked``: (st_dev, st_ino) of files the destination sees as the very same: frozen
        holding a write lock on one, the job is let run until it lets go, and frozen again
        (``agent.locks``); still holding one after ``UNLOCK_TRIES`` tries, it runs on and
        the freeze is refused."""
        if pid:
            held = self._need(pid)
            if not held.frozen:
                freezer.freeze(held)
            return {}
        self.machine.check(HolderEvent.FREEZE)
        files = {(int(dev), int(ino)) for dev, ino in unlocked or []}
        self.fds = None
        # Every fd on the host, as read while the job ran: frozen, only what can have changed
        # since is read again (``fdtable.OutsideScan``).
        self.outside = self.outside_watch.latest(set(self.helds))
        joined: list[int] = []
        left: list[int] = []
        start = time.monotonic()
        for tries in range(1, UNLOCK_TRIES + 1):
            if not self.frozen:
                self.first_interrupt_ns = time.monotonic_ns()
            now_joined, now_left = freeze_tree(self.root, self.helds)
            joined = [p for p in joined if p not in now_left] + now_joined
            left = [p for p in left if p not in now_joined] + [p for p in now_left if p not in joined]
            locked = locks.job_write_lock(list(self.helds), files)
            if locked is None:
                break
            self.op_thaw()
            if tries == UNLOCK_TRIES or locks.wait_unlocked(lambda: list(self.helds), files, locks.UNLOCK_WAIT):
                holder, path, lock = locked
                raise UnsupportedResource(
                    f"pid {holder} held {locks.describe(lock)} of {path} whenever the job was frozen ({tries} tries in "
                    f"{time.monotonic() - start:.1f} s), and the destination sees that same file: a write lock "
                    "cannot change hands between two processes without a moment where a third could take it; "
                    "the job runs on here: move it when it holds that lock for shorter", pid=holder)
        pids = list(self.helds)
        # A process that joined is checked before anything is done to it (a tracker injects
        # into it next); the whole tree as it is frozen is checked by ``collect_files``, which
        # runs while the last dirty pages are scanned, before anything is injected for the state.
        for p in joined:
            check_supported(p, redirect=self.redirect if p == self.root else None, tree=pids)
        self.checked = False
        self.maps = FrozenFileMaps()
        self.collected = set()
        self.sigcont_seen_by = set()
        self.machine.handle(HolderEvent.FREEZE)
        return {"first_interrupt_ns": self.first_interrupt_ns, "pids": pids, "joined": joined, "left": left,
                "threads": [[p, sorted(h.stopped)] for p, h in self.helds.items()], "lock_retries": tries - 1}

    def op_thaw(self, pid: int = 0) -> dict[str, Any]:
        """Let one process (``pid``) or all run again, untraced (a traced process would stop
        at every signal it gets)."""
        self.fds = None
        for held in [self._need(pid)] if pid else list(self.helds.values()):
            if held.frozen:
                freezer.thaw(held)
        return {}

    def _need_frozen(self) -> list[int]:
        if not self.helds or not all(h.frozen for h in self.helds.values()):
            raise ProcessError("the processes must be frozen to collect their state")
        self.machine.check(HolderEvent.COLLECT)
        return list(self.helds)

    def op_collect_files(self) -> dict[str, Any]:
        """The frozen job's fd tables (``fdtable.collect_tree``): per process, its fd records
        and the files it carries whole (read by the agent). Read through /proc and pidfds,
        without touching the processes' memory, so this runs while their last dirty pages are
        scanned; ``collect`` cannot (``agent.source``)."""
        self._read_fds()
        return {"processes": self._fd_tables()}

    def _read_fds(self) -> dict[int, fdtable.FdState]:
        """The frozen job's fd tables, read once per freeze (the tree checked first)."""
        pids = self._need_frozen()
        if self.fds is None or self.fds[0] != pids:
            self._check_frozen(pids)
            self.fds = (pids, fdtable.collect_tree(pids, {self.root: self.redirect}, outside_scan=self.outside,
                                                   maps=self.maps))
        return self.fds[1]

    def _fd_tables(self) -> list[list[Any]]:
        """The fd tables ``_read_fds`` read, as the agent takes them."""
        assert self.fds is not None
        return [[p, {"fds": [rec.to_wire() for rec in fds.records()], "carried": [c.to_wire() for c in fds.carried]}]
                for p, fds in self.fds[1].items()]

    def _check_frozen(self, pids: list[int]) -> None:
        """The frozen tree checked as it is (``agent.tree.check_tree``), once per freeze."""
        if not self.checked:
            check_tree(self.root, self.redirect, pids, maps=self.maps)
            self.checked = True

    def op_collect(self, pids: list[int] | None = None, scratch: list[list[int]] | None = None,
                   files: bool = False) -> dict[str, Any]:
        """Everything but memory and the fd tables (``collect_files``, read first if they were
        not), of every process of the frozen job, or of ``pids`` (a tree's processes are read a few at a time
        while those read go out). The job is COLLECTED once every process's state was read.
        ``files``: every process's fd table too (``fd_tables``, as ``collect_files`` gives them),
        for a first call that starts at once: one call to the holder less.

        ``scratch``: [pid, address] where a process's scratch goes (``agent.dump.collect``);
        a process whose address is taken is left out, and named in ``later``."""
        wanted = [int(p) for p in pids] if pids else []
        at = {int(p): int(a) for p, a in scratch or []}
        later: list[int] = []
        pids = self._need_frozen()
        fds = self._read_fds()          # (read already: the source asks for them first, beside the last scans)
        out = []
        job = mempolicy.JobBounds(pids, self.maps)
        for p, held in [(p, self._need(p)) for p in wanted] if wanted else list(self.helds.items()):
            mem = RemoteMemory(p, writable=False)
            try:
                state = collect(held, mem, fds=fds[p], job=job, scratch_at=at.get(p, 0),
                                layout=self.layouts.setdefault(p, MapsCache()))
            except ScratchTaken:
                later.append(p)
                continue
            finally:
                mem.close()
            self.late.carry(p, state.process.shared_pending,
                            {t.tid: t.pending[1:] if t.tid in held.inflight else t.pending for t in state.threads})
            out.append({"pid": p, "process": state.process.to_wire(), "threads": [t.to_wire() for t in state.threads]})
            self.collected.add(p)
            unseen = sigcont_unseen(bool(state.process.stopped), state.process.sigactions,
                                    [t.sigmask for t in state.threads])
            self.sigcont_seen_by.discard(p)
            if not unseen:
                self.sigcont_seen_by.add(p)
        if self.collected >= set(pids):
            self.machine.handle(HolderEvent.COLLECT)
        # "sigcont_unseen": no process collected so far would see the guard's SIGCONT (``agent.signals``)
        got: dict[str, Any] = {"processes": out, "later": later, "sigcont_unseen": not self.sigcont_seen_by}
        if files:
            got["fd_tables"] = self._fd_tables()
        return got

    def op_inject(self, calls: list[list[Any]], pid: int = 0) -> list[int]:
        """Run system calls in a frozen process's main thread (the root's unless ``pid``);
        returns raw results."""
        held = self._need(pid)
        if not held.frozen:
            raise ProcessError("the process must be frozen to inject system calls")
        mem = RemoteMemory(held.pid, writable=False)
        try:
            gadget = syscall_gadget(held.pid, mem)
        finally:
            mem.close()
        with Injector(held.pid, gadget, park=held.pid not in held.inflight) as inj:
            return [inj.call(name, *args) for name, args in calls]

    def op_commit_pending(self) -> dict[str, Any]:
        """From now on a lost agent stops the processes instead of thawing them. Returns the
        signals that arrived since the state was collected (``agent.signals``), for the
        destination to deliver; a process of the job killed meanwhile abandons the move.

        The holder's own death must not let them run either (the kernel lets a dead tracer's
        tracees go): each gets a SIGSTOP, the guard, pending while it is held, so let go by a
        dead holder it stops instead of running beside the destination's copy, recorded for
        ``kcr-migrate resolve``. ``kill`` makes the guard moot, ``hold`` keeps it, ``release``
        and the stand-in's keeper discard it."""
        self.machine.check(HolderEvent.COMMIT_PENDING)
        signals = self.late_signals()
        if self.late.killed:
            dead = min(self.late.killed)
            raise ProcessExited(f"process {dead} was killed (SIGKILL) while frozen for the move: the move is "
                                "abandoned, and the rest of the job runs on here", pid=dead)
        entering = HOLDER.transitions[(self.machine.state, HolderEvent.COMMIT_PENDING)]
        if guarded(entering):         # so that even our own death stops them
            for held in self.helds.values():
                record_held(held.pid)
                pidfd_send_signal(held.pidfd, signal.SIGSTOP)
        self.machine.handle(HolderEvent.COMMIT_PENDING)
        return {"signals": signals}

    def late_signals(self) -> list[list[Any]]:
        """Signals sent to the frozen job since its state was collected."""
        return self.late.take(list(self.helds.values()), freezer.alive)

    def op_kill(self) -> dict[str, Any]:
        """End every process (children first: a parent killed first could reap nothing),
        having read the signals that arrived since ``commit_pending`` (returned)."""
        self._need()
        self.machine.check(HolderEvent.KILL)
        signals = self.late_signals()
        for p in reversed(list(self.helds)):
            freezer.kill(self.helds.pop(p))
            forget_held(p)
        self.machine.handle(HolderEvent.KILL)
        return {"signals": signals}

    def op_hold(self) -> dict[str, Any]:
        """Leave the processes stopped (SIGSTOP) and untraced: one command settles each later."""
        self._need()
        self.machine.check(HolderEvent.HOLD)
        for p in list(self.helds):
            held = self.helds.pop(p)
            os.kill(held.pid, signal.SIGSTOP)
            record_held(held.pid)
            freezer.let_go(held)
        self.machine.handle(HolderEvent.HOLD)
        return {}

    def op_release(self) -> dict[str, Any]:
        """Let the processes go, running (rollback), and say whether the root had exited by
        then (the job ended while it was being moved); their socket files at their paths again
        should a restore that shared this filesystem have left them aside (``unix_names``).
        After ``commit_pending`` (its answer was lost: GO was never sent) the guard is discarded
        first: a SIGCONT removes a pending SIGSTOP (the one trace it leaves: a SIGCONT, which a
        job rarely handles)."""
        self.machine.check(HolderEvent.RELEASE)
        try:
            unix_names.reclaim(fdtable.socket_files(list(self.helds)))
        except (OSError, MigrationError):
            pass              # best effort (a process gone meanwhile): the others go on
        if guarded(self.machine.state):
            for held in self.helds.values():
                pidfd_send_signal(held.pidfd, signal.SIGCONT)
                forget_held(held.pid)
        self.machine.handle(HolderEvent.RELEASE)
        root = self.helds.get(self.root)
        ended = root is None or not freezer.alive(root)
        self._let_all_go()
        return {"root_exited": ended}

    def _let_all_go(self) -> None:
        """Untrace every held process (as it is: running, or thawed if frozen)."""
        failed: BaseException | None = None
        for p in list(self.helds):
            try:
                freezer.let_go(self.helds.pop(p))
            except BaseException as exc:     # every one, whatever fails
                failed = failed or exc
        if failed is not None:
            raise failed

    def take_for_stand_in(self) -> tuple[freezer.Held, list[freezer.Held]]:
        """The frozen root and the other processes, no longer the holder's to settle: the
        stand-in's keeper (``agent.standin``) takes them over."""
        root = self._need()
        if not root.frozen:
            raise ProcessError("the process must be frozen to become a stand-in")
        self.machine.handle(HolderEvent.STAND_IN)
        others = [h for p, h in self.helds.items() if p != self.root]
        for p in self.helds:
            forget_held(p)       # the keeper passes the guard over (``agent.signals.is_guard``)
        self.helds.clear()
        return root, others

    def settle_on_eof(self) -> None:
        """The agent is gone (or let us go): do what the protocol core says for this state."""
        if not self.helds:
            return
        event = SETTLE.get(self.machine.action(Failure.PEER_DIED))
        if event is not None:
            getattr(self, f"op_{event.value}")()


HELD_DIR = "/run/kcr-migrate/held"


def start_time(pid: int) -> int:
    """The process's start time (clock ticks after boot): with the pid, it names one process."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def record_held(pid: int) -> None:
    """Note that ``pid`` was left stopped by a migration, for ``kcr-migrate resolve``."""
    try:
        os.makedirs(HELD_DIR, exist_ok=True)
        with open(os.path.join(HELD_DIR, f"{pid}.json"), "w") as f:
            json.dump({"pid": pid, "start_time": start_time(pid), "since": time.time()}, f)
    except OSError:
        pass


def forget_held(pid: int) -> None:
    """``pid`` is settled: no record for ``kcr-migrate resolve``."""
    try:
        os.unlink(os.path.join(HELD_DIR, f"{pid}.json"))
    except OSError:
        pass


def serve(sock: socket.socket) -> None:
    holder = Holder()
    stretch = Urgency(this_thread=True)
    ops: dict[str, Callable[..., Any]] = {name[3:]: getattr(holder, name) for name in dir(holder)
                                         if name.startswith("op_")}
    try:
        while True:
            try:
                req = recv_message(sock)
            except (OSError, ProtocolError):
                req = None
            if req is None:
                break
            raw = req.get("args", {})
            args = dict(raw) if isinstance(raw, dict) else {}
            # The steps of a short freeze come with urgent=True: real-time priority from the
            # first to what settles the job (``agent.urgency``).
            quick = args.pop("urgent", None)
            if quick:
                stretch.begin()
            elif quick is not None or req.get("op") in SETTLING:
                stretch.end()
            if req.get("op") == "stand_in":
                if _stand_in(holder, sock, args):
                    return                # the keeper ran to its end: nothing is left to settle
                continue
            op = ops.get(str(req.get("op")))
            try:
                if op is None:
                    raise ProtocolError(f"unknown holder operation {req.get('op')!r}")
                result = op(**args)
                reply: dict[str, Any] = {"ok": True, "result": result, "state": holder.machine.state.value}
            except MigrationError as exc:
                reply = {"ok": False, "error": exc.to_wire()}
            except OSError as exc:
                reply = {"ok": False, "error": {"code": "process", "errno": exc.errno or 0,
                                                "message": f"{exc.strerror or exc}"}}
            except ptrace.TraceeGone as exc:
                reply = {"ok": False, "error": {"code": "process-exited", "errno": 0, "message": str(exc)}}
            except Exception as exc:     # a bug: said as one, and the holder stays to settle the job
                reply = {"ok": False, "error": {"code": "remote", "errno": 0, "message":
                                                f"internal error in the holder's {req.get('op')}: "
                                                f"{type(exc).__name__}: {exc} (a bug: please report it)"}}
            try:
                send_message(sock, reply)
            except OSError:
                break
    finally:
        stretch.end()
        holder.settle_on_eof()


def _stand_in(holder: Holder, sock: socket.socket, args: dict[str, Any]) -> bool:
    """The ``stand_in`` operation: this process becomes the stand-in's keeper (``agent.standin``),
    answers, leaves the agent, and keeps the stand-in until it ends. False if it was refused
    before anything changed."""
    from agent import standin
    try:
        root, others = holder.take_for_stand_in()
    except MigrationError as exc:
        send_message(sock, {"ok": False, "error": exc.to_wire()})
        return False

    def reply(answer: dict[str, Any]) -> None:
        try:
            send_message(sock, answer)
        except OSError:
            pass
        sock.close()

    standin.run(root, others, dict(args.get("to") or {}), reply, holder.late)
    return True


def run(fd: int, *, codecs_ready: bool = False) -> None:
    """Be the holder serving the socket ``fd`` (in a new interpreter, ``main``; or forked by
    the zygote, ``agent.zygote``, which prepared the codecs already)."""
    # Only the agent's death (our socket closing) ends us: a signal arriving mid-injection
    # must not leave the process with borrowed registers. Ctrl-C aimed at the terminal's whole
    # process group, SIGTERM and SIGHUP are the agent's to handle.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if not codecs_ready:
        prepare_codecs()      # the state records it encodes while the job is frozen
    grow_fd_table()           # it takes the job's pipes and sockets in while the job is frozen
    sock = socket.socket(fileno=fd)
    try:
        serve(sock)
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="kcr-holder")
    parser.add_argument("--fd", type=int, required=True)
    run(parser.parse_args().fd)


KEEPERS: list[subprocess.Popen[bytes] | ForkedHolder] = []     # holders that became keepers: never waited for


class HolderClient:
    """The agent's handle on its holder process. Thread-safe; blocking calls."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        self._lock = threading.Lock()
        self.state = HolderState.IDLE       # the holder's, as it last answered
        # Forked by the agent's zygote, with everything loaded; else a new interpreter.
        forked = fork_holder(theirs.fileno())
        self.proc: subprocess.Popen[bytes] | ForkedHolder = forked if forked is not None else subprocess.Popen(
            [sys.executable, "-m", "agent.holder", "--fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()

    def call(self, op: str, **args: Any) -> Any:
        with self._lock:
            try:
                send_message(self._sock, {"op": op, "args": args})
                reply = recv_message(self._sock)
            except OSError as exc:
                raise ProcessError(f"the holder process failed: {exc}") from None
        if reply is None:
            raise ProcessError("the holder process exited")
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error", {}))
        if "state" in reply:
            self.state = HolderState(reply["state"])
        return reply.get("result")

    def action(self, failure: Failure) -> Action:
        """What the protocol core says to do with the source about ``failure``, in the holder's state."""
        return HOLDER.action(self.state, failure)

    def let_live(self) -> None:
        """The holder became a stand-in's keeper and lives on: close the link, do not wait."""
        self._sock.close()
        KEEPERS.append(self.proc)

    def close(self, timeout: float = 30) -> None:
        """Close the link; the holder settles the process by the rule in force and exits."""
        try:
            self._sock.close()
        finally:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    main()
