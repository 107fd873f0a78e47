"""Rebuilding a process from records and pages, ptrace-only, inside a fresh stub.

The restorer spawns the stub (``agent.stub``), seizes it, and from then on drives it by
injected system calls:

1. ``begin``: maps a gadget page (``syscall`` + scratch) at an address free in both
   layouts, closes the stub's files, unmaps the stub, moves the vDSO cluster to where the
   process had it; makes the stub a userfaultfd for ``write_pages`` (``agent.fill``).
2. ``apply_layout``: maps every mapping at its address with its protection (files mapped
   again from the file, SysV segments attached by an injected ``shmat``, one per attachment:
   ``agent.shared_memory``); can be called again with a newer layout (live pre-copy). Files
   under ``deferred`` paths (a filesystem hook brings them, after the last pre-copy round)
   get an anonymous placeholder that takes their written pages; ``finish`` maps the file
   there and puts those pages back.
3. ``write_pages``: page contents go in by UFFDIO_COPY where the stub has no page yet,
   through /proc/PID/mem where it has (a later round's).
4. ``finish``: drops the userfaultfd first; then mm fields, files, cwd, signals, timers,
   limits, credentials, then the other threads (injected clone), their TLS, rseq, robust
   lists, masks, registers; the gadget page goes last. The process is left stopped under
   ptrace; ``resume`` lets it run and ``abort`` kills it.
"""
from __future__ import annotations

import bisect
import errno
import functools
import os
import signal
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from agent import cgroups, inherited, locks, mempolicy, peercred, ptrace, sched, seccomp, stub, timens
from agent.as_target import RESOLVE_NO_SYMLINKS, Identity, check_grantable, may_attach
from agent.descriptions import Descriptions
from agent.fdtable import FdState
from agent.fill import MissingFiller
from agent.freeze import NR_RESTART_SYSCALL
from agent.inject import (
    BATCH_CODE,
    BATCH_ENTRY,
    MAP_ANONYMOUS,
    MAP_DROPPABLE,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    NR,
    InjectionError,
    Injector,
    RemoteMemory,
    to_signed,
)
from agent.layout_plan import LayoutPlan, applied, in_ranges, piece, plan_layout
from agent.procfs import read_stat, read_text
from agent.shared_memory import SharedObjects
from precopy import parent_frames, sysv
from precopy.intervals import Span, intersect_spans, merge_spans, splice_spans, subtract_spans, within
from precopy.kernel import (
    IOV_MAX,
    boot_id,
    pidfd_getfd,
    pidfd_open,
    process_vm_writev,
    prlimit,
    tgkill,
    xsave_supported_mask,
)
from precopy.layout import MapEntry, is_special, read_maps
from transport.buffers import data_address
from transport.errors import MigrationError, NoSuchProcess, ProtocolError, RestoreError
from transport.image import check_machine
from transport.pages import PageBatch
from transport.schema import (
    ADV_DONTDUMP,
    ADV_DONTFORK,
    ADV_HUGEPAGE,
    ADV_MERGEABLE,
    ADV_RANDOM,
    ADV_SEQUENTIAL,
    ADV_NOHUGEPAGE,
    ADV_WIPEONFORK,
    AUDIT_UID_UNSET,
    MEMBARRIER_REGISTER_COMMANDS,
    PAGE_SIZE,
    SECCOMP_MODE_STRICT,
    TASK_SIZE,
    Creds,
    EpollWatch,
    EventFiles,
    InetSockets,
    FileContents,
    FileDesc,
    Files,
    GpRegs,
    ImageHeader,
    Mappings,
    MappingsDelta,
    ParentPages,
    Pipes,
    ProcessState,
    ThreadState,
    UnixSockets,
    VMA_LOCKED,
    VMA_LOCKONFAULT,
    VMA_MAYWRITE,
    VMA_NORESERVE,
    VMA_DROPPABLE,
    VMA_SEALED,
    Vma,
    check_threads,
    is_shm_path,
)

STUB_OPTIONS = ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACEFORK | ptrace.PTRACE_O_EXITKILL
SECCOMP_FPROG, SECCOMP_PROGRAM = 4096, 8192   # where ``_seccomp`` puts its arguments in the scratch
GADGET_PAGES = 20           # page 0: "syscall; int3" and BATCH_CODE; 1-3: scratch for arguments;
BATCH_PAGES = 16            # 4-19: the table of a batch of system calls (``Injector.batch``)
BATCH_CODE_OFFSET = 16
BATCH_MAX = BATCH_PAGES * PAGE_SIZE // BATCH_ENTRY
U64 = (1 << 64) - 1
O_CLOEXEC = 0o2000000
AT_FDCWD = -100
F_DUPFD_CLOEXEC = 1030
F_SETFD = 2
RUN_WAIT_S = 1.0            # how long ``resume`` waits to see every thread run
CREDS_SCRATCH = 3 * PAGE_SIZE     # ``_creds``' arguments: all of the scratch (pages 1-3)
CLONE_SCRATCH = 2560        # where ``_clone_child`` puts clone3's arguments in the scratch
POLICY_SCRATCH = 768        # where ``_thread_setup`` puts a thread's NUMA nodemask
SOCKET_SCRATCH = 0          # ``socketpairs_as``' fds, ``connect_as``'s address
PAIRS_AT_ONCE = 128         # socketpairs made in one batch (their fds fill 1 KiB of the scratch)
TIMER_SCRATCH = 4096        # ``_posix_timers``: the ids asked, their sigevents, their times
TIMERS_AT_ONCE = 64         # (4 + 64 + 32 bytes each, within pages 2 and 3 of the scratch)
Call = tuple[str, tuple[int, ...]]     # an injected system call: name, arguments
WALL, WNOHANG = 0x40000000, 1
RLIMIT_NOFILE = 7
RLIMIT_CORE = 4
ZOMBIE_GRACE_S = 5.0
ABORT_WAIT_S = 5.0           # for the threads of a killed half-built process to be reaped
PR_SET_NAME, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_SECUREBITS = 15, 4, 8, 28
PR_SET_MM, PR_SET_MM_MAP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 35, 14, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_SET_CHILD_SUBREAPER = 47, 2, 36
SECBIT_KEEP_CAPS = 1 << 4
CAP_LAST = 40
CAP_CHECKPOINT_RESTORE = 40
PR_SET_THP_DISABLE = 41
PR_SET_MDWE = 65
PR_SET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, PR_SPEC_INDIRECT_BRANCH = 53, 0, 1
MADV_GUARD_INSTALL = 102
PR_SET_PDEATHSIG = 1
PR_TIMER_CREATE_RESTORE_IDS = 77
MLOCK_ONFAULT = 1
MCL_FUTURE = 2
EPOLL_CTL_ADD, EPOLL_CTL_MOD = 1, 3
F_SETOWN_EX, F_OWNER_TID, F_OWNER_PID = 15, 0, 1
EPOLLONESHOT = 1 << 30
EP_PRIVATE_BITS = 0xF << 28         # EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET
EPOLL_ANY = 0x2007                  # EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP
EPOLL_EVENT = struct.Struct("<IQ")  # struct epoll_event, packed on x86-64
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND, CLONE_PARENT = 0x100, 0x200, 0x400, 0x800, 0x8000
CLONE_THREAD, CLONE_SYSVSEM, CLONE_SETTLS = 0x10000, 0x40000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x100000, 0x200000, 0x1000000
# advice bit -> (madvise to set it, madvise to clear it; None: none, THP's two exclude each
# other; MADV_NORMAL, 0, clears the readahead advice)
MADV: dict[int, tuple[int, int | None]] = {
    ADV_DONTDUMP: (16, 17), ADV_DONTFORK: (10, 11), ADV_WIPEONFORK: (18, 19), ADV_HUGEPAGE: (14, None),
    ADV_NOHUGEPAGE: (15, None), ADV_MERGEABLE: (12, 13), ADV_RANDOM: (1, 0), ADV_SEQUENTIAL: (2, 0)}
CLUSTER = ("vvar", "vvar_vclock", "vdso")
MADV_DONTNEED = 4
SHM_RDONLY, SHM_REMAP, SHM_EXEC = 0o10000, 0o40000, 0o100000


@dataclass
class ProcessRecords:
    """One process's records as they arrive, from an image or a live stream, for ``finish``."""

    state: ProcessState | None = None
    files: Files | None = None
    pipes: Pipes = field(default_factory=lambda: Pipes(()))
    sockets: UnixSockets = field(default_factory=lambda: UnixSockets(()))
    events: EventFiles = field(default_factory=lambda: EventFiles(()))
    inet: InetSockets = field(default_factory=lambda: InetSockets(()))
    contents: list[FileContents] = field(default_factory=list)
    threads: list[ThreadState] = field(default_factory=list)

    def take(self, item: object) -> bool:
        """Keep ``item`` if it is one of these records (False: it is not)."""
        if isinstance(item, ProcessState):
            self.state = item
        elif isinstance(item, Files):
            self.files = item
        elif isinstance(item, Pipes):
            self.pipes = item
        elif isinstance(item, UnixSockets):
            self.sockets = item
        elif isinstance(item, EventFiles):
            self.events = item
        elif isinstance(item, InetSockets):
            self.inet = item
        elif isinstance(item, ThreadState):
            self.threads.append(item)
        elif isinstance(item, FileContents):
            self.contents.append(item)
        else:
            return False
        return True

    @property
    def complete(self) -> bool:
        return self.state is not None and self.files is not None and bool(self.threads)

    def fds(self) -> FdState:
        assert self.files is not None
        return FdState(self.files, self.pipes, self.sockets, self.events, tuple(self.contents), inet=self.inet)


@dataclass
class RestoreReport:
    pid: int = 0
    warnings: list[str] = field(default_factory=list)
    pages_written: int = 0
    pages_filled: int = 0          # of them, put in place by UFFDIO_COPY (agent.fill)
    pages_shared: int = 0          # of them, held already as its parent's (agent.inherited)
    syscalls: int = 0


def _fired(w: EpollWatch) -> bool:
    """A one-shot epoll watch that has fired (disabled, waiting to be re-armed)."""
    return bool(w.events & EPOLLONESHOT) and not w.events & ~EP_PRIVATE_BITS


def _map_type(v: Vma) -> int:
    """The mmap type of an anonymous mapping: shared, droppable (VmFlags dp: the kernel may drop
    its pages under memory pressure) or private."""
    return MAP_SHARED if v.shared else MAP_DROPPABLE if v.advice & VMA_DROPPABLE else MAP_PRIVATE


def _map_failed(v: Vma, err: int) -> str:
    why = f"cannot map {v.path or v.kind} at {v.start:#x}-{v.end:#x}: {os.strerror(err)}"
    if err == errno.EINVAL and v.advice & VMA_DROPPABLE:
        why += " (a MAP_DROPPABLE mapping: the kernel here needs to be Linux 6.11 or later)"
    return why


def _file_mode(v: Vma) -> int:
    """How a mapped file is opened: a shared mapping the process may mprotect writable needs
    it opened for writing."""
    return os.O_RDWR if v.shared and (v.prot & PROT_WRITE or v.advice & VMA_MAYWRITE) else os.O_RDONLY


class _Opens:
    """The files a batch of ``Restorer._carry_out`` opens, maps and closes: the fd each open
    gets (-1: not known yet), where each openat2 sits among the calls (to check that fd), and
    the scratch (pages 1-3) their paths and open_how structs fill until the batch runs."""

    def __init__(self) -> None:
        self.fd = -1
        self.at: list[int] = []
        self.hows: dict[int, int] = {}     # open flags -> address of their open_how
        self._used = 0

    def room(self, flags: int, path_len: int) -> bool:
        """Whether a path of ``path_len`` bytes opened with ``flags`` fits in the scratch."""
        return self._used + _align8(path_len) + (0 if flags in self.hows else 24) <= CREDS_SCRATCH

    def take(self, n: int) -> int:
        """Where the next ``n`` bytes go: an offset in the scratch."""
        at = self._used
        self._used += _align8(n)
        return at

    def clear(self) -> None:
        self.fd = -1
        self.at.clear()
        self.hows.clear()
        self._used = 0


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _path_arg(path: str) -> bytes:
    """A path the image names, as openat2 takes it (NUL-terminated)."""
    name = os.fsencode(path) + b"\0"
    if len(name) > PAGE_SIZE:
        raise RestoreError(f"a path of {len(name)} bytes in the image, longer than any path: corrupt image")
    return name


def _open_how(flags: int, mode: int = 0) -> bytes:
    """openat2's struct open_how: no symbolic link in the path is followed."""
    return struct.pack("<QQQ", flags, mode, RESOLVE_NO_SYMLINKS)


def _extra_flags(v: Vma) -> int:
    """mmap flags a mapping had beside its kind: a stack's MAP_GROWSDOWN, MAP_NORESERVE."""
    return (MAP_GROWSDOWN if v.growsdown else 0) | (MAP_NORESERVE if v.advice & VMA_NORESERVE else 0)


def _holes_conflict(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    return any(s < end and start < e for s, e in ranges)


def find_free(size: int, taken: list[tuple[int, int]], *, low: int = 0x1000_0000,
              high: int = 0x7F00_0000_0000) -> int:
    """An address where ``size`` bytes overlap nothing in ``taken``."""
    addr = low
    for s, e in sorted(taken) + [(TASK_SIZE, TASK_SIZE)]:
        if e <= addr:
            continue
        if s >= addr + size and addr + size <= high:
            return addr
        addr = max(addr, (e + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    raise RestoreError("no free address range for the restore gadget")


def _attachments(vmas: Sequence[Vma]) -> list[list[Vma]]:
    """``vmas`` (sorted) in groups: the pieces of one SysV attachment together (adjacent, the
    same segment, offsets in a row: what mprotect made of one shmat), every other one alone."""
    groups: list[list[Vma]] = []
    for v in vmas:
        last = groups[-1][-1] if groups else None
        if v.shm is not None and last is not None and last.shm is not None and last.shm.shmid == v.shm.shmid \
                and last.end == v.start and last.pgoff + last.length == v.pgoff:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def _segments(vmas: Sequence[Vma]) -> list[list[Vma]]:
    """The groups of ``_attachments`` that are SysV attachments (the pieces of one are
    neighbours: leaving the other mappings out first groups them alike, in a pass over
    the few)."""
    return _attachments([v for v in vmas if v.shm is not None])


def _group_orphaned(pid: int) -> bool:
    """Is ``pid``'s process group orphaned (POSIX): no member has a parent in another group
    of the same session? Where it is, the kernel drops SIGTSTP, SIGTTIN and SIGTTOU."""
    pgid, sid = os.getpgid(pid), os.getsid(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            ppid = int(read_stat(int(entry))[4])
            if ppid and os.getpgid(ppid) != pgid and os.getsid(ppid) == sid:
                return False
        except (OSError, NoSuchProcess):
            continue
    return True


def _droppable(layout: Sequence[Vma]) -> list[Span]:
    """The MAP_DROPPABLE memory of ``layout``, which comes back empty. The kernel may drop its
    pages at any time, and its users refill it: glibc keeps getrandom()'s state there, and a
    state carried along would make two processes restored from one image draw the same random
    bytes. Emptied, it is seeded again on first use, as after a drop (and as CRIU does)."""
    return merge_spans((v.start, v.end) for v in layout if v.advice & VMA_DROPPABLE)


def _without(batch: PageBatch, skip: list[Span]) -> PageBatch:
    """``batch`` less its pages in ``skip`` (sorted, merged)."""
    runs: list[tuple[int, int]] = []
    parts: list[bytes] = []
    view = memoryview(batch.data).cast("B")
    off = 0
    for addr, n in batch.runs:
        for start, end in subtract_spans([(addr, addr + n * PAGE_SIZE)], skip):
            runs.append((start, (end - start) // PAGE_SIZE))
            parts.append(bytes(view[off + start - addr: off + end - addr]))
        off += n * PAGE_SIZE
    return replace(batch, runs=tuple(runs), data=b"".join(parts))


def _advice_calls(start: int, end: int, advice: int, before: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """The madvise calls that take [start, end) from advice ``before`` to ``advice``."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for bit, (on, off) in MADV.items():
        if advice & bit and not before & bit:
            out.append(("madvise", (start, end - start, on)))
        elif before & bit and not advice & bit and off is not None:
            out.append(("madvise", (start, end - start, off)))
    return out


def _takes_pages(v: Vma) -> bool:
    """Pages may be written into it (a file mapped shared takes none: they would be written
    into the file)."""
    return not (v.shared and v.kind == "file")


def _deleted_private(v: Vma) -> bool:
    """A deleted file (a memfd) mapped privately: its maps line names it ``PATH (deleted)``."""
    return not v.shared and v.path.endswith(" (deleted)")


@contextmanager
def _said_as_restore_errors() -> Iterator[None]:
    """A failed injected call, or the stub gone, as the ``RestoreError`` a restore reports."""
    try:
        yield
    except InjectionError as exc:
        raise RestoreError(f"restore failed: {exc.strerror}") from None
    except ptrace.TraceeGone as exc:
        raise RestoreError(f"the process being restored died: {exc}") from None


class Restorer:
    """Drives one stub into the process described by the records it is given."""

    def __init__(self, header: ImageHeader, deferred: Sequence[str] = (), *, keep_ids: bool = True,
                 stub_pid: int = 0, forked_from: "Restorer | None" = None,
                 shared: SharedObjects | None = None, affinity: str = "refuse", cgroup: str | None = None,
                 cgroup_hint: tuple[str, ...] = ()) -> None:
        """``keep_ids``: the process gets its pid (``header.pid``) and its threads their tids
        back, as a parent's waitpid() and pidfiles expect; off, it gets new ones.
        ``stub_pid``: a stub made already (``fork``, for a process tree), seized and stopped;
        ``forked_from``: the restorer of the stub it was forked from (its memory is a copy of
        that one's, which may have begun: a process that joined a tree during a live migration). ``shared``: the shared memory
        objects of the processes restored together (each maps its own otherwise). ``affinity``:
        a thread pinned to CPUs this host lacks fails the restore ("refuse"), or is pinned to
        those it has and the report warns ("warn", ``agent.sched``). ``cgroup``: the unified
        cgroup to put it in instead of its own (``--cgroup``); ``cgroup_hint``: the cgroups it
        was in at the source, on another host (``join_cgroups_early``)."""
        check_machine(header, xsave_supported_mask())
        sched.check_affinity(affinity)
        self.affinity = affinity
        self._numa_threads = False        # a thread has a NUMA policy (``_thread_setup``)
        self.cgroup = cgroup
        self.cgroup_hint = cgroup_hint
        self.header = header
        self.keep_ids = keep_ids
        self.deferred = [d.rstrip("/") or "/" for d in deferred]   # files here are mapped in finish()
        self._placeholders: dict[tuple[int, int], Vma] = {}
        self._placeholder_pages: set[int] = set()      # pages written into placeholders
        self.report = RestoreReport()
        self._counting = threading.Lock()     # write_pages runs in several threads at once
        self.pid = 0
        self.mem: RemoteMemory | None = None
        self.inj: Injector | None = None
        self.gadget = 0
        self.layout: list[Vma] = []
        self._mapped: list[Span] = []          # the layout's ranges that take pages, merged, for bounds checks
        self._mapped_starts: list[int] = []
        self.filler: MissingFiller | None = None    # pages into memory the stub has none of yet
        self.threads: dict[int, int] = {}     # image tid -> new tid
        self._stopped = False
        self._job_stopped = False              # let go into a job-control stop, as it was frozen
        self._stop_signal: int = signal.SIGSTOP     # by the signal that had stopped it
        # A stub forked from one that had begun holds a copy of that one's memory, not the
        # stub program's: its system calls go through that one's gadget, and the stack pointer
        # it starts with points into that one's scratch (0, 0: a stub program's memory).
        self._clone_gadget, self._clone_scratch = forked_from.memory_for_clones() if forked_from else (0, 0)
        self.forked_from = forked_from      # its parent in the tree, restored with it
        # Forked from one whose memory is in: the parent's private memory it holds
        # (the parent's layout then), kept where its own layout has it too, and the ranges
        # still as inherited, where a page of its first copy is written only if it differs
        # (``agent.inherited``). Forked from a helper that holds a copy of such memory (a
        # session's, ``agent.sessions``): that memory.
        self._inherit: list[Vma] = []
        if forked_from is not None and forked_from.begun:
            self._inherit = [v for v in forked_from.layout if parent_frames.inheritable(v) and not forked_from._is_deferred(v)]
        elif forked_from is not None:
            self._inherit = list(forked_from._inherit)
        self._inherited: list[Span] = []
        # While its first copy comes (None: not inherited, or the copy is done): the ranges
        # it brought, inherited memory outside which is a hole at the source (``end_first_copy``).
        self._first_copy: list[Span] | None = None
        # The source said which pages of the first copy are its parent's, all of them
        # (``ParentPages.complete``): the others are written without comparing.
        self._own_beyond = False
        self.exited = False          # ended by ``exit_as``: a zombie until its parent waits
        self.shared = shared
        self._foreign: list[Span] = []        # SysV segments the source still attaches: no pages go in
        self._dropped: list[Span] = []        # MAP_DROPPABLE memory: no pages go in (``_droppable``)
        self._carried: Descriptions | None = None     # in finish(): the deleted files made again
        self._dirs: dict[str, tuple[tuple[int, int], str]] = {}   # cwd, root: (dev, ino) the process may enter
        self.memory_ready = False      # the memory's part of finish() was done early (``prepare``)
        self.running_ns = 0
        if stub_pid:
            self.pid = self.report.pid = stub_pid
            self._stopped = True

    # -- 1. the stub ------------------------------------------------------------------------

    @property
    def begun(self) -> bool:
        return self.mem is not None

    def memory_for_clones(self) -> tuple[int, int]:
        """For a stub forked from this one: the syscall gadget and the scratch its copy of this
        one's memory holds ((0, 0): the stub program's, which hold no gadget or scratch)."""
        if self.begun:
            return self.gadget, self._scratch(CLONE_SCRATCH)
        return self._clone_gadget, self._clone_scratch

    def join_cgroups_early(self) -> None:
        """The stub joins the cgroups it will run in now, not in ``finish``: a move between
        cgroups takes the kernel's threadgroup rwsem for writing (``cgroup_attach_lock``),
        which waits out an RCU grace period (8 ms here) for each hierarchy it moves in, and
        ``finish`` runs while the job is frozen. Only where its cgroups here are not the ones
        the source process runs in: those of a job from another host (``cgroup_hint``), or the
        one the user chose (``--cgroup``); on the same host the job's own cgroup would be
        charged its memory twice during pre-copy. ``finish`` places it as the job's final state
        says, which then moves nothing unless its cgroups changed meanwhile, and warns of what
        it cannot do; so nothing is said here."""
        if not self.cgroup_hint and self.cgroup is None:
            return
        try:
            cgroups.place(self.pid, self.cgroup_hint, socket.gethostname(), self.cgroup)
        except (MigrationError, OSError):
            pass

    def spawn_stub(self) -> None:
        """The stub this process is rebuilt in: made, seized and stopped."""
        try:
            self.pid = self._spawn()
        except stub.PidTaken as exc:
            raise RestoreError(f"pid {exc.pid} is taken on {socket.gethostname()} ({_holder(exc.pid)}): the "
                               "process keeps its pid; end that process first, or restore under a new pid "
                               "with --new-pid", pid=exc.pid) from None
        except OSError as exc:
            raise RestoreError(f"could not create the process to restore into: {exc.strerror}") from None
        self.report.pid = self.pid
        try:
            # EXITKILL: if the restorer dies before resume, the half-built process dies with it
            # (and its children made by ``fork``, which inherit these options).
            ptrace.seize(self.pid, STUB_OPTIONS)
            ptrace.interrupt(self.pid)
            ptrace.wait_stop(self.pid)
            self._stopped = True
            # The stub makes itself a session leader as it starts; stopped before it got there,
            # it is made one here. Else the restored process would stay in the restorer's
            # session and group, where a terminal's Ctrl-C or hang-up would end it.
            if os.getsid(self.pid) != self.pid:
                self.stub_call("setsid")
            self.join_cgroups_early()
        except (OSError, ptrace.TraceeGone) as exc:
            raise RestoreError(f"could not prepare the process to restore into: {exc}") from None

    def fork(self, pid: int, *, sibling: bool = False) -> int:
        """A child of this stub (not begun yet) with ``pid``, seized and stopped: the stub of
        a child in a process tree. Its parent is this process, as in the tree; ``sibling``:
        this process's parent (CLONE_PARENT: a helper hands its session to a child of its
        parent's, ``agent.sessions``)."""
        try:
            child = _while_going(pid, lambda: self._clone_child(pid, CLONE_PARENT if sibling else 0))
        except stub.PidTaken:
            raise RestoreError(f"pid {pid} is taken on {socket.gethostname()} ({_holder(pid)}): a process tree "
                               "keeps its pids; end that process first", pid=pid) from None
        self._wait_clone_child(child)
        return child

    def _clone_child(self, pid: int, flags: int = 0) -> int:
        # (clone3 takes no exit signal with CLONE_PARENT: the child gets the caller's, SIGCHLD)
        exit_signal = 0 if flags & CLONE_PARENT else signal.SIGCHLD
        if self.begun:     # rebuilding already: through the gadget, arguments in its scratch
            assert self.inj is not None
            at = self._scratch(CLONE_SCRATCH)
            self._put(struct.pack("<i", pid) + bytes(12) + stub.clone_args(flags, exit_signal, at, 1), CLONE_SCRATCH)
            child = self.inj.raw(NR["clone3"], at + 16, stub.CLONE_ARGS_SIZE_VER2)
        else:
            with Injector(self.pid, self._clone_gadget or stub.STUB_SYSCALL) as inj:
                mem = RemoteMemory(self.pid)
                try:
                    # the stub's stack, below what it uses; or its copy of the scratch it was forked from
                    at = self._clone_scratch or (inj.saved_regs.rsp - 1024) & ~15
                    args = stub.clone_args(flags, exit_signal, at, 1)
                    mem.write(at, struct.pack("<i", pid) + bytes(12) + args)
                    child = inj.raw(NR["clone3"], at + 16, len(args))
                finally:
                    mem.close()
        if child == -errno.EEXIST:
            raise stub.PidTaken(pid)
        if child < 0:
            raise RestoreError(f"could not create process {pid}: {os.strerror(-child)}", pid=pid)
        return child

    def stub_call(self, name: str, *args: int) -> int:
        """One system call in the stub (sessions and groups of a tree)."""
        if self.begun:
            return self._call(name, *args)
        with Injector(self.pid, self._clone_gadget or stub.STUB_SYSCALL) as inj:
            return inj.call(name, *args)

    def exit_as(self, status: int) -> None:
        """End this stub as the process it stands for ended (a zombie in a tree): its
        parent's wait() collects ``status``. Killed by a signal: without a core dump."""
        try:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                prlimit(self.pid, RLIMIT_CORE, (0, 0))
                # The stub blocks every signal it can: this one goes through (PTRACE_SETSIGMASK).
                ptrace.set_sigmask(self.pid, ptrace.get_sigmask(self.pid) & ~(1 << (sig - 1)))
                # Queued first: PTRACE_DETACH delivers its signal only from a signal-delivery
                # stop, and the stub is in another; queued, the stub takes it as it leaves.
                os.kill(self.pid, sig)
                try:
                    ptrace.detach(self.pid, sig)
                except OSError as exc:
                    if exc.errno != errno.ESRCH:       # (SIGKILL has ended it already)
                        raise
                deadline = time.monotonic() + ZOMBIE_GRACE_S
                while _state(self.pid) not in ("Z", None):
                    if time.monotonic() > deadline:        # (blocked, or caught: not the stub's)
                        raise RestoreError(f"process {self.pid} did not end by signal {sig} as its image says "
                                           "it had")
                    time.sleep(0.001)          # dead before anything else is built
            else:
                inj = self.inj or Injector(self.pid, self._clone_gadget or stub.STUB_SYSCALL)
                try:
                    inj.raw(NR["exit_group"], os.WEXITSTATUS(status))
                except ptrace.TraceeGone:
                    pass
                else:
                    raise RestoreError(f"process {self.pid} did not exit as its image says it had")
        except OSError as exc:
            raise RestoreError(f"could not end process {self.pid} as it had ended: {exc}") from None
        self._stopped = False
        self.exited = True
        self.close()

    def remove(self, parent: "Restorer | None") -> None:
        """Destroy this stub of a process that left its tree during a live migration, and
        have ``parent`` (its parent's stub, if that stays) reap it: no zombie is left for the
        restored parent's wait() to find."""
        self.abort()
        if parent is not None and not parent.exited:   # (an exited one's orphans go to init, which reaps)
            parent.stub_call("wait4", self.pid, 0, WALL | WNOHANG, 0)   # never blocks: reaped as tracer above

    def begin(self, target: Mappings) -> None:
        if not self.pid:
            self.spawn_stub()
        try:
            self.threads = {}
            self.mem = RemoteMemory(self.pid)
            # A stub forked from one being rebuilt runs its first calls through that one's
            # gadget (it holds a copy of its memory): then it is cleared like a fresh stub.
            self.inj = Injector(self.pid, self._clone_gadget or stub.STUB_SYSCALL)
            self._setup_gadget(target)
        except (OSError, ptrace.TraceeGone) as exc:
            raise RestoreError(f"could not prepare the process to restore into: {exc}") from None
        try:
            self.filler = MissingFiller(self.pid, self.inj, self.mem)
        except OSError:
            self.filler = None      # no userfaultfd here: every page goes through /proc/PID/mem

    def _spawn(self) -> int:
        """The stub, under the image's pid if ids are kept, in a time namespace of its own
        where its clocks need one to go on as it saw them (``agent.timens``)."""
        h = self.header
        offsets = timens.needed(timens.Clocks(h.monotonic_ns, h.boottime_ns, h.realtime_ns),
                                same_boot=(h.timens_monotonic_ns, h.timens_boottime_ns)
                                if h.boot_id and h.boot_id == boot_id() else None)

        def spawn(pid: int | None = None) -> int:
            return stub.spawn(pid) if offsets is None else timens.spawn_in(offsets, lambda: stub.spawn(pid))
        if not self.keep_ids:
            return spawn()
        return _while_going(h.pid, lambda: spawn(h.pid))

    def _call(self, name: str, *args: int) -> int:
        assert self.inj is not None
        self.report.syscalls += 1
        return self.inj.call(name, *args)

    # -- sockets made as the process (``agent.peercred``) ---------------------------------

    @contextmanager
    def _acting_as(self, uid: int, gid: int) -> Iterator[None]:
        """The process's effective uid and gid switched to ``uid``/``gid`` meanwhile (its real
        and saved ids stay, so they switch back)."""
        ids = {k: int(v.split()[1]) for k, _, v in (line.partition(":") for line in
                                                     read_text(self.pid, "status").splitlines()) if k in ("Uid", "Gid")}
        keep = U64                   # -1: this id stays
        if gid != ids["Gid"]:
            self._call("setresgid", keep, gid, keep)
        if uid != ids["Uid"]:
            self._call("setresuid", keep, uid, keep)
        try:
            yield
        finally:
            if uid != ids["Uid"]:
                self._call("setresuid", keep, ids["Uid"], keep)
            if gid != ids["Gid"]:
                self._call("setresgid", keep, ids["Gid"], keep)

    @contextmanager
    def _lent(self, sock: socket.socket) -> Iterator[int]:
        """Our socket ``sock`` as an fd of the process, meanwhile."""
        pidfd = self._call("pidfd_open", os.getpid(), 0)
        try:
            fd = self._call("pidfd_getfd", pidfd, sock.fileno(), 0)
        finally:
            self._call("close", pidfd)
        try:
            yield fd
        finally:
            self._call("close", fd)

    def socketpairs_as(self, wanted: Sequence[tuple[int, int, int]]) -> list[tuple[socket.socket, socket.socket]]:
        """Unix socketpairs made by this process (so SO_PEERCRED names its pid), each (type, uid,
        gid) of ``wanted`` with its effective ids switched to those for the call and back: all
        in one batch of calls, the ends then taken and closed in another. Both ends are ours."""
        ids = {k: int(v.split()[1]) for k, _, v in (line.partition(":") for line in
                                                     read_text(self.pid, "status").splitlines()) if k in ("Uid", "Gid")}
        keep = U64                   # -1: this id stays
        out: list[tuple[socket.socket, socket.socket]] = []
        for first in range(0, len(wanted), PAIRS_AT_ONCE):
            chunk = wanted[first:first + PAIRS_AT_ONCE]
            at = self._put(bytes(8 * len(chunk)), SOCKET_SCRATCH)
            calls: list[tuple[str, tuple[int, ...]]] = []
            for i, (type_, uid, gid) in enumerate(chunk):
                gids: list[Call] = [("setresgid", (keep, gid, keep)), ("setresgid", (keep, ids["Gid"], keep))] \
                    if gid != ids["Gid"] else []
                uids: list[Call] = [("setresuid", (keep, uid, keep)), ("setresuid", (keep, ids["Uid"], keep))] \
                    if uid != ids["Uid"] else []
                pair: Call = ("socketpair", (int(socket.AF_UNIX), type_ | socket.SOCK_CLOEXEC, 0, at + 8 * i))
                calls += gids[:1] + uids[:1] + [pair] + uids[1:] + gids[1:]
            self._run_batch(calls, [("make a unix socketpair as the process that made it", None)] * len(calls))
            assert self.mem is not None
            theirs = struct.unpack(f"<{2 * len(chunk)}i", self.mem.read(at, 8 * len(chunk)))
            pidfd = pidfd_open(self.pid)
            try:
                ours = [pidfd_getfd(pidfd, fd) for fd in theirs]
            finally:
                os.close(pidfd)
                closes: list[tuple[str, tuple[int, ...]]] = [("close", (fd,)) for fd in theirs]
                self._run_batch(closes, [("close what it lent", None)] * len(closes))
            out += [(socket.socket(fileno=ours[2 * i]), socket.socket(fileno=ours[2 * i + 1]))
                    for i in range(len(chunk))]
        return out

    def listen_as(self, sock: socket.socket, backlog: int, uid: int, gid: int) -> None:
        """``sock.listen(backlog)`` by this process as ``uid``/``gid``: its clients' SO_PEERCRED
        names it."""
        with self._lent(sock) as fd, self._acting_as(uid, gid):
            self._call("listen", fd, backlog)

    def connect_as(self, sock: socket.socket, name: bytes, uid: int, gid: int) -> None:
        """``sock.connect(name)`` by this process as ``uid``/``gid`` (its rights reach the name):
        the connection accepted from it names this process to SO_PEERCRED."""
        addr = struct.pack("<H", socket.AF_UNIX) + name + (b"" if name[:1] == b"\0" else b"\0")
        at = self._put(addr, SOCKET_SCRATCH)
        with self._lent(sock) as fd, self._acting_as(uid, gid):
            try:
                self._call("connect", fd, at, len(addr))
            except InjectionError as exc:
                if exc.errno == errno.EAGAIN:       # ``sock`` does not block: the backlog is full
                    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN)) from None
                raise

    def _setup_gadget(self, target: Mappings) -> None:
        assert self.mem is not None and self.inj is not None
        own = read_maps(self.pid)
        taken = [(m.start, m.end) for m in own if m.kind != "vsyscall"]
        taken += [(v.start, v.end) for v in target.vmas if v.kind != "vsyscall"]
        size = GADGET_PAGES * PAGE_SIZE
        self.gadget = find_free(size, taken)
        self._call("mmap", self.gadget, size, PROT_READ | PROT_WRITE | PROT_EXEC,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        self.mem.write(self.gadget, b"\x0f\x05\xcc")
        self.mem.write(self.gadget + BATCH_CODE_OFFSET, BATCH_CODE)
        self.inj.gadget = self.gadget
        self._call("close_range", 0, 0xFFFF_FFFF, 0)
        # Unmap the stub itself: everything but the gadget and the vDSO cluster, and the
        # memory inherited from a parent (the layout then keeps what this process has too),
        # but where this process's vDSO cluster goes.
        cluster = merge_spans((v.start, v.end) for v in target.vmas if is_special(v))
        self._inherit = [piece(v, start, end) for v in self._inherit
                         for start, end in subtract_spans([(v.start, v.end)], cluster)]
        keep = merge_spans((v.start, v.end) for v in self._inherit)
        for m in own:
            if m.kind in CLUSTER or m.kind == "vsyscall":
                continue
            for start, end in subtract_spans([(m.start, m.end)], keep):
                self._call("munmap", start, end - start)
        self._move_cluster(own, target)
        self.layout = list(self._inherit)
        self._inherited = keep
        self._first_copy = [] if keep else None

    def _move_cluster(self, own: list[MapEntry], target: Mappings) -> None:
        mine = {m.kind: m for m in own if m.kind in CLUSTER}
        theirs = {v.kind: v for v in target.vmas if v.kind in CLUSTER}
        for kind, m in mine.items():
            if kind not in theirs:
                self._call("munmap", m.start, m.length)
            elif theirs[kind].length != m.length:
                raise RestoreError(
                    f"the [{kind}] mapping is {theirs[kind].length} bytes in the image but {m.length} here: "
                    "restore on a host running the same kernel")
        moving = {k: m for k, m in mine.items() if k in theirs}
        if not moving or all(m.start == theirs[k].start for k, m in moving.items()):
            return
        # Via a free spot first, so no part lands on another part that has not moved yet.
        lo = min(m.start for m in moving.values())
        hi = max(m.end for m in moving.values())
        taken = [(v.start, v.end) for v in target.vmas] + [(lo, hi), (self.gadget, self.gadget + GADGET_PAGES * PAGE_SIZE)]
        spot = find_free(hi - lo, taken)
        for m in moving.values():
            self._call("mremap", m.start, m.length, m.length, MREMAP_MAYMOVE | MREMAP_FIXED, spot + m.start - lo)
        for k, m in moving.items():
            self._call("mremap", spot + m.start - lo, m.length, m.length, MREMAP_MAYMOVE | MREMAP_FIXED,
                       theirs[k].start)

    # -- 2. the layout ----------------------------------------------------------------------

    def _scratch(self, offset: int = 0) -> int:
        return self.gadget + PAGE_SIZE + offset

    def _put(self, data: bytes, offset: int = 0) -> int:
        assert self.mem is not None
        if PAGE_SIZE + offset + len(data) > GADGET_PAGES * PAGE_SIZE:
            raise RestoreError("restore scratch area overflow (a path or list is too long)")
        addr = self._scratch(offset)
        self.mem.write(addr, data)
        return addr

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        """Open a path the image names, in the stub: no symbolic link in it is followed
        (openat2 RESOLVE_NO_SYMLINKS). Still with the stub's rights: ``_check_access`` makes
        sure the process itself may open what it was given, before it runs."""
        return self._call("openat2", *self._openat2_args(path, flags, mode))

    def _openat2_args(self, path: str, flags: int, mode: int = 0) -> tuple[int, int, int, int]:
        """``_open``'s openat2 arguments, its path and open_how put in the scratch."""
        addr = self._put(_path_arg(path), PAGE_SIZE)          # clear of what the callers put below
        how = self._put(_open_how(flags, mode), 2 * PAGE_SIZE)
        return AT_FDCWD, addr, how, 24

    def _clear_of_gadget(self, start: int, end: int) -> None:
        if _holes_conflict(start, end, [(self.gadget, self.gadget + GADGET_PAGES * PAGE_SIZE)]):
            raise RestoreError(f"mapping {start:#x}-{end:#x} collides with the restore gadget")

    def apply_layout(self, target: Mappings | MappingsDelta) -> None:
        """Make the address space match ``target`` (first call: from empty). A later layout
        keeps the contents of what is still mapped with the same backing (``agent.layout_plan``).
        A ``MappingsDelta`` changes only its ranges: its cost is the mappings it names."""
        if isinstance(target, MappingsDelta):
            self._apply_delta(target)
            return
        new = [v for v in target.vmas if not is_special(v)]
        plan = plan_layout(self.layout, new)
        if self._inherited:
            self._inherited = intersect_spans(self._inherited, list(plan.kept))
        if self.shared is not None:
            for v in new:
                if v.shm is not None:
                    self.shared.note(v.shm)     # marked IPC_RMID since it was attached, maybe
        self._carry_out(plan)
        if self.filler is not None:
            self.filler.keep([(v.start, v.end) for v in new])
            self.filler.register(list(plan.map))
        self.layout = new
        # A file mapped shared takes no pages: they would be written into the file.
        self._mapped = merge_spans((v.start, v.end) for v in new if _takes_pages(v))
        self._mapped_starts = [start for start, _ in self._mapped]
        self._dropped = _droppable(new)
        self._placeholders = {(v.start, v.end): v for v in new if self._is_deferred(v)}
        self._placeholder_pages = {p for p in self._placeholder_pages if within(plan.kept, p)}

    def _carry_out(self, plan: LayoutPlan) -> None:
        """The plan's system calls, in order, in batches (``Injector.batch``): a mapping costs
        a table entry, not a stop of the process. A file's open, mmap and close go in the
        batch too (``_add_file``: its fd is known before the open runs); the other mappings
        whose calls feed each other go alone between batches."""
        calls: list[tuple[str, tuple[int, ...]]] = []
        whats: list[tuple[str, Vma | None]] = []
        opens = _Opens()
        for start, end in plan.unmap:
            calls.append(("munmap", (start, end - start)))
            whats.append((f"unmap {start:#x}-{end:#x}", None))
        for group in _attachments(plan.map):
            v = group[0]
            if v.shm is not None and self.shared is not None:
                self._run_batch(calls, whats, opens)
                self._map_attachment(group)     # one shmat for the pieces mprotect made of it
                continue
            if self._file_in_batch(v):
                self._add_file(v, calls, whats, opens)
                continue
            if not self._plain(v):
                self._run_batch(calls, whats, opens)
                self._map(v)
                continue
            self._clear_of_gadget(v.start, v.end)
            flags = MAP_FIXED | MAP_ANONYMOUS | _map_type(v) | _extra_flags(v)
            calls.append(("mmap", (v.start, v.length, v.prot, flags, -1, 0)))
            whats.append(("map", v))
            for name, args in _advice_calls(v.start, v.end, v.advice):
                calls.append((name, args))
                whats.append(("map", v))
        for r in plan.reprotect:
            calls.append(("mprotect", (r.start, r.end - r.start, r.prot)))
            whats.append((f"reprotect {r.start:#x}-{r.end:#x}", None))
        for a in plan.readvise:
            for name, args in _advice_calls(a.start, a.end, a.advice, a.before):
                calls.append((name, args))
                whats.append((f"advise {a.start:#x}-{a.end:#x}", None))
        self._run_batch(calls, whats, opens)

    def _plain(self, v: Vma) -> bool:
        """Mapped by one mmap of anonymous memory (``_map``'s last case)."""
        return not (self._is_deferred(v) or v.kind == "file"
                    or (v.shared and v.kind == "anon" and v.ino and self.shared is not None))

    def _run_batch(self, calls: list[tuple[str, tuple[int, ...]]], whats: list[tuple[str, Vma | None]],
                   opens: "_Opens | None" = None) -> None:
        """Run ``calls`` (then empty both lists, and ``opens``); a failure names what it was
        for. Each open ``opens`` lists must have got the fd its mmap and close named."""
        assert self.inj is not None and self.mem is not None
        results: list[int] | None = [] if opens is not None and opens.at else None
        for i in range(0, len(calls), BATCH_MAX):
            chunk = calls[i: i + BATCH_MAX]
            done, err = self.inj.batch(self.gadget + BATCH_CODE_OFFSET, self._scratch(3 * PAGE_SIZE), self.mem, chunk,
                                       results=results)
            self.report.syscalls += min(done + 1, len(chunk))
            if done < len(chunk):
                what, v = whats[i + done]
                if v is not None:
                    raise RestoreError(_map_failed(v, -err))
                raise InjectionError(-err, f"{chunk[done][0]}() to {what} in pid {self.pid}: {os.strerror(-err)}")
        if opens is not None and results is not None:
            for at in opens.at:
                if results[at] != opens.fd:
                    v = whats[at][1]
                    raise RestoreError(f"{v.path if v is not None else 'a file'} was opened as fd {results[at]} in "
                                       f"the process being restored, not {opens.fd}: something else opens files in it")
        calls.clear()
        whats.clear()
        if opens is not None:
            opens.clear()

    def _file_in_batch(self, v: Vma) -> bool:
        """A file that ``_map`` would open and map (not deferred, carried or shared memory)."""
        return (v.kind == "file" and not self._is_deferred(v) and not _deleted_private(v)
                and not (v.shm is not None and self.shared is not None))

    def _add_file(self, v: Vma, calls: list[tuple[str, tuple[int, ...]]], whats: list[tuple[str, Vma | None]],
                  opens: "_Opens") -> None:
        """``_map`` of a file, as calls added to a batch: open (its path in the scratch, where
        ``opens`` has room), mmap with the fd the open will get (the stub's lowest free one:
        nothing else in the batch opens or closes one, and the close before it freed it), close."""
        self._clear_of_gadget(v.start, v.end)
        self._check_file(v)
        name = _path_arg(v.path)
        flags = _file_mode(v) | O_CLOEXEC | os.O_NONBLOCK
        if not opens.room(flags, len(name)):
            self._run_batch(calls, whats, opens)
        if opens.fd < 0:
            taken = {int(fd) for fd in os.listdir(f"/proc/{self.pid}/fd")}
            opens.fd = next(fd for fd in range(len(taken) + 1) if fd not in taken)
        if flags not in opens.hows:
            opens.hows[flags] = self._put(_open_how(flags), opens.take(24))
        path = self._put(name, opens.take(len(name)))
        opens.at.append(len(calls))
        calls += [("openat2", (AT_FDCWD, path, opens.hows[flags], 24)),
                  ("mmap", (v.start, v.length, v.prot, MAP_FIXED | _map_type(v) | _extra_flags(v), opens.fd, v.pgoff)),
                  ("close", (opens.fd,)), *_advice_calls(v.start, v.end, v.advice)]
        whats += [("map", v)] * (len(calls) - len(whats))

    def _apply_delta(self, delta: MappingsDelta) -> None:
        if not self.layout:
            raise ProtocolError("a layout change before any layout: corrupt stream")
        region = [(r.start, r.end) for r in delta.cleared]
        if _holes_conflict(self.gadget, self.gadget + GADGET_PAGES * PAGE_SIZE, region):
            raise RestoreError("a layout change covers the restore gadget: corrupt stream")
        news = list(delta.vmas)
        plan = plan_layout(in_ranges(self.layout, region), news)
        if self._inherited:
            cleared = merge_spans(region)
            self._inherited = merge_spans(subtract_spans(self._inherited, cleared) + intersect_spans(
                intersect_spans(self._inherited, cleared), list(plan.kept)))
        if self.shared is not None:
            for v in news:
                if v.shm is not None:
                    self.shared.note(v.shm)
        self._carry_out(plan)
        if self.filler is not None:
            self.filler.keep([(v.start, v.end) for v in news], within=region)
            self.filler.register(list(plan.map))
        self.layout = applied(self.layout, delta)
        self._mapped = splice_spans(self._mapped, region, merge_spans((v.start, v.end) for v in news if _takes_pages(v)))
        self._mapped_starts = [start for start, _ in self._mapped]
        self._dropped = _droppable(self.layout)
        for key in [k for k in self._placeholders if within(region, k[0])]:
            del self._placeholders[key]
        self._placeholders.update({(v.start, v.end): v for v in news if self._is_deferred(v)})
        self._placeholder_pages = {p for p in self._placeholder_pages if not within(region, p) or within(plan.kept, p)}

    def _advise(self, start: int, end: int, advice: int, before: int = 0) -> None:
        for name, args in _advice_calls(start, end, advice, before):
            self._call(name, *args)

    def _is_deferred(self, v: Vma) -> bool:
        """A file mapped in finish(): one a filesystem hook brings, or a deleted file mapped
        privately (made again from its carried contents with the fds, ``_map_carried``)."""
        if v.kind == "file" and (_deleted_private(v) or is_shm_path(v.path)):
            return self._carried is None       # /dev/shm files: made with the fds (``SharedObjects.add_files``)
        return v.kind == "file" and any(v.path == d or v.path.startswith(d.rstrip("/") + "/") for d in self.deferred)

    def _map_deferred(self) -> None:
        """Map the deferred files over their placeholders; put the pages written there back."""
        assert self.mem is not None
        self.deferred = []
        for (start, end), v in sorted(self._placeholders.items()):
            pages = sorted(p for p in self._placeholder_pages if start <= p < end) if not v.shared else []
            saved = [(p, self.mem.read(p, PAGE_SIZE)) for p in pages]
            self._map(v)
            for p, data in saved:
                self.mem.write(p, data)
        self._placeholders.clear()
        self._placeholder_pages.clear()

    def _map(self, v: Vma) -> None:
        self._clear_of_gadget(v.start, v.end)
        if v.shm is not None and self.shared is not None:
            self._map_attachment([v])
            return
        flags = MAP_FIXED | _map_type(v) | _extra_flags(v)
        try:
            if self._is_deferred(v):
                self._call("mmap", v.start, v.length, v.prot, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                self._placeholders[(v.start, v.end)] = v
            elif v.shared and v.kind == "anon" and v.ino and self.shared is not None:
                self._map_shared_object(v, flags)
            elif v.kind == "file" and _deleted_private(v):
                self._map_carried(v, flags)
            elif v.kind == "file":
                self._check_file(v)
                fd = self._open(v.path, _file_mode(v) | O_CLOEXEC | os.O_NONBLOCK)
                try:
                    self._call("mmap", v.start, v.length, v.prot, flags, fd, v.pgoff)
                finally:
                    self._call("close", fd)
            else:
                self._call("mmap", v.start, v.length, v.prot, flags | MAP_ANONYMOUS, -1, 0)
            self._advise(v.start, v.end, v.advice)
        except InjectionError as exc:
            raise RestoreError(_map_failed(v, exc.errno or 0)) from None

    def _map_attachment(self, pieces: Sequence[Vma], readonly: bool = False) -> None:
        self._clear_of_gadget(pieces[0].start, pieces[-1].end)
        try:
            self._attach(pieces, readonly)
        except InjectionError as exc:
            raise RestoreError(f"cannot attach SysV shared memory segment {pieces[0].ino} at {pieces[0].start:#x}-"
                               f"{pieces[-1].end:#x}: {exc.strerror}") from None

    def _map_shared_object(self, v: Vma, flags: int) -> None:
        """Shared anonymous memory: the tree's one object for it (``agent.shared_memory``),
        taken from the restorer with pidfd_getfd and mapped at its offset."""
        assert self.shared is not None
        try:
            ours = self.shared.fd_for(v.ino, v.pgoff + v.length)
        except OSError as exc:
            raise RestoreError(f"cannot make the shared memory at {v.start:#x}: {exc.strerror}") from None
        # Writable until ``_map_carried_files``: its pages are written through /proc/PID/mem,
        # which may write a private read-only mapping but not a shared one.
        self._map_from(ours, v, flags, v.prot | PROT_WRITE)

    def _attach(self, pieces: Sequence[Vma], readonly: bool) -> None:
        """One attachment of a SysV segment (``pieces``: its mappings, adjacent, with their
        offsets in a row, as mprotect splits one), made with an injected shmat so shmdt and
        the attach count work as before: at its address where it maps the whole segment,
        else at a free address, cut to its part and moved there; then each piece gets its
        protection. Writable until ``_map_carried_files`` (pages go in through
        /proc/PID/mem), unless ``readonly`` (SHM_RDONLY)."""
        first, last = pieces[0], pieces[-1]
        assert self.shared is not None and first.shm is not None
        seg = self.shared.segment(first.shm)
        start, end, pgoff = first.start, last.end, first.pgoff
        if seg.foreign:
            self._foreign.append((start, end))
        whole = -(-first.shm.size // PAGE_SIZE) * PAGE_SIZE
        exe = any(v.prot & PROT_EXEC for v in pieces)
        flags = (SHM_RDONLY if readonly else 0) | (SHM_EXEC if exe else 0)
        if pgoff == 0 and end - start == whole:
            self._call("shmat", seg.shmid, start, flags | SHM_REMAP)
        else:
            taken = [(m.start, m.end) for m in read_maps(self.pid)] + [(start, end)]
            addr = self._call("shmat", seg.shmid, find_free(whole, taken), flags)
            if pgoff:
                self._call("munmap", addr, pgoff)
            if pgoff + end - start < whole:
                self._call("munmap", addr + pgoff + end - start, whole - pgoff - (end - start))
            self._call("mremap", addr + pgoff, end - start, end - start, MREMAP_MAYMOVE | MREMAP_FIXED, start)
        attached = PROT_READ | (0 if readonly else PROT_WRITE) | (PROT_EXEC if exe else 0)
        for v in pieces:
            want = v.prot if readonly else v.prot | PROT_WRITE
            if want != attached:
                self._call("mprotect", v.start, v.length, want)
            self._advise(v.start, v.end, v.advice)

    def _map_carried_files(self, descriptions: Descriptions) -> None:
        """A deleted file (a memfd) the tree holds open and maps shared is one file: each
        mapping of it, restored as shared memory with its pages, is mapped again from the file
        made from its carried contents (the same bytes, frozen together), so the fds and the
        mappings of every process see each other's writes. The other shared memory objects
        take their protection (``_map_shared_object``)."""
        for group in _segments(self.layout) if self.shared is not None else []:
            if not any(v.advice & VMA_MAYWRITE for v in group):   # SHM_RDONLY: not writable by mprotect
                self._map_attachment(group, readonly=True)
            else:
                for v in group:
                    if not v.prot & PROT_WRITE:
                        self._call("mprotect", v.start, v.length, v.prot)
        for v in self.layout:
            if v.shm is not None:
                continue
            if not (v.shared and v.kind == "anon" and v.ino):
                continue
            ours = descriptions.deleted_file(v.ino)
            path = self.shared.file_paths.get(v.ino) if self.shared is not None else None
            if ours is None and path is not None:
                # A file of /dev/shm mapped under a name it no longer has (sem_open's): the
                # file the image carries by its own name, which the other processes map.
                self._map_path(path, v)
                continue
            if ours is None:
                if self.shared is not None and not v.prot & PROT_WRITE:
                    self._call("mprotect", v.start, v.length, v.prot)
                continue
            try:
                self._map_from(ours, v, MAP_FIXED | MAP_SHARED)
            except InjectionError as exc:
                raise RestoreError(f"cannot map the deleted file {v.ino} at {v.start:#x}-{v.end:#x}: "
                                   f"{exc.strerror}") from None
            self._advise(v.start, v.end, v.advice)

    def _map_path(self, path: str, v: Vma) -> None:
        """Map the shared mapping ``v`` (now shared memory) from the file at ``path`` instead."""
        try:
            ours = os.open(path, (os.O_RDWR if v.advice & VMA_MAYWRITE else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise RestoreError(f"cannot open {path} to map it at {v.start:#x}: {exc.strerror}") from None
        try:
            self._map_from(ours, v, MAP_FIXED | MAP_SHARED)
        except InjectionError as exc:
            raise RestoreError(f"cannot map {path} at {v.start:#x}-{v.end:#x}: {exc.strerror}") from None
        finally:
            os.close(ours)
        self._advise(v.start, v.end, v.advice)

    def _map_carried(self, v: Vma, flags: int) -> None:
        """A deleted file (a memfd) mapped privately, from the file made again of its carried
        contents (in finish(), over a placeholder whose written pages ``_map_deferred`` puts
        back)."""
        ours = self._carried.deleted_file(v.ino) if self._carried is not None else None
        if ours is None:
            raise RestoreError(f"{v.path[:-len(' (deleted)')]} is mapped by the process, deleted, but the image "
                               "lacks its contents: corrupt image")
        self._map_from(ours, v, flags)

    def _map_from(self, ours: int, v: Vma, flags: int, prot: int | None = None) -> None:
        """Map ``v`` from our fd ``ours``, taken by the process with pidfd_getfd."""
        pidfd = self._call("pidfd_open", os.getpid(), 0)
        try:
            fd = self._call("pidfd_getfd", pidfd, ours, 0)
        finally:
            self._call("close", pidfd)
        try:
            self._call("mmap", v.start, v.length, v.prot if prot is None else prot, flags, fd, v.pgoff)
        finally:
            self._call("close", fd)

    def _check_file(self, v: Vma) -> None:
        if self.shared is not None and v.path in self.shared.files:
            return          # carried: made here from its contents, or this very file
        try:
            st = os.stat(v.path)
        except OSError:
            raise RestoreError(f"{v.path} is mapped by the process but missing here: copy it to this host first") from None
        if not stat.S_ISREG(st.st_mode):
            raise RestoreError(f"{v.path} is mapped by the process but is not a regular file here: copy the "
                               "file to this host at the same path")
        # A live migration compared contents in preflight; an image restored where it was made
        # also has the modification time to go by.
        same_host = self.header.kind == "checkpoint" and self.header.hostname == socket.gethostname()
        mtime_differs = same_host and v.file_mtime_ns and st.st_mtime_ns != v.file_mtime_ns
        if v.file_size >= 0 and (st.st_size != v.file_size or mtime_differs):
            raise RestoreError(
                f"{v.path} changed since the checkpoint (size or modification time differs): the process "
                "would see different code or data; restore with the same file")

    # -- 3. pages ---------------------------------------------------------------------------

    def write_pages(self, batch: PageBatch) -> None:
        assert self.mem is not None
        for addr, n in batch.runs:
            if not self._covered(addr, n * PAGE_SIZE):
                raise RestoreError(f"page data at {addr:#x} lies outside the image's mappings, or in a file "
                                   "mapped shared (whose pages are the file's): corrupt image")
        if self._foreign:
            batch = _without(batch, merge_spans(self._foreign))
        if self._dropped:
            batch = _without(batch, self._dropped)
        if self._placeholders:
            for addr, n in batch.runs:
                for (start, end) in self._placeholders:
                    if start < addr + n * PAGE_SIZE and addr < end:
                        first, last = max(start, addr), min(end, addr + n * PAGE_SIZE)
                        self._placeholder_pages.update(range(first, last, PAGE_SIZE))
        runs, view = batch.runs, memoryview(batch.data).cast("B")
        if self._inherited:
            if self._first_copy is not None:
                with self._counting:
                    self._first_copy += [(a, a + n * PAGE_SIZE) for a, n in runs]
            if not self._own_beyond:
                runs, view = inherited.changed(self.mem.fd, runs, view, self._inherited)
        self._write_runs(runs, view)
        with self._counting:
            self.report.pages_written += batch.npages
            self.report.pages_shared += batch.npages - sum(n for _, n in runs)

    def _write_runs(self, runs: tuple[tuple[int, int], ...], view: memoryview) -> None:
        """Runs of pages already there (a later round's, often single scattered pages) go in
        with one process_vm_writev per IOV_MAX runs; from where that stops (a page the process
        has none of yet), one run goes the way of ``_write_run``, and so on."""
        base = data_address(view)
        i = off = 0
        while i < len(runs):
            chunk = runs[i: i + IOV_MAX]
            end = i + len(chunk)
            want = sum(n for _, n in chunk) * PAGE_SIZE
            try:
                done = process_vm_writev(self.pid, [(base + off, want)], [(a, n * PAGE_SIZE) for a, n in chunk])
            except OSError:
                done = 0
            while i < end and done >= runs[i][1] * PAGE_SIZE:    # whole runs written
                size = runs[i][1] * PAGE_SIZE
                done -= size
                off += size
                i += 1
            if i == end:
                continue
            addr, n = runs[i]           # stopped in this run, ``done`` bytes into it
            self._write_run(addr + done, view[off + done: off + n * PAGE_SIZE])
            off += n * PAGE_SIZE
            i += 1

    def _write_run(self, addr: int, data: memoryview) -> None:
        assert self.mem is not None
        if self.filler is not None:
            self.filler.write(addr, data)
        else:
            self.mem.write(addr, data)

    def _covered(self, addr: int, size: int) -> bool:
        """Is [addr, addr + size) mapped (by one mapping or adjacent ones)?"""
        i = bisect.bisect_right(self._mapped_starts, addr) - 1
        return i >= 0 and addr + size <= self._mapped[i][1]

    # -- 4. everything else -----------------------------------------------------------------

    def finish(self, proc: ProcessState, fds: FdState, threads: list[ThreadState],
               descriptions: Descriptions | None = None) -> None:
        """Restore the rest; the process is left stopped. Call ``resume`` to let it run.
        ``descriptions``: shared with the other processes of a tree (their pipes, sockets and
        event files are in it already); without it, this process's own are made and dropped
        here."""
        check_threads(proc, threads, self.header)
        check_grantable(proc.creds)
        self._job_stopped = bool(proc.stopped)
        self._stop_signal = proc.stop_signal or signal.SIGSTOP
        for e in fds.events.files:
            if e.queued:
                self.report.warnings.append(f"an {e.kind} instance of pid {proc.pid} had {e.queued} bytes of events "
                                            "queued when it was frozen: those events are not carried")
        if descriptions is not None:
            self._finish(proc, fds.files, threads, descriptions)
            return
        fds.check_referenced()
        identity = Identity.of(proc.creds)
        pairs = peercred.Sockets({proc.pid: self}, {f.obj: proc.pid for f in fds.files.fds if f.kind == "unix"},
                                 self.report.warnings)
        own = Descriptions(made=self.shared.made_files if self.shared is not None else None, identity=identity,
                           pairs=pairs)
        try:
            if self.shared is not None:
                self.shared.add_files(fds.contents, identity)
            own.add(fds)
            self._finish(proc, fds.files, threads, own)
            own.seal()
        finally:
            own.close()

    def prepare(self, proc: ProcessState) -> None:
        """The part of ``finish`` that concerns the process's memory alone, done now, once its
        pages and records are all in: a tree's processes arrive one after another, and each is
        made ready while the next one's state arrives. Only for a process that maps nothing
        made with the fds (files a filesystem hook brings, deleted files, /dev/shm files, shared
        anonymous memory, SysV segments): those wait for ``finish``. The process stays stopped,
        and nothing more may be written to its memory."""
        if self.memory_ready or not self.begun or self._placeholders or \
                any(v.shm is not None or (v.shared and v.kind == "anon" and v.ino) for v in self.layout):
            return
        with _said_as_restore_errors():
            self.end_first_copy()
        self._stop_filling()
        with _said_as_restore_errors():
            self._map_deferred()         # (none: only the list of what could be is dropped)
            self._memory(proc, Identity.of(proc.creds))
        self.memory_ready = True

    def _memory(self, proc: ProcessState, identity: Identity) -> None:
        """The mappings checked against what the process may open, then their attributes, and
        the process's own memory attributes (every page is in, every mapping made)."""
        self._check_access(proc, identity)
        self._numa_policies(proc)
        self._guard_pages(proc)              # before mlock, which refuses them
        self._lock_memory(proc)
        self._mm(proc, identity)
        self._seal_memory()
        self._memory_attributes(proc)

    def _finish(self, proc: ProcessState, files: Files, threads: list[ThreadState],
                descriptions: Descriptions) -> None:
        leader = next((t for t in threads if t.leader), None)
        if leader is None or not threads:
            raise RestoreError("the image has no main thread: corrupt image")
        self._stop_filling()        # every page is in: the stub may touch its memory again
        with _said_as_restore_errors():
            self.end_first_copy()
            identity = Identity.of(proc.creds)
            if not self.memory_ready:
                self._carried = descriptions
                self._map_deferred()
                self._map_carried_files(descriptions)
                self._carried = None
                self._memory(proc, identity)
            self._files(files, descriptions, proc.pid, identity)
            self._locks(files)
            self._signals(proc)
            self._limits(proc)
            # Threads with their own tids need CAP_CHECKPOINT_RESTORE in whoever clones them,
            # and take their credentials from it: the leader keeps that one capability over
            # its dropped credentials until the threads exist, then each thread drops it.
            self._speculation(proc)              # before the threads, which take it from the leader
            lend = (self.keep_ids and len(threads) > 1) or bool(proc.posix_timers)
            self._creds(proc, lend_cap=lend)
            self._check_dirs()
            new_tids = self._threads(proc, threads, lent_cap=lend)
            self._owners(files, new_tids)
            self._pending(proc, threads, new_tids)
            self._deny_write_execute(proc)       # once nothing more is mapped (the gadget was, writable code)
            self._seccomp(threads, new_tids)     # the last calls injected: the filters could forbid ours
            self._drop_gadget()
            self._final_registers(threads, new_tids)
            # Cgroups first: joining a cpuset resets the threads' CPU affinity.
            self.report.warnings += cgroups.place(self.pid, proc.cgroups, socket.gethostname(), self.cgroup)
            self._scheduling(proc, threads, new_tids)

    def _mm(self, proc: ProcessState, identity: Identity) -> None:
        """The mm fields (code, data, brk, stack, args, env, auxv) and the executable, in one
        batch: the executable opened, handed to PR_SET_MM_MAP and closed. The fd it gets is the
        lowest one the stub has free (nothing else opens one in it meanwhile: it is stopped,
        and ours), so the map can name it before the open runs; both are checked after."""
        assert self.inj is not None and self.mem is not None
        mm = proc.mm
        auxv = self._put(proc.auxv, 2048)
        try:
            # The process must be able to execute it (search its path, run it), as exec checked.
            st = identity.may_run(proc.exe)
        except OSError as exc:
            raise identity.refusal("the process's executable", proc.exe, exc) from None
        taken = {int(fd) for fd in os.listdir(f"/proc/{self.pid}/fd")}
        exe_fd = next(fd for fd in range(len(taken) + 1) if fd not in taken)
        mm_map = struct.pack("<11QQII", mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                             mm.start_brk, mm.brk, mm.start_stack, mm.arg_start, mm.arg_end,
                             mm.env_start, mm.env_end, auxv, len(proc.auxv), exe_fd)
        flags = os.O_RDONLY | O_CLOEXEC | os.O_NONBLOCK     # (a FIFO would block)
        calls: list[Call] = [("openat2", self._openat2_args(proc.exe, flags)),
                             ("prctl", (PR_SET_MM, PR_SET_MM_MAP, self._put(mm_map, 1024), len(mm_map), 0)),
                             ("close", (exe_fd,))]
        results: list[int] = []
        done, err = self.inj.batch(self.gadget + BATCH_CODE_OFFSET, self._scratch(3 * PAGE_SIZE), self.mem, calls,
                                   results=results)
        self.report.syscalls += min(done + 1, len(calls))
        if done == 0:
            raise identity.refusal("the process's executable", proc.exe, OSError(-err, os.strerror(-err)))
        if results[0] != exe_fd:
            raise RestoreError(f"the executable {proc.exe} was opened as fd {results[0]} in the process being "
                               f"restored, not {exe_fd}: something else opens files in it")
        if done < len(calls):
            raise InjectionError(-err, f"{calls[done][0]}() of the process's memory layout in pid {self.pid}: "
                                       f"{os.strerror(-err)}")
        self._same_file((st.st_dev, st.st_ino), f"/proc/{self.pid}/exe", proc.exe)

    def _check_access(self, proc: ProcessState, identity: Identity) -> None:
        """Before the process gets anything more, and long before it runs: each file it maps
        is one the process itself may open as ``_map`` opened it (``identity``: its rights,
        ``agent.as_target``), reached without symbolic links, and the very file mapped (not
        one swapped in meanwhile); its working directory and root are directories it may enter."""
        opened: dict[tuple[str, int], tuple[int, int]] = {}
        files = [(v, os.O_RDWR if v.shared and (v.prot & PROT_WRITE or v.advice & VMA_MAYWRITE) else os.O_RDONLY)
                 for v in self.layout if v.kind == "file" and v.shm is None and not _deleted_private(v)]
        with identity.acting():          # one switch for them all
            for v, mode in files:
                if (v.path, mode) not in opened:
                    try:
                        fd = identity.open_path(v.path, mode | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
                    except OSError as exc:
                        raise identity.refusal("mapped by the process", v.path, exc) from None
                    st = os.fstat(fd)
                    os.close(fd)
                    opened[(v.path, mode)] = (st.st_dev, st.st_ino)
        for v, mode in files:
            self._same_file(opened[(v.path, mode)], f"/proc/{self.pid}/map_files/{v.start:x}-{v.end:x}", v.path)
        self._check_segments(proc, identity)
        self._dirs = {}
        for link, what, path in (("cwd", "its working directory", proc.cwd), ("root", "its root directory", proc.root)):
            if path and path != "/":
                try:
                    st = identity.may_enter(path)
                except OSError as exc:
                    raise identity.refusal(what, path, exc) from None
                self._dirs[link] = ((st.st_dev, st.st_ino), path)

    def _check_segments(self, proc: ProcessState, identity: Identity) -> None:
        """Each SysV segment the process attaches (attached by the stub, as root) is one its
        own shmat could attach as it is attached (``as_target.may_attach``)."""
        groups = _segments(self.layout)
        if not groups or self.shared is None:
            return
        table = sysv.read_table()
        for group in groups:
            seg = group[0].shm
            assert seg is not None
            here = self.shared.segments.get(seg.shmid)
            line = table.get(here.shmid) if here is not None else None
            if line is None:
                continue
            want = 4 | (2 if any(v.advice & VMA_MAYWRITE for v in group) else 0) | \
                (1 if any(v.prot & PROT_EXEC for v in group) else 0)
            s = line.segment
            if not may_attach(proc.creds, s.mode, (s.uid, s.gid), (line.cuid, line.cgid), want):
                raise RestoreError(f"cannot attach SysV shared memory segment {s.shmid} (mode {s.mode:o}, owner "
                                   f"{s.uid}:{s.gid}) as the process's {identity}: Permission denied: the process "
                                   "could not attach it itself here, and restore grants it nothing more")

    def _check_dirs(self) -> None:
        """The working and root directories the stub entered (as root, by path) are the ones
        ``_check_access`` found the process may enter: not a link swapped in since."""
        for link, (ours, path) in self._dirs.items():
            self._same_file(ours, f"/proc/{self.pid}/{link}", path)

    def _same_file(self, ours: tuple[int, int], theirs: str, path: str) -> None:
        """Refuse unless the file the stub holds at ``theirs`` (a /proc link) is ``ours``."""
        try:
            st = os.stat(theirs)
        except OSError as exc:
            raise RestoreError(f"cannot look at {path} as the process has it: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != ours:
            raise RestoreError(f"{path} was replaced while the process was being restored (another file is at its "
                               "path now): restore again once it stays put")

    def _numa_policies(self, proc: ProcessState) -> None:
        """mbind each range with a NUMA policy of its own (``agent.mempolicy``), once every page
        is in: the pages move to the nodes it names. The nodemasks go in the scratch's second
        and third pages, each one once."""
        if not proc.mempolicies:
            return
        at: dict[bytes, int] = {}

        def put(nodes: bytes) -> int:
            if nodes not in at:
                at[nodes] = self._put(nodes, PAGE_SIZE + sum(len(n) for n in at))
            return at[nodes]

        calls = mempolicy.range_calls(proc.mempolicies, put, pid=proc.pid, host=socket.gethostname(),
                                      affinity=self.affinity, warnings=self.report.warnings)
        self._run_batch(calls, [("give memory its NUMA policy", None)] * len(calls))

    def _guard_pages(self, proc: ProcessState) -> None:
        """The guard pages (MADV_GUARD_INSTALL), now that every page is in: their mappings hold
        no memory there (a guard page is never sent)."""
        calls: list[tuple[str, tuple[int, ...]]] = [("madvise", (g.start, g.end - g.start, MADV_GUARD_INSTALL))
                                                    for g in proc.guard_regions]
        if calls:
            self._run_batch(calls, [("make guard pages again (MADV_GUARD_INSTALL: Linux 6.13 and newer)", None)]
                            * len(calls))

    def _lock_memory(self, proc: ProcessState) -> None:
        """mlock() what was locked, now that every page is in (locking faults pages in)."""
        if proc.lock_future:
            self._call("mlockall", MCL_FUTURE)
        for v in self.layout:
            if v.advice & VMA_LOCKED:
                self._call("mlock2", v.start, v.length, MLOCK_ONFAULT if v.advice & VMA_LOCKONFAULT else 0)

    def _speculation(self, proc: ProcessState) -> None:
        """The speculation mitigations the process asked for (store bypass, indirect branches).
        A host that cannot give one (its CPU not affected, or the mitigation not left to
        processes there) runs the process without it, and the report says so."""
        for which, name, value in ((PR_SPEC_STORE_BYPASS, "speculative store bypass", proc.spec_store_bypass),
                                   (PR_SPEC_INDIRECT_BRANCH, "indirect branch speculation", proc.spec_indirect_branch)):
            if not value:
                continue
            try:
                self._call("prctl", PR_SET_SPECULATION_CTRL, which, value, 0, 0)
            except InjectionError as exc:
                self.report.warnings.append(
                    f"pid {proc.pid} had disabled {name} for itself (PR_SET_SPECULATION_CTRL), which this host "
                    f"cannot do ({os.strerror(exc.errno or 0)}): it runs with the host's default")

    def _deny_write_execute(self, proc: ProcessState) -> None:
        """PR_SET_MDWE, as the process had it: from now on it may map no memory that is both
        writable and executable, nor make any executable. It cannot be undone, so it comes
        once the stub has mapped all it will."""
        if not proc.mdwe:
            return
        try:
            self._call("prctl", PR_SET_MDWE, proc.mdwe, 0, 0, 0)
        except InjectionError as exc:
            raise RestoreError(f"pid {proc.pid} denied itself writable code (PR_SET_MDWE, mode {proc.mdwe}), which "
                               f"this kernel cannot do ({os.strerror(exc.errno or 0)}): restore it on Linux 6.3 or "
                               "newer (6.6 for PR_MDWE_NO_INHERIT)") from None

    def _seal_memory(self) -> None:
        """mseal() what was sealed, once nothing more is done to those mappings."""
        for v in self.layout:
            if v.advice & VMA_SEALED:
                self._call("mseal", v.start, v.length, 0)

    def _memory_attributes(self, proc: ProcessState) -> None:
        if proc.thp_disable:
            self._call("prctl", PR_SET_THP_DISABLE, 1, 0, 0, 0)
        for command in MEMBARRIER_REGISTER_COMMANDS:
            if proc.membarrier & command:
                self._call("membarrier", command, 0, 0)
        self._loginuid(proc)
        with open(f"/proc/{self.pid}/coredump_filter", "w") as f:     # (the stub has the agent's)
            f.write(f"{proc.coredump_filter:#x}")
        if proc.oom_score_adj:
            try:
                with open(f"/proc/{self.pid}/oom_score_adj", "w") as f:
                    f.write(str(proc.oom_score_adj))
            except OSError as exc:
                # Lowering it needs CAP_SYS_RESOURCE, which root can lack (as the rlimits).
                self.report.warnings.append(f"oom_score_adj {proc.oom_score_adj} could not be set ({exc.strerror}): "
                                            "the process runs with 0")

    def _locks(self, files: Files) -> None:
        """Each file lock and lease, taken by the process through its fd once its fd table is
        final (a close of any fd of the file would drop its POSIX locks). Never waits: a lock
        held here by another process, or a lease the file's other opens here forbid, fails the
        restore, and a live migration rolls back."""
        for f in files.fds:
            if f.sig:              # before a lease, whose break sends it
                self._call("fcntl", f.fd, locks.F_SETSIG, f.sig)
            for lock in f.locks:
                name, args, arg = locks.take_calls(f.fd, lock, self._scratch(0))
                if arg is not None:
                    self._put(arg)
                try:
                    self._call(name, *args)
                except InjectionError as exc:
                    raise RestoreError(f"cannot take {locks.describe(lock)} on {f.path} (fd {f.fd}) again: "
                                       f"{exc.strerror} (held here by {locks.holders(f.path)}); move the process "
                                       "when it does not hold it, or when they let go") from None

    def _owners(self, files: Files, new_tids: dict[int, int]) -> None:
        """Whom each O_ASYNC description signals (F_SETOWN_EX): the process, one of its
        threads (under its tid here) or its process group, once the threads exist. Its signal
        (F_SETSIG) was set with the locks."""
        for f in files.fds:
            if not f.owner:
                continue
            if f.owner_kind == F_OWNER_TID:
                if f.owner not in new_tids:
                    raise RestoreError(f"fd {f.fd} signals thread {f.owner}, which the image does not have: corrupt image")
                who = new_tids[f.owner]
            else:                  # asked of the process: its pid is final only now
                who = self._call("getpid" if f.owner_kind == F_OWNER_PID else "getpgid", 0)
            self._call("fcntl", f.fd, F_SETOWN_EX, self._put(struct.pack("<ii", f.owner_kind, who)))

    def _loginuid(self, proc: ProcessState) -> None:
        """Audit's login uid, which only the process itself may write (with CAP_AUDIT_CONTROL,
        which it still has here, before its credentials are dropped)."""
        try:
            with open(f"/proc/{self.pid}/loginuid") as f:
                now = int(f.read())
        except (OSError, ValueError):
            now = AUDIT_UID_UNSET
        if now == proc.loginuid:
            return
        text = str(proc.loginuid).encode()
        fd = -1
        try:
            fd = self._call("openat", AT_FDCWD, self._put(b"/proc/self/loginuid\0"), os.O_WRONLY | O_CLOEXEC, 0)
            self._call("write", fd, self._put(text), len(text))
        except InjectionError as exc:
            self.report.warnings.append(f"loginuid {proc.loginuid} could not be set ({exc.strerror}): the process "
                                        f"runs with {now} (audit records name that login)")
        finally:
            if fd >= 0:
                self._call("close", fd)

    def _files(self, files: Files, descriptions: Descriptions, image_pid: int, identity: Identity) -> None:
        """Each open file description, made by the restorer (``agent.descriptions``; a file
        opened as the process, ``identity``), taken with pidfd_getfd and dup'd to every fd
        that shares it: all of them in one batch of injected calls (``_fds_at_once``), or one
        by one (``_fds_one_by_one``) where that batch did not come out as foreseen. Then the
        epoll instances' watches."""
        if not files.fds:
            return
        spare = max(f.fd for f in files.fds) + 1
        self._make_room_for_fds(spare + 3)
        groups: dict[tuple[str, int], list[FileDesc]] = {}
        for f in sorted(files.fds, key=lambda f: f.fd):
            groups.setdefault(("desc", f.desc) if f.desc else ("fd", f.fd), []).append(f)
        descriptions.open_files(image_pid, [members[0] for members in groups.values()], identity)
        takes = [(descriptions.fd_for(image_pid, members[0], identity), members) for members in groups.values()]
        if not self._fds_at_once(takes, spare):
            self._fds_one_by_one(takes, spare)
        self._watches([(members[0].fd, descriptions.take_watches(members[0])) for members in groups.values()])

    def _fds_at_once(self, takes: list[tuple[int, list[FileDesc]]], spare: int) -> bool:
        """Every fd in one batch (in chunks of ``BATCH_MAX``): the kernel gives each new fd the
        lowest number free, and the process is stopped with an fd table read here, so each
        number is foreseen: a pidfd of ours moved to ``spare``; then, per description in the
        order of its lowest fd, pidfd_getfd, which lands on that fd or on a hole below it (a
        temporary, dup3'd to each fd and closed). Every result is checked against what was
        foreseen; False (nothing left of the batch) if any differs or failed, for the careful
        path to do it all again."""
        assert self.inj is not None and self.mem is not None
        before = self._open_fds()
        taken = set(before)

        def lowest(start: int = 0) -> int:
            fd = start
            while fd in taken:
                fd += 1
            taken.add(fd)
            return fd

        calls: list[tuple[str, tuple[int, ...]]] = []
        expect: list[int] = []

        def call(name: str, args: tuple[int, ...], result: int) -> None:
            calls.append((name, args))
            expect.append(result)

        first = lowest()
        call("pidfd_open", (os.getpid(), 0), first)
        pidfd = lowest(spare)
        call("fcntl", (first, F_DUPFD_CLOEXEC, spare), pidfd)
        call("close", (first,), 0)
        taken.discard(first)
        for ours, members in takes:
            fd = lowest()      # the description's lowest fd, or a hole below it
            call("pidfd_getfd", (pidfd, ours, 0), fd)        # always close-on-exec
            for f in members:
                if f.fd != fd:
                    call("dup3", (fd, f.fd, f.flags & O_CLOEXEC), f.fd)
                    taken.add(f.fd)
                elif not f.flags & O_CLOEXEC:
                    call("fcntl", (fd, F_SETFD, 0), 0)
            if all(f.fd != fd for f in members):
                call("close", (fd,), 0)
                taken.discard(fd)
        call("close", (pidfd,), 0)
        got: list[int] = []
        for i in range(0, len(calls), BATCH_MAX):
            chunk = calls[i: i + BATCH_MAX]
            done, _ = self.inj.batch(self.gadget + BATCH_CODE_OFFSET, self._scratch(3 * PAGE_SIZE), self.mem,
                                     chunk, got)
            self.report.syscalls += min(done + 1, len(chunk))
            if done < len(chunk) or got[i:] != expect[i: i + BATCH_MAX]:
                break
        if got == expect:
            return True
        # Not as foreseen: whatever the batch made goes, and the careful path does it all.
        for fd in sorted(self._open_fds() - before):
            self._call("close", fd)
        return False

    def _open_fds(self) -> set[int]:
        return {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}

    def _fds_one_by_one(self, takes: list[tuple[int, list[FileDesc]]], spare: int) -> None:
        """The careful path: each description taken to a spare fd above the process's highest
        and dup3'd to each of its fds, one injected call at a time."""
        pidfd = self._above(self._call("pidfd_open", os.getpid(), 0), spare)   # clear of the dup3s
        try:
            for ours, members in takes:
                fd = self._call("pidfd_getfd", pidfd, ours, 0)
                if fd < spare:
                    fd = self._above(fd, spare)
                try:
                    for f in members:
                        self._call("dup3", fd, f.fd, f.flags & O_CLOEXEC)
                finally:
                    self._call("close", fd)
        finally:
            self._call("close", pidfd)

    def _watches(self, instances: list[tuple[int, tuple[EpollWatch, ...]]]) -> None:
        """Register each epoll instance's watches (``_watch``), the plain ones of all of them
        in batches of injected calls, in order."""
        plain: list[tuple[int, EpollWatch]] = []
        for ep, watches in instances:
            if any(_fired(w) for w in watches):
                self._epoll_ctls(plain)           # what came before goes in before, as it did
                plain = []
                self._watch(ep, watches)
            else:
                plain += [(ep, w) for w in watches]
        self._epoll_ctls(plain)

    def _epoll_ctls(self, watches: list[tuple[int, EpollWatch]]) -> None:
        """EPOLL_CTL_ADD each (epoll fd, watch), their events in the scratch pages, in batches."""
        assert self.inj is not None and self.mem is not None
        room = min(BATCH_MAX, 3 * PAGE_SIZE // EPOLL_EVENT.size)
        for i in range(0, len(watches), room):
            chunk = watches[i: i + room]
            self._put(b"".join(EPOLL_EVENT.pack(w.events, w.data) for _, w in chunk))
            calls: list[tuple[str, tuple[int, ...]]] = [("epoll_ctl", (ep, EPOLL_CTL_ADD, w.fd, self._scratch(k * EPOLL_EVENT.size)))
                     for k, (ep, w) in enumerate(chunk)]
            done, err = self.inj.batch(self.gadget + BATCH_CODE_OFFSET, self._scratch(3 * PAGE_SIZE), self.mem, calls)
            self.report.syscalls += min(done + 1, len(calls))
            if done < len(calls):
                ep, w = chunk[done]
                raise RestoreError(f"cannot watch fd {w.fd} with the epoll instance at fd {ep} again: "
                                   f"{os.strerror(-err)}")

    def _watch(self, ep: int, watches: tuple[EpollWatch, ...]) -> None:
        """Register ``watches`` with the epoll instance at ``ep``, in the process (whose fd numbers
        are in place now). A one-shot watch that has fired is disabled (the kernel keeps only
        its flags), which no epoll_ctl can ask for (each adds EPOLLERR | EPOLLHUP): such
        watches go in first, for any readiness, and fire once here, before the other watches
        are in, so their edges stay unreported. One whose file is not ready now cannot fire:
        it is armed for errors and hangups only, and the report says so."""
        fired = [w for w in watches if _fired(w)]
        for w in fired:
            self._epoll_ctl(ep, EPOLL_CTL_ADD, w, w.events | EPOLL_ANY)
        if fired:
            self._call("epoll_wait", ep, self._scratch(), len(fired), 0)
            armed = {int(line.split()[1]) for line in read_text(self.pid, "fdinfo", str(ep)).splitlines()
                     if line.startswith("tfd:") and int(line.split()[3], 16) & ~EP_PRIVATE_BITS}
            for w in fired:
                if w.fd in armed:
                    self._epoll_ctl(ep, EPOLL_CTL_MOD, w, w.events)
                    self.report.warnings.append(
                        f"the one-shot epoll watch of fd {w.fd} (epoll fd {ep}) had fired and was waiting to be "
                        "re-armed; its file is not ready here, so it reports errors and hangups until it is")
        for w in watches:
            if w not in fired:
                self._epoll_ctl(ep, EPOLL_CTL_ADD, w, w.events)

    def _epoll_ctl(self, ep: int, op: int, w: EpollWatch, events: int) -> None:
        try:
            self._call("epoll_ctl", ep, op, w.fd, self._put(EPOLL_EVENT.pack(events, w.data)))
        except InjectionError as exc:
            raise RestoreError(f"cannot watch fd {w.fd} with the epoll instance at fd {ep} again: "
                               f"{exc.strerror}") from None

    def _make_room_for_fds(self, highest: int) -> None:
        soft, hard = prlimit(self.pid, RLIMIT_NOFILE)
        if highest > soft:
            if highest > hard:
                raise RestoreError(f"the process has fds up to {highest}, above this host's open-files limit "
                                   f"({hard}): raise it (ulimit -n) where kcr-migrate's agent runs")
            prlimit(self.pid, RLIMIT_NOFILE, (hard, hard))     # the process's own limits come later

    def _above(self, fd: int, spare: int) -> int:
        """Move a fresh fd out of the way of the process's own numbers."""
        moved = self._call("fcntl", fd, F_DUPFD_CLOEXEC, spare)
        self._call("close", fd)
        return moved

    def _signals(self, proc: ProcessState) -> None:
        """Dispositions and interval timers, in one batch of system calls (their arguments
        side by side in the scratch).

        The stub handles no signal (exec reset them), but inherits the ignored ones that
        posix_spawn cannot reset (glibc's own 32 and 33, ignored in the agent): those the
        process did not ignore go back to SIG_DFL; then the process's own dispositions."""
        ours = {sa.signo for sa in proc.sigactions}
        with open(f"/proc/{self.pid}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        args = bytearray()
        calls: list[tuple[str, tuple[int, ...]]] = []

        def call(name: str, raw: bytes, *args_before: int, after: tuple[int, ...] = ()) -> None:
            calls.append((name, (*args_before, self._scratch(len(args)), *after)))
            args.extend(raw)
        for signo in range(1, 65):
            if ignored >> (signo - 1) & 1 and signo not in ours:
                call("rt_sigaction", struct.pack("<4Q", 0, 0, 0, 0), signo, after=(0, 8))
        for sa in proc.sigactions:
            if sa.signo in (signal.SIGKILL, signal.SIGSTOP):
                continue
            call("rt_sigaction", struct.pack("<4Q", sa.handler, sa.flags, sa.restorer, sa.mask), sa.signo,
                 after=(0, 8))
        for it in proc.itimers:
            val = struct.pack("<4q", it.interval_us // 1_000_000, it.interval_us % 1_000_000,
                              it.value_us // 1_000_000, it.value_us % 1_000_000)
            call("setitimer", val, it.which, after=(0,))
        if calls:
            self._put(bytes(args))
            self._run_batch(calls, [("set a signal's disposition or a timer", None)] * len(calls))

    def _limits(self, proc: ProcessState) -> None:
        for rl in proc.rlimits:
            try:
                prlimit(self.pid, rl.resource, (rl.soft, rl.hard))
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise
                cur = prlimit(self.pid, rl.resource)
                soft = min(rl.soft, cur[1])
                prlimit(self.pid, rl.resource, (soft, cur[1]))
                self.report.warnings.append(
                    f"resource limit {rl.resource}: hard limit {rl.hard} could not be raised from {cur[1]} "
                    "(needs CAP_SYS_RESOURCE)")

    def _capset(self, inj: Injector, c: Creds, extra: int = 0) -> None:
        """The calling thread's capability sets (``extra``: bits added to effective and permitted)."""
        header, data = _capset_args(c, extra)
        self.report.syscalls += 1
        inj.call("capset", self._put(header), self._put(data, 64))

    def _creds(self, proc: ProcessState, lend_cap: bool = False) -> None:
        """Identity last: what the stub has already (it runs as the restorer does, often as
        the process did) is not set again; the rest in one batch of system calls."""
        c = proc.creds
        now = _stub_identity(self.pid)
        calls: list[Call] = []
        at = 0                 # where the next argument goes in the scratch (pages 1-3 of the gadget)

        def put(data: bytes) -> int:
            nonlocal at
            if at + len(data) > CREDS_SCRATCH:
                run()
            addr = self._put(data, at)
            at += -(-len(data) // 8) * 8
            return addr

        def call(name: str, *args: int) -> None:
            calls.append((name, args))

        def run() -> None:
            nonlocal at
            self._run_batch(calls, [("set the process's identity", None)] * len(calls))
            at = 0

        if now.get("Umask") != proc.umask:
            call("umask", proc.umask)
        if now.get("personality") != proc.personality:
            call("personality", proc.personality)
        if proc.cwd and now.get("cwd") != proc.cwd:
            call("chdir", put(os.fsencode(proc.cwd) + b"\0"))
        if proc.root and proc.root != "/":
            call("chroot", put(os.fsencode(proc.root) + b"\0"))
        if proc.child_subreaper:
            call("prctl", PR_SET_CHILD_SUBREAPER, 1)
        bounding = now.get("bounding", (1 << (_cap_last() + 1)) - 1)      # (no more than this kernel knows)
        assert isinstance(bounding, int)
        for cap in range(CAP_LAST + 1):
            if not c.cap_bounding >> cap & 1 and bounding >> cap & 1:     # (dropping needs CAP_SETPCAP)
                call("prctl", PR_CAPBSET_DROP, cap)
        if now.get("Groups") != tuple(sorted(c.groups)):
            groups = struct.pack(f"<{len(c.groups)}I", *c.groups)
            if len(groups) <= CREDS_SCRATCH:
                call("setgroups", len(c.groups), put(groups) if groups else 0)
            else:            # thousands of groups: the scratch and the batch's table, alone
                run()
                self._call("setgroups", len(c.groups), self._put(groups))
        if now.get("Gid") != c.gids:
            call("setresgid", *c.gids[:3])
            call("setfsgid", c.gids[3])
        if now.get("Uid") != c.uids or c.securebits:
            call("prctl", PR_SET_SECUREBITS, c.securebits | SECBIT_KEEP_CAPS)
            call("setresuid", *c.uids[:3])
            call("setfsuid", c.uids[3])
        caps = (c.cap_inheritable, c.cap_permitted, c.cap_effective)
        if lend_cap or now.get("caps") != caps or now.get("Uid") != c.uids:   # setresuid changed them
            call("capset", *[put(part) for part in _capset_args(c, 1 << CAP_CHECKPOINT_RESTORE if lend_cap else 0)])
        for cap in range(CAP_LAST + 1):
            if c.cap_ambient >> cap & 1:
                call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)
        if not c.securebits & SECBIT_KEEP_CAPS and (now.get("Uid") != c.uids or c.securebits):
            call("prctl", PR_SET_KEEPCAPS, 0)
        if c.no_new_privs:
            call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        call("prctl", PR_SET_DUMPABLE, proc.dumpable)
        run()

    def _thread_setup(self, inj: Injector, t: ThreadState, first: list[tuple[str, tuple[int, ...]]] | None = None
                      ) -> None:
        """What each thread must do for itself (after ``first``), in one batch of system calls."""
        calls: list[tuple[str, tuple[int, ...]]] = list(first or [])
        if t.robust_list:
            calls.append(("set_robust_list", (t.robust_list, t.robust_list_len)))
        # stack_t: ss_sp, int ss_flags (SS_AUTODISARM is its top bit: packed unsigned), padding, ss_size
        ss = struct.pack("<QIiQ", t.altstack_sp, t.altstack_flags, 0, t.altstack_size)
        if not t.altstack_flags & 2:     # SS_DISABLE: nothing to set
            calls.append(("sigaltstack", (self._put(ss, 512), 0)))
        if t.rseq_addr:
            calls.append(("rseq", (t.rseq_addr, t.rseq_len, 0, t.rseq_sig)))
        calls.append(("prctl", (PR_SET_NAME, self._put(t.comm.encode()[:15] + b"\0", 256))))
        if t.timer_slack_ns:
            calls.append(("prctl", (sched.PR_SET_TIMERSLACK, t.timer_slack_ns)))
        if t.pdeathsig and self.forked_from is not None:
            # Of a child in the tree, whose parent was made before it and moves with it. Not
            # the job's root's: its parent does not move (the destination's would be the
            # restorer, whose exit would send it).
            calls.append(("prctl", (PR_SET_PDEATHSIG, t.pdeathsig)))
        # Where any thread has a NUMA policy, every thread's, the default too: a thread cloned
        # from the leader inherited the leader's. (None: a kernel without NUMA has no such call.)
        if self._numa_threads:
            calls.append(mempolicy.thread_call(t, lambda nodes: self._put(nodes, POLICY_SCRATCH), pid=self.pid,
                                               host=socket.gethostname(), affinity=self.affinity,
                                               warnings=self.report.warnings))
        assert self.mem is not None
        done, err = inj.batch(self.gadget + BATCH_CODE_OFFSET, self._scratch(3 * PAGE_SIZE), self.mem, calls)
        self.report.syscalls += min(done + 1, len(calls))
        if done < len(calls):
            raise InjectionError(-err, f"{calls[done][0]}() in thread {inj.tid}: {os.strerror(-err)}")

    def _threads(self, proc: ProcessState, threads: list[ThreadState], lent_cap: bool = False) -> dict[int, int]:
        """The other threads, cloned from the leader (with their old tids if ids are kept);
        ``lent_cap``: the leader holds CAP_CHECKPOINT_RESTORE for that, and every thread gives
        it up once they all exist."""
        assert self.inj is not None and self.mem is not None
        leader = next(t for t in threads if t.leader)
        new_tids = {leader.tid: self.pid}
        self._numa_threads = any(t.mempolicy for t in threads)
        if leader.tid_address:
            self.mem.write(leader.tid_address, struct.pack("<i", self.pid))
        self._thread_setup(self.inj, leader, [("set_tid_address", (leader.tid_address,))] if leader.tid_address else [])
        for t in threads:
            if t.leader:
                continue
            flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_SETTLS
            if t.tid_address:
                flags |= CLONE_CHILD_CLEARTID | CLONE_CHILD_SETTID
            new = self._clone_thread(flags, t)
            self._wait_clone_child(new)
            new_tids[t.tid] = new
            child = Injector(new, self.gadget)
            try:
                self._thread_setup(child, t)
                if lent_cap:
                    self._capset(child, proc.creds)
            finally:
                child.close()
        self._posix_timers(proc, new_tids)
        if lent_cap:
            self._capset(self.inj, proc.creds)
        return new_tids

    def _posix_timers(self, proc: ProcessState, new_tids: dict[int, int]) -> None:
        """Each timer_create() timer under its id (PR_TIMER_CREATE_RESTORE_IDS, which needs
        the capability lent for it), once the threads it may signal exist, armed with the
        time it had left: ``TIMERS_AT_ONCE`` timers a batch of calls."""
        if not proc.posix_timers:
            return
        assert self.inj is not None and self.mem is not None
        timers = list(proc.posix_timers)
        for first in range(0, len(timers), TIMERS_AT_ONCE):
            part = timers[first:first + TIMERS_AT_ONCE]
            calls: list[tuple[str, tuple[int, ...]]] = []
            if first == 0:
                calls.append(("prctl", (PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0)))
            for i, t in enumerate(part):
                tid = new_tids.get(t.tid, t.tid) if t.notify & 4 else 0
                event = struct.pack("<Qiii", t.sigval, t.signo, t.notify, tid) + bytes(44)
                wanted = self._put(struct.pack("<i", t.id), TIMER_SCRATCH + 4 * i)
                calls.append(("timer_create", (t.clockid, self._put(event, TIMER_SCRATCH + 256 + 64 * i), wanted)))
                if t.value_ns:
                    spec = struct.pack("<4q", *divmod(t.interval_ns, 1_000_000_000),
                                       *divmod(t.value_ns, 1_000_000_000))
                    calls.append(("timer_settime", (t.id, 0, self._put(spec, TIMER_SCRATCH + 4352 + 32 * i), 0)))
            if first + len(part) == len(timers):
                calls.append(("prctl", (PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0)))
            done, err = self.inj.batch(self.gadget + BATCH_CODE_OFFSET, self._scratch(3 * PAGE_SIZE), self.mem, calls)
            self.report.syscalls += min(done + 1, len(calls))
            if done < len(calls):
                name, args = calls[done]
                if name == "prctl" and args[1] == 1:
                    raise RestoreError(f"the process has POSIX timers, which this kernel cannot restore under their "
                                       f"ids (PR_TIMER_CREATE_RESTORE_IDS: {os.strerror(-err)}); Linux 6.17 or later can")
                raise InjectionError(-err, f"{name}() for a POSIX timer in pid {self.pid}: {os.strerror(-err)}")
            ids = struct.unpack(f"<{len(part)}i", self.mem.read(self._scratch(TIMER_SCRATCH), 4 * len(part)))
            for t, got in zip(part, ids):
                if got != t.id:
                    raise RestoreError(f"POSIX timer {t.id} came back as {got}")
                if t.overrun:
                    self.report.warnings.append(
                        f"POSIX timer {t.id} had an overrun count of {t.overrun} at the freeze: no call sets one "
                        "again, so timer_getoverrun() says 0 until it next fires")

    def _clone_thread(self, flags: int, t: ThreadState) -> int:
        """A new thread, with its old tid if ids are kept (clone3 with set_tid)."""
        if not self.keep_ids:
            return self._call("clone", flags, t.regs.rsp, 0, t.tid_address, t.regs.fs_base)
        tid = self._put(struct.pack("<i", t.tid), 1024)
        args = stub.clone_args(flags, 0, tid, 1, tls=t.regs.fs_base, child_tid=t.tid_address)
        try:
            return self._call("clone3", self._put(args, 1024 + 8), len(args))
        except InjectionError as exc:
            if exc.errno == errno.EEXIST:
                raise RestoreError(f"thread id {t.tid} is taken on {socket.gethostname()} ({_holder(t.tid)}): "
                                   "the process keeps its thread ids; end that process first, or restore "
                                   "under a new pid with --new-pid", pid=t.tid) from None
            raise

    def _wait_clone_child(self, tid: int) -> None:
        stop = ptrace.wait_stop(tid)
        if stop.event not in (ptrace.PTRACE_EVENT_STOP, 0):
            raise RestoreError(f"new thread {tid} stopped unexpectedly ({stop})")

    def _pending(self, proc: ProcessState, threads: list[ThreadState], new_tids: dict[int, int]) -> None:
        for info in proc.shared_pending:
            signo = int.from_bytes(info[:4], "little")
            self._call("rt_sigqueueinfo", self.pid, signo, self._put(info))
        for t in threads:
            for info in t.pending:
                signo = int.from_bytes(info[:4], "little")
                self._call("rt_tgsigqueueinfo", self.pid, new_tids[t.tid], signo, self._put(info))

    def _seccomp(self, threads: list[ThreadState], new_tids: dict[int, int]) -> None:
        """Each thread's seccomp mode and filters (oldest first), the last calls injected into
        it: once in, the filters could forbid any of ours. Threads that share one chain get it
        from the leader in one call per filter (TSYNC); others each install their own. The one
        call left, the leader's munmap of the gadget, runs with its filters suspended
        (PTRACE_O_SUSPEND_SECCOMP; the detach at ``resume`` ends that)."""
        if not any(t.seccomp for t in threads):
            return
        assert self.inj is not None
        if not seccomp.suspend(self.pid, STUB_OPTIONS):
            raise RestoreError("the process runs under seccomp, which only root can restore: run kcr-migrate "
                               "restore as root")
        leader = next(t for t in threads if t.leader)
        together = len(threads) > 1 and seccomp.shared_chain(threads)
        for t in threads if not together else ():
            if t.leader or not t.seccomp:
                continue
            child = Injector(new_tids[t.tid], self.gadget)
            try:
                self._seccomp_thread(child, t, tsync=False)
            finally:
                child.close()
        self._seccomp_thread(self.inj, leader, tsync=together)

    def _seccomp_thread(self, inj: Injector, t: ThreadState, tsync: bool) -> None:
        if t.seccomp == SECCOMP_MODE_STRICT:
            self.report.syscalls += 1
            inj.call("seccomp", seccomp.SECCOMP_SET_MODE_STRICT, 0, 0)
            return
        for i, f in enumerate(t.seccomp_filters):
            program = self._put(f.program, SECCOMP_PROGRAM)
            self.report.syscalls += 1
            try:
                got = inj.call("seccomp", seccomp.SECCOMP_SET_MODE_FILTER,
                               f.flags | (seccomp.SECCOMP_FILTER_FLAG_TSYNC if tsync else 0),
                               self._put(seccomp.fprog(program, f.program), SECCOMP_FPROG))
            except InjectionError as exc:
                raise RestoreError(f"thread {t.tid}'s seccomp filter {i + 1} of {len(t.seccomp_filters)} could not be "
                                   f"installed again: {os.strerror(exc.errno or 0)}") from None
            if got:       # TSYNC: the thread that could not take the filter
                raise RestoreError(f"thread {got} could not take the process's seccomp filters")

    def _drop_gadget(self) -> None:
        # The munmap runs from the gadget page itself: the single step stops right after it.
        self._call("munmap", self.gadget, GADGET_PAGES * PAGE_SIZE)

    def _final_registers(self, threads: list[ThreadState], new_tids: dict[int, int]) -> None:
        for t in threads:
            tid = new_tids[t.tid]
            if to_signed(t.regs.rax) == -516 and t.regs.orig_rax == NR_RESTART_SYSCALL:
                # Which call the kernel was continuing (after a signal handler, a SIGSTOP) the
                # dump could not tell: a new process has nothing to continue.
                self.report.warnings.append(
                    f"thread {t.tid} of pid {self.pid} was in a system call the kernel continues after a "
                    "signal (restart_syscall), which the code that made it does not name: it returns EINTR "
                    "(a sleep ends early)")
            ptrace.set_xstate(tid, t.xstate)
            ptrace.set_regs(tid, resume_regs(t.regs))
            ptrace.set_sigmask(tid, t.sigmask)
        assert self.inj is not None
        # A SIGTRAP queued for it (``_pending``) that the last injected calls' steps took: sent
        # again now that its mask is the process's (from here: it names kcr-migrate as sender).
        for _ in self.inj.sent_traps:
            tgkill(self.pid, self.inj.tid, signal.SIGTRAP)
        self.inj.sent_traps = []
        self.inj._closed = True    # registers and mask are final; do not put the stub's back
        self.new_tids = new_tids

    def _scheduling(self, proc: ProcessState, threads: list[ThreadState], new_tids: dict[int, int]) -> None:
        """Nice, policy, priority and CPUs, set from outside once nothing more is injected: a
        real-time thread would otherwise run our calls at its priority, a pinned one on its CPU."""
        for t in threads:
            warning = sched.apply_thread(new_tids[t.tid], t, pid=proc.pid, host=socket.gethostname(),
                                         affinity=self.affinity)
            if warning:
                self.report.warnings.append(warning)

    # -- the end ----------------------------------------------------------------------------

    def resume(self) -> int:
        """Let every thread run (the point of no return for the restored process).

        Sets ``running_ns``: the CLOCK_MONOTONIC time (ns) by which every thread has run
        (``wait_running``). That instant, not the detach, ends the downtime a program inside
        observes."""
        wait_running([(self, self.let_go())])
        return self.pid

    def let_go(self) -> dict[int, int | None]:
        """Detach every thread, so the process runs; each thread's on-CPU time just before,
        for ``wait_running`` (a tree lets all its processes go first, then waits once)."""
        before = {tid: _cpu_ns(self.pid, tid) for tid in self.new_tids.values()}
        if self._job_stopped:
            # Stopped (SIGSTOP, Ctrl-Z, Slurm's suspend) when it was frozen: its stop signal
            # queued while we hold it, so it stops again before it runs a single instruction,
            # its parent's waitpid(WUNTRACED) naming that signal; SIGCONT goes on. Nothing of
            # it runs to be waited for. The kernel drops SIGTSTP, SIGTTIN and SIGTTOU in a
            # process group no parent outside it watches over: there, SIGSTOP, said so.
            sig = self._stop_signal
            if sig != signal.SIGSTOP and _group_orphaned(self.pid):
                self.report.warnings.append(
                    f"pid {self.pid} was stopped by {signal.Signals(sig).name}; here its process group has no "
                    "parent outside it in its session, where the kernel drops that signal: stopped by SIGSTOP")
                sig = signal.SIGSTOP
            os.kill(self.pid, sig)
            before = {}
        for tid in sorted(self.new_tids.values(), key=lambda t: t == self.pid):
            ptrace.detach(tid)
        self._stopped = False
        self.close()
        if self._job_stopped:       # returned once it shows stopped, as it was (an instant)
            deadline = time.monotonic() + RUN_WAIT_S
            while _state(self.pid) not in ("T", "Z", None) and time.monotonic() < deadline:
                time.sleep(0.001)
        return before

    def abort(self) -> None:
        """Destroy the half-built process; nothing of it survives.

        Every thread we trace must be reaped, the leader last (its exit is reported only after
        the others'), and the threads are whatever exists, not what the image said: a failure
        halfway through cloning them leaves threads no table holds. So the tids come from
        /proc as well, every round, and the waiting is bounded (``ABORT_WAIT_S``): if a thread
        is still not reaped then, the kernel kills it with the tracer anyway (EXITKILL)."""
        if self.pid:
            tids = _task_ids(self.pid) | set(getattr(self, "new_tids", {}).values()) | {self.pid}
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + ABORT_WAIT_S
            while tids and time.monotonic() < deadline:
                tids |= _task_ids(self.pid)
                for tid in sorted(tids, key=lambda t: t == self.pid):
                    try:
                        got, status = os.waitpid(tid, ptrace.WALL | os.WNOHANG)
                    except ChildProcessError:
                        tids.discard(tid)
                        continue
                    if got and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                        tids.discard(tid)
                if tids:
                    time.sleep(0.001)
        self.close()

    def parent_pages(self, rec: ParentPages) -> None:
        """Pages of its first copy the stream says are its parent's very pages (the source's
        frames were one): it holds them as inherited already, so they are not sent. Refused
        where it holds none of its parent's memory, or after its first copy. ``complete``:
        every page of the first copy that is not named is its own at the source, written
        without comparing (``agent.inherited``)."""
        spans = [(r.start, r.end) for r in rec.ranges]
        if spans and (self._first_copy is None or subtract_spans(spans, self._inherited)):
            raise ProtocolError("pages said to be the parent's where the restored process holds none of its "
                                "parent's memory: corrupt stream")
        if self._first_copy is None:
            return          # none named, where it holds none of its parent's memory: nothing to compare
        if rec.complete:
            self._own_beyond = True
        with self._counting:
            self._first_copy += spans
            self.report.pages_shared += sum(end - start for start, end in spans) // PAGE_SIZE

    def end_first_copy(self) -> None:
        """The stream has brought this process's memory once (its first copy, complete: it
        turned to another process, or the process is being finished). Inherited memory where
        that copy brought no page is a hole at the source (never written, or dropped since the
        fork): it is dropped here too, and reads as zeros again. A page the copy brought is
        the process's own, or the parent's it holds already (``agent.inherited``)."""
        if self._first_copy is None:
            return
        holes = subtract_spans(self._inherited, merge_spans(self._first_copy))
        self._first_copy = None
        self._inherited = []        # later pages are ones it wrote since: written, not compared
        calls: list[tuple[str, tuple[int, ...]]] = [("madvise", (start, end - start, MADV_DONTNEED))
                                                    for start, end in holes]
        self._run_batch(calls, [(f"drop the holes of inherited memory at {start:#x}-{end:#x}", None)
                                for start, end in holes])

    def _stop_filling(self) -> None:
        if self.filler is not None:
            self.report.pages_filled = self.filler.pages_copied
            self.filler.close()
            self.filler = None

    def close(self) -> None:
        self._stop_filling()
        if self.mem is not None:
            self.mem.close()
            self.mem = None


def wait_running(let_go: Sequence[tuple[Restorer, dict[int, int | None]]]) -> None:
    """Wait until every thread of the processes let go (``Restorer.let_go``: each with its
    threads' on-CPU times then) has run: its on-CPU time has grown. Sets each one's
    ``running_ns`` to the time all its threads had; a thread that has not run within
    ``RUN_WAIT_S`` is a warning in its report."""
    waiting = {(r, tid): ns for r, before in let_go for tid, ns in before.items()}
    pending = {r: sum(1 for rr, _ in waiting if rr is r) for r, _ in let_go}
    for r, count in pending.items():
        if not count:
            r.running_ns = time.monotonic_ns()
    deadline = time.monotonic() + RUN_WAIT_S
    while True:
        for (r, tid), ns in list(waiting.items()):
            now = _cpu_ns(r.pid, tid)
            if now is None or ns is None or now > ns:
                del waiting[(r, tid)]
                pending[r] -= 1
                if not pending[r]:
                    r.running_ns = time.monotonic_ns()
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.0001)
    for r, count in pending.items():
        if count:
            late = sorted(tid for rr, tid in waiting if rr is r)
            r.report.warnings.append(
                f"thread{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} of pid {r.pid} had not run "
                f"{RUN_WAIT_S:g} s after it was let go (a busy machine, or a stop signal): check that it runs")
            r.running_ns = time.monotonic_ns()


def _capset_args(c: Creds, extra: int = 0) -> tuple[bytes, bytes]:
    """capset()'s header and data for ``c``'s sets (``extra``: bits added to effective and permitted)."""
    eff, prm = c.cap_effective | extra, c.cap_permitted | extra
    return (struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0),
            struct.pack("<6I", eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, c.cap_inheritable & 0xFFFFFFFF,
                        eff >> 32, prm >> 32, c.cap_inheritable >> 32))


@functools.cache
def _cap_last() -> int:
    """The highest capability this kernel knows (a bounding set names no other)."""
    try:
        return min(int(Path("/proc/sys/kernel/cap_last_cap").read_text()), CAP_LAST)
    except (OSError, ValueError):
        return CAP_LAST


def _stub_identity(pid: int) -> dict[str, object]:
    """A stub's umask, personality, cwd, ids, groups and capability sets, as restore sets them
    (keys absent where they could not be read: then they are set)."""
    out: dict[str, object] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        out["Umask"] = int(fields["Umask"], 8)
        out["Uid"] = tuple(int(x) for x in fields["Uid"].split())
        out["Gid"] = tuple(int(x) for x in fields["Gid"].split())
        out["Groups"] = tuple(sorted(int(x) for x in fields["Groups"].split()))
        out["caps"] = tuple(int(fields[k], 16) for k in ("CapInh", "CapPrm", "CapEff"))
        out["bounding"] = int(fields["CapBnd"], 16)
        with open(f"/proc/{pid}/personality") as f:
            out["personality"] = int(f.read(), 16)
        out["cwd"] = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, KeyError, ValueError):
        pass
    return out


def _while_going(pid: int, attempt: Callable[[], int]) -> int:
    """``attempt()``, tried again while it finds ``pid`` taken by a zombie (the checkpointed
    process itself, killed a moment ago and not yet reaped by its parent, or by init for an
    orphan) or by nothing any more (reaped since), for a few seconds."""
    deadline = time.monotonic() + ZOMBIE_GRACE_S
    while True:
        try:
            return attempt()
        except stub.PidTaken:
            if not _going(pid) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _going(pid: int) -> bool:
    """Is ``pid`` held by a zombie, or free already (reaped since we found it taken)?"""
    return _state(pid) in ("Z", None)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _task_ids(pid: int) -> set[int]:
    """The threads of ``pid`` that are still there."""
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def _holder(tid: int) -> str:
    """Who has a pid or tid here, for an error message."""
    try:
        with open(f"/proc/{tid}/status") as f:
            fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        return _id_user(tid) or "a process that has exited since"
    name, tgid = fields.get("Name", "?").strip(), fields.get("Tgid", str(tid)).strip()
    if fields.get("State", "").startswith("Z"):
        # A checkpointed tree's child, killed, its reaper not waiting for it (yet): the pid
        # is free once its parent (or the subreaper it went to) waits for it.
        return f"{name}, a zombie: pid {fields.get('PPid', '?').strip()} has not waited for it"
    return f"{name}, pid {tgid}" if tgid != str(tid) else name


def _id_user(pid: int) -> str | None:
    """A process whose process group or session is still ``pid`` (no process has that pid
    any more, but the kernel keeps it in use for them), for an error message."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = read_stat(int(entry))
        except (OSError, MigrationError):
            continue
        if pid in (int(stat[5]), int(stat[6])):
            what = "session" if int(stat[6]) == pid else "process group"
            zombie = ", a zombie not yet waited for" if stat[3] == "Z" else ""
            return (f"the {what} of pid {entry} ({stat[2]}{zombie}), which keeps that id in use: "
                    f"a process of the checkpointed job's {what} that was not in its tree")
    return None


def _cpu_ns(pid: int, tid: int) -> int | None:
    """Time the thread has spent on a CPU (ns), from /proc/PID/task/TID/schedstat."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def resume_regs(regs: GpRegs) -> GpRegs:
    """Registers for a fresh thread: a system call that was interrupted is issued again."""
    rax = to_signed(regs.rax)
    if to_signed(regs.orig_rax) >= 0 and rax in (-512, -513, -514, -516):
        return replace(regs, rip=regs.rip - 2, rax=regs.orig_rax, orig_rax=U64)
    return replace(regs, orig_rax=U64)
