"""The one record schema: checkpoint images and the live wire protocol share it.

Every record has a type id in ``RECORD_TYPES``; ids are never reused, new fields are optional
and go last. ``FORMAT_VERSION`` sits in the image header (and, for live streams, in the
handshake). Page contents never travel inside records: they go in page frames
(``transport.pages``) beside them.

Images and live streams are untrusted: every field's type bounds it (``transport.records``:
integers to their C type or tighter, pids below PID_MAX_LIMIT, addresses below TASK_SIZE,
strings and lists bounded, paths absolute), and ``validate`` checks what spans fields. Checks
across records (one leader per process, xstate sizes against the header) are
``check_threads`` and ``check_objects_referenced``, run where the records come together.
"""
from __future__ import annotations

import bisect
import re
from typing import Annotated, Any

import msgpack

from transport.errors import ProtocolError
from transport.frozen import frozen, ready_all
from transport.records import (
    I32,
    I64,
    MAX_BYTES,
    MAX_ITEMS,
    MAX_STR,
    U16,
    U32,
    U64,
    AbsPath,
    Blob,
    Count,
    Flag,
    Int,
    NonNegI64,
    Record,
    Text,
    check,
    prepare,
)

# 1: the first format. 2: images may be signed (TAG frames, ``transport.signing``) and the
# header names the signing key (``ImageHeader.key_id``); a version 1 image reads as unsigned.
# 3: state a version 2 reader would skip as unknown fields, and so lose without a word: SysV
# segments (``SysvSegment``, ``Vma.shm``) and /dev/shm files (``FileContents.path``). A new
# field that an older reader must not ignore bumps the version; one it may ignore does not.
# 4: a live stream may change the layout by ``MappingsDelta`` (a record type 3 does not know):
# agents of version 3 are refused at the handshake instead of failing mid-stream.
# 5: whom an O_ASYNC fd signals and with what (``FileDesc.owner``, ``owner_kind``, ``sig``),
# which a version 4 reader would drop (leases and fanotify it refuses by their kind anyway).
# 6: a thread's seccomp mode and filters (``ThreadState.seccomp``, ``seccomp_filters``), which a
# version 5 reader would drop: the process would run unfiltered. Deleted files and memfds the
# job maps but holds no fd of (``FileContents.name``), which a version 5 reader would make nameless.
# The process's view of its monotonic and boot-time clocks (``ImageHeader.monotonic_ns``, ...),
# which a version 5 reader would drop: the process would see them jump (``agent.timens``).
# ``VMA_NORESERVE``, ``ADV_SEQUENTIAL``, ``ADV_RANDOM`` and ``VMA_SEALED`` in ``Vma.advice``
# (above a version 5 reader's bound for it: refused there).
# And a signed image's frames after the header are hashed with Poly1305 under a key per frame
# drawn from the image's ``ImageHeader.sign_nonce`` (``transport.signing``), not SHA-256: a
# version 5 reader would call every such image edited.
# 7: NUMA memory policies (``ThreadState.mempolicy``, ``mempolicy_flags``, ``mempolicy_nodes``,
# ``ProcessState.mempolicies``) and what SO_PEERCRED said on each unix socket
# (``UnixSocket.cred_pid``, ``cred_uid``, ``cred_gid``, and ``conn_pid``, ``conn_uid``, ``conn_gid``
# for a client waiting in an accept queue), which a version 6 reader would drop: the process would
# find its memory placed anywhere and its peers told the restorer's ids.
# 8: a thread's parent-death signal (``ThreadState.pdeathsig``) and a process's
# ``coredump_filter``, which a version 7 reader would drop: a child meant to die with its parent
# would outlive it, a core dump meant to leave out shared memory would hold it.
# 9: whether a process denies itself writable code (``ProcessState.mdwe``, PR_SET_MDWE) and its
# speculation mitigations (``spec_store_bypass``, ``spec_indirect_branch``), and its
# guard regions (``ProcessState.guard_regions``, MADV_GUARD_INSTALL), and a timerfd's settime
# flags (``EventFile.settime_flags``), and the packets of a pipe written in packet mode
# (``PipeBuffer.packets``), which a version 8 reader would drop: the process would run without
# that protection, its guard pages readable zeros, its absolute timers relative, the packets in
# its pipes one stream.
# 10: a MAP_DROPPABLE mapping (``VMA_DROPPABLE`` in ``Vma.advice``, above a version 9 reader's
# bound for it: refused there), which would otherwise come back as a plain private mapping; and
# a carried file's times (``FileContents.atime_ns``, ``mtime_ns``), which a version 9 reader
# would drop: the file made again would say it was written at the restore.
# 11: TCP and UDP sockets (``InetSockets``, ``FileDesc`` kind "inet"): a version 10 reader
# knows neither the record nor the fd kind, and refuses the image.
# 12: a socket's classic BPF filter (``SocketOptions.bpf_filter``, ``InetSocket.bpf_filter``),
# which a version 11 reader would drop: the socket would take what its filter kept out.
# 13: the signal that stopped a stopped process (``ProcessState.stop_signal``), which a version
# 12 reader would drop: a shell's job stopped by Ctrl-Z would report SIGSTOP.
# 14: a unix socket whose file was removed since it was bound (``UnixSocket.file_gone``), which a
# version 13 reader would bind at its path again, a file anyone could connect to.
# 15: the writer's boot and the process's time namespace offsets (``ImageHeader.boot_id``,
# ``timens_monotonic_ns``...), which a version 14 reader would drop: restored on the same boot
# after the real-time clock was stepped, the process would get a needless time namespace.
# 16: ``ParentPages``, a child's pages that are its parent's, not written again: a version 15
# reader would refuse the record (an image of a tree whose processes share memory since a fork).
FORMAT_VERSION = 16
OLDEST_FORMAT_VERSION = 1
PAGE_SIZE = 4096
# x86_64 user space ends below this address (47-bit, 4-level paging).
TASK_SIZE = 0x7FFF_FFFF_F000
MAX_VMAS = 1 << 18          # well above vm.max_map_count's default of 65530
MAX_FDS = 1 << 20
MAX_THREADS = 1 << 15
MAX_XSTATE = 1 << 16
XSAVE_MIN = 576             # the legacy area and the XSAVE header: the least an xstate holds
SIGINFO_SIZE = 128
NSIG = 64
PID_MAX_LIMIT = 1 << 22     # no pid or tid reaches it, whatever kernel.pid_max says
CAP_LAST_CAP = 40           # CAP_CHECKPOINT_RESTORE, the highest capability Linux knows
NGROUPS_MAX = 1 << 16
MAX_PENDING = 4096          # queued siginfos per thread or process (RLIMIT_SIGPENDING is lower)
VSYSCALL_START = 0xFFFF_FFFF_FF60_0000
ROBUST_LIST_HEAD_SIZE = 24
MAX_CPUS = 8192             # CONFIG_NR_CPUS tops out here
AUDIT_UID_UNSET = (1 << 32) - 1
# MEMBARRIER_CMD_REGISTER_{GLOBAL_EXPEDITED, PRIVATE_EXPEDITED, PRIVATE_EXPEDITED_SYNC_CORE,
# PRIVATE_EXPEDITED_RSEQ}
MEMBARRIER_REGISTER_COMMANDS = (1 << 2, 1 << 4, 1 << 6, 1 << 8)
MEMBARRIER_REGISTRATIONS = sum(MEMBARRIER_REGISTER_COMMANDS)  # sizeof(struct robust_list_head): set_robust_list takes nothing else

# What the fields of the records below may hold (``transport.records`` checks while decoding).
Pid = Annotated[int, Int(1, PID_MAX_LIMIT - 1, "a pid")]
OuterPid = Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a pid or 0")]
UserAddr = Annotated[int, Int(0, TASK_SIZE, "a user-space address")]
TlsBase = Annotated[int, Int(0, TASK_SIZE - 1, "an fs or gs base (a user-space address)")]
SigNo = Annotated[int, Int(1, NSIG, "a signal number")]
Fd = Annotated[int, Int(0, MAX_FDS - 1, "an fd number")]
# set*id() take -1 (0xffffffff) for "leave it as it is": a process never has that id.
Id = Annotated[int, Int(0, (1 << 32) - 2, "a uid or gid")]
CapSet = Annotated[int, Int(0, (1 << (CAP_LAST_CAP + 1)) - 1, "a capability set")]
Siginfo = Annotated[bytes, Blob(SIGINFO_SIZE, SIGINFO_SIZE)]
ObjectId = Annotated[int, Int(1, (1 << 64) - 1, "an object id")]
Comm = Annotated[str, Text(63)]
Name = Annotated[str, Text(255)]
Offset = NonNegI64          # file offsets and sizes (off_t)

# The x86_64 user_regs_struct, in kernel order.
GP_REG_NAMES: tuple[str, ...] = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp",
    "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)


_check = check


def _user_addr(addr: int) -> bool:
    return 0 <= addr <= TASK_SIZE


def _signo(info: bytes) -> int:
    return int.from_bytes(info[:4], "little", signed=True)


# --- the image header ---------------------------------------------------------------------

@frozen
class ImageHeader(Record):
    """First record of every image and live stream: who wrote it, for what machine."""

    TYPE = 1
    format_version: U32
    tool_version: Name
    kernel_release: Name
    arch: Annotated[str, Text(32)]
    page_size: U32
    xsave_mask: U64          # XCR0 features present in the dumped xstate
    xsave_size: Annotated[int, Int(0, MAX_XSTATE, "an XSAVE area size")]   # bytes of the XSAVE
                             # area as dumped; 0 in a live stream (its threads come later)
    hostname: Name
    created_unix: float
    pid: Pid
    kind: Annotated[str, Text(16)]        # "checkpoint" or "live"
    key_id: Annotated[str, Text(64)] = ""   # format 2: the id of the key that signed the image ("": unsigned)
    # format 6: the process's clocks as it read them (its time namespace's offsets included) at
    # ``realtime_ns``, the writer's real time then; 0: not known (``agent.timens``)
    monotonic_ns: NonNegI64 = 0
    boottime_ns: NonNegI64 = 0
    realtime_ns: NonNegI64 = 0
    sign_nonce: Annotated[bytes, Blob(64)] = b""   # format 6: the signed image's own random nonce
    # format 15: the writer's boot (/proc/sys/kernel/random/boot_id; "": not known) and the
    # process's time namespace offsets (0, 0: the host's clocks): restored on that very boot,
    # its clocks are the host's plus those offsets, whatever the real-time clock did meanwhile
    boot_id: Annotated[str, Text(64)] = ""
    timens_monotonic_ns: Annotated[int, Int(-(1 << 63), (1 << 63) - 1, "a clock offset")] = 0
    timens_boottime_ns: Annotated[int, Int(-(1 << 63), (1 << 63) - 1, "a clock offset")] = 0

    def validate(self) -> None:
        _check(self.kind in ("checkpoint", "live"), f"kind {self.kind!r}")
        _check(self.xsave_size == 0 or self.xsave_size >= XSAVE_MIN, f"xsave_size {self.xsave_size}")


# --- process-wide state -------------------------------------------------------------------

@frozen
class Creds:
    uids: tuple[Id, Id, Id, Id]      # real, effective, saved, filesystem
    gids: tuple[Id, Id, Id, Id]
    groups: Annotated[tuple[Id, ...], Count(NGROUPS_MAX)]
    cap_inheritable: CapSet
    cap_permitted: CapSet
    cap_effective: CapSet
    cap_bounding: CapSet
    cap_ambient: CapSet
    securebits: Annotated[int, Int(0, 0xFFFF, "securebits")]
    no_new_privs: bool


@frozen
class SigAction:
    signo: SigNo
    handler: UserAddr        # 0 = SIG_DFL, 1 = SIG_IGN, else an address
    flags: U64
    restorer: UserAddr
    mask: U64


@frozen
class ITimer:
    which: Annotated[int, Int(0, 2, "an interval timer")]     # ITIMER_REAL / VIRTUAL / PROF
    interval_us: NonNegI64
    value_us: NonNegI64


@frozen
class PosixTimer:
    """A timer_create() timer: restored under its id, with the time left to its next expiry
    (the clock stops while the process is frozen, as for every timer it has)."""

    id: Annotated[int, Int(0, (1 << 31) - 1, "a timer id")]
    clockid: Annotated[int, Int(0, 15, "a clock id")]
    signo: I32               # the signal it sends (notify "signal"; SIGEV_NONE keeps what it was given)
    sigval: U64              # sigev_value, as the process gave it
    notify: Annotated[int, Int(0, 4, "a timer notification")]   # SIGEV_SIGNAL 0, SIGEV_NONE 1,
                             # | SIGEV_THREAD_ID 4
    tid: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a tid or 0")]   # SIGEV_THREAD_ID: the thread it signals
    value_ns: NonNegI64      # time left (0: disarmed)
    interval_ns: NonNegI64
    overrun: Annotated[int, Int(0, (1 << 31) - 1, "a timer overrun count")] = 0   # timer_getoverrun()
                             # at the freeze: no call sets it again (restore warns when it is not 0)

    def validate(self) -> None:
        _check(self.notify in SIGEV_NOTIFY, f"POSIX timer {self.id}: notification {self.notify}")
        _check(self.notify == 1 or 1 <= self.signo <= NSIG, f"POSIX timer {self.id}: signal {self.signo}")
        _check(self.notify != 4 or self.tid > 0, f"POSIX timer {self.id}: no thread to signal")


MAX_NUMNODES = 1024         # CONFIG_NODES_SHIFT tops out at 10
MPOL_MODES = 7              # MPOL_DEFAULT 0 .. MPOL_WEIGHTED_INTERLEAVE 6
MPOL_MODE_FLAGS = 0xE000    # MPOL_F_STATIC_NODES, MPOL_F_RELATIVE_NODES, MPOL_F_NUMA_BALANCING


@frozen
class MemPolicy:
    """A NUMA memory policy a range of the address space has of its own (mbind), as
    get_mempolicy(MPOL_F_ADDR) told it: mode, mode flags, and the nodes (a bitmask, node 0 in
    the low bit of the first byte; the nodes the process named where a mode flag keeps them)."""

    start: UserAddr
    end: UserAddr
    mode: Annotated[int, Int(1, MPOL_MODES - 1, "a NUMA policy mode")]
    flags: Annotated[int, Int(0, MPOL_MODE_FLAGS, "NUMA policy mode flags")] = 0
    nodes: Annotated[bytes, Blob(MAX_NUMNODES // 8)] = b""

    def validate(self) -> None:
        _check(self.start < self.end and self.start % PAGE_SIZE == 0 and self.end % PAGE_SIZE == 0,
               f"a NUMA policy over {self.start:#x}-{self.end:#x}")
        _check(self.flags & ~MPOL_MODE_FLAGS == 0, f"NUMA policy mode flags {self.flags:#x}")


MAX_GUARD_REGIONS = 1 << 16


@frozen
class GuardRegion:
    """Pages made guard pages (madvise MADV_GUARD_INSTALL, Linux 6.13): no memory behind them,
    and a touch is SIGSEGV, as a PROT_NONE mapping's but without a mapping of their own."""

    start: UserAddr
    end: UserAddr

    def validate(self) -> None:
        _check(self.start < self.end and self.start % PAGE_SIZE == 0 and self.end % PAGE_SIZE == 0,
               f"a guard region over {self.start:#x}-{self.end:#x}")


SIGEV_NOTIFY = (0, 1, 4)     # SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID (glibc's SIGEV_THREAD is one)


@frozen
class Rlimit:
    resource: Annotated[int, Int(0, 15, "a resource limit")]
    soft: U64
    hard: U64

    def validate(self) -> None:
        _check(self.soft <= self.hard, f"resource limit {self.resource}: soft limit above the hard one")


@frozen
class MmFields:
    start_code: UserAddr
    end_code: UserAddr
    start_data: UserAddr
    end_data: UserAddr
    start_brk: UserAddr
    brk: UserAddr
    start_stack: UserAddr
    arg_start: UserAddr
    arg_end: UserAddr
    env_start: UserAddr
    env_end: UserAddr

    def validate(self) -> None:
        for start, end in (("start_code", "end_code"), ("start_data", "end_data"), ("start_brk", "brk"),
                           ("arg_start", "arg_end"), ("env_start", "env_end")):
            _check(getattr(self, start) <= getattr(self, end), f"{start} above {end}")


@frozen
class ProcessState(Record):
    """Everything the process owns as a whole (threads, memory and files are separate)."""

    TYPE = 2
    pid: Pid
    exe: Annotated[str, AbsPath()]
    cwd: Annotated[str, AbsPath()]
    root: Annotated[str, AbsPath(optional=True)]
    umask: Annotated[int, Int(0, 0o777, "a umask")]
    # personality(0xffffffff) only asks for the current one
    personality: Annotated[int, Int(0, (1 << 32) - 2, "a personality")]
    dumpable: Annotated[int, Int(0, 2, "a dumpable mode")]
    creds: Creds
    rlimits: Annotated[tuple[Rlimit, ...], Count(16)]
    mm: MmFields
    auxv: Annotated[bytes, Blob(4096)]
    sigactions: Annotated[tuple[SigAction, ...], Count(NSIG)]
    itimers: Annotated[tuple[ITimer, ...], Count(3)]
    shared_pending: Annotated[tuple[Siginfo, ...], Count(MAX_PENDING)]   # siginfo_t each
    child_subreaper: Flag = 0
    oom_score_adj: Annotated[int, Int(-1000, 1000, "an oom_score_adj")] = 0
    thp_disable: Flag = 0    # prctl(PR_SET_THP_DISABLE)
    lock_future: Flag = 0    # mlockall(MCL_FUTURE): mappings to come are locked
    posix_timers: Annotated[tuple[PosixTimer, ...], Count(1 << 16)] = ()
    loginuid: U32 = AUDIT_UID_UNSET     # /proc/PID/loginuid (audit's login uid)
    # membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS): the REGISTER_* commands the process issued
    membarrier: Annotated[int, Int(0, MEMBARRIER_REGISTRATIONS, "membarrier registrations")] = 0
    cgroups: Annotated[tuple[Annotated[str, Text(4200)], ...], Count(64)] = ()   # /proc/PID/cgroup lines
    # the ranges of its address space with a NUMA policy of their own (mbind), in address order
    mempolicies: Annotated[tuple[MemPolicy, ...], Count(1 << 16)] = ()
    stopped: Flag = 0        # in a job-control stop (SIGSTOP, SIGTSTP, ...) when it was frozen
    # format 13: the signal that stopped it (SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU; 0: SIGSTOP):
    # what its parent's waitpid(WUNTRACED) reports
    stop_signal: Annotated[int, Int(0, NSIG, "a stop signal")] = 0
    # format 8: /proc/PID/coredump_filter (which mappings a core dump holds; the kernel's default)
    coredump_filter: Annotated[int, Int(0, (1 << 9) - 1, "a coredump_filter")] = 0x33
    # format 9: prctl(PR_GET_MDWE): PR_MDWE_REFUSE_EXEC_GAIN (1), PR_MDWE_NO_INHERIT (2)
    mdwe: Annotated[int, Int(0, 3, "a memory-deny-write-execute mode")] = 0
    # format 9: PR_SET_SPECULATION_CTRL as the process set it for store bypass and indirect
    # branches: PR_SPEC_DISABLE (4) or PR_SPEC_FORCE_DISABLE (8); 0: the default
    spec_store_bypass: Annotated[int, Int(0, 8, "a speculation control")] = 0
    spec_indirect_branch: Annotated[int, Int(0, 8, "a speculation control")] = 0
    # format 9: the ranges of pages MADV_GUARD_INSTALL made guard pages (a touch is SIGSEGV), in
    # address order (PAGEMAP_SCAN's PAGE_IS_GUARD)
    guard_regions: Annotated[tuple[GuardRegion, ...], Count(MAX_GUARD_REGIONS)] = ()

    def validate(self) -> None:
        _check(len({sa.signo for sa in self.sigactions}) == len(self.sigactions), "a signal's action twice")
        _check(len({it.which for it in self.itimers}) == len(self.itimers), "an interval timer twice")
        _check(len({rl.resource for rl in self.rlimits}) == len(self.rlimits), "a resource limit twice")
        for info in self.shared_pending:
            _check(1 <= _signo(info) <= NSIG, f"a pending signal numbered {_signo(info)}")
        _check(len(self.auxv) % 16 == 0, f"auxv of {len(self.auxv)} bytes (pairs of 8-byte words)")
        _check(len({t.id for t in self.posix_timers}) == len(self.posix_timers), "a POSIX timer id twice")
        _check(all(a.end <= b.start for a, b in zip(self.guard_regions, self.guard_regions[1:])),
               "guard regions out of order or overlapping")
        _check(all(a.end <= b.start for a, b in zip(self.mempolicies, self.mempolicies[1:])),
               "NUMA policy ranges out of order or overlapping")
        for line in self.cgroups:
            _check(re.fullmatch(r"\d+:[\w=,.-]*:/[^\0]*", line) is not None and ".." not in line.split("/"),
                   f"cgroup line {line[:80]!r}")


# --- memory layout ------------------------------------------------------------------------

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4

VMA_KINDS = ("anon", "file", "heap", "stack", "vdso", "vvar", "vvar_vclock", "vsyscall")

# Advice recorded from smaps VmFlags and replayed with madvise().
ADV_DONTDUMP, ADV_DONTFORK, ADV_WIPEONFORK, ADV_HUGEPAGE, ADV_NOHUGEPAGE, ADV_MERGEABLE = (
    1, 2, 4, 8, 16, 32)
ADV_SEQUENTIAL, ADV_RANDOM = 1024, 2048      # readahead advice (sr, rr)
# Not advice but kept beside it: mlock()ed (VmFlags lo), and locked on fault (lf, mlock2 MLOCK_ONFAULT);
# may be made writable (mw: a MAP_SHARED file mapping of a file opened for writing, even if read-only now);
# mapped MAP_NORESERVE (nr: no swap space reserved for it; glibc's thread arenas are); sealed
# (sl: mseal(), Linux 6.10: never to be unmapped, moved or mprotected again); MAP_DROPPABLE (dp,
# Linux 6.11: anonymous memory the kernel may drop under pressure, glibc's getrandom() state).
VMA_LOCKED, VMA_LOCKONFAULT, VMA_MAYWRITE, VMA_NORESERVE, VMA_SEALED, VMA_DROPPABLE = 64, 128, 256, 512, 4096, 8192


MAX_SHM_SEGMENT = 1 << 40       # bytes of one SysV segment (shmmax's default is far above: the
                                # address space bounds what a process can attach)
SHM_MODE = 0o777                # a segment's permissions (SHM_DEST and SHM_LOCKED are kept apart)


@frozen
class SysvSegment:
    """The SysV shared memory segment a mapping attaches (``Vma.shm``): made again on the
    destination under its id (``shmid``, which programs keep) and key, with its owner and
    permissions, unless the destination sees this very segment (the same ``host``: boot and
    IPC namespace). Its contents are the mapping's pages, sent once per segment. ``removed``:
    marked IPC_RMID (its key reads 0 then): made, attached, and marked so again. Its creator
    (cuid, cgid, cpid) is not carried: on the destination it is the restorer (IPC_SET cannot
    set it)."""

    shmid: Annotated[int, Int(0, (1 << 31) - 1, "a SysV shared memory id")]
    key: I32
    size: Annotated[int, Int(1, MAX_SHM_SEGMENT, "a SysV segment's size")]
    mode: Annotated[int, Int(0, SHM_MODE, "a SysV segment's permissions")]
    uid: Id
    gid: Id
    removed: bool = False
    host: Annotated[str, Text(128)] = ""    # boot id and IPC namespace it lives in ("BOOT ipc:[N]")


@frozen
class Vma:
    start: U64               # below TASK_SIZE (``Mappings.validate``) but for the vsyscall page
    end: U64
    prot: Annotated[int, Int(0, 7, "a mapping protection")]
    shared: bool
    kind: Annotated[str, Text(16)]
    path: Annotated[str, AbsPath(optional=True)] = ""     # file-backed mappings only
    pgoff: Offset = 0        # offset into the file (or shared memory object), bytes
    growsdown: bool = False
    advice: Annotated[int, Int(0, 16383, "mapping advice")] = 0
    file_size: Annotated[int, Int(-1, (1 << 63) - 1, "a file size or -1")] = -1  # size of the file when
                             # dumped, to detect a changed file
    file_mtime_ns: I64 = 0
    ino: U64 = 0             # the file's or shared memory object's inode on the source host (0: none):
                             # tells a new object mapped at the same place from the one before
    shm: SysvSegment | None = None    # a SysV segment attached here (``ino`` is its id)

    @property
    def length(self) -> int:
        return self.end - self.start


@frozen
class Mappings(Record):
    """The whole address space layout, sorted by address."""

    TYPE = 3
    vmas: Annotated[tuple[Vma, ...], Count(MAX_VMAS)]

    def validate(self) -> None:
        prev_end = 0
        special: set[str] = set()
        for v in self.vmas:
            _check(v.kind in VMA_KINDS, f"mapping kind {v.kind!r}")
            if v.kind in ("vdso", "vvar", "vvar_vclock", "vsyscall"):
                _check(v.kind not in special, f"a second [{v.kind}] mapping")
                special.add(v.kind)
            if v.kind == "vsyscall":
                # The kernel's fixed page above user space, never restored.
                _check(v.start == VSYSCALL_START and v.end == VSYSCALL_START + PAGE_SIZE,
                       f"a [vsyscall] mapping at {v.start:#x}")
                continue
            _check(v.start % PAGE_SIZE == 0 and v.end % PAGE_SIZE == 0, f"unaligned mapping {v.start:#x}")
            _check(v.start < v.end and _user_addr(v.end), f"mapping {v.start:#x}-{v.end:#x} out of user space")
            _check(v.start >= prev_end, f"overlapping mapping at {v.start:#x}")
            _check(v.pgoff % PAGE_SIZE == 0, f"mapping at {v.start:#x}: file offset {v.pgoff:#x} not page-aligned")
            _check(v.pgoff + (v.end - v.start) < 1 << 63, f"mapping at {v.start:#x}: file offset {v.pgoff:#x}")
            _check(v.kind != "file" or bool(v.path), f"file mapping at {v.start:#x} without a path")
            if v.shm is not None:
                _check(v.shared and v.kind == "anon" and v.ino == v.shm.shmid,
                       f"mapping at {v.start:#x}: a SysV segment attached other than shared")
                _check(v.pgoff + (v.end - v.start) <= -(-v.shm.size // PAGE_SIZE) * PAGE_SIZE,
                       f"mapping at {v.start:#x}: past the end of SysV segment {v.shm.shmid}")
            prev_end = v.end


@frozen
class AddressRange:
    start: U64
    end: U64


@frozen
class MappingsDelta(Record):
    """A layout as a change to the one before it in the stream (live streams, after a
    ``Mappings``): the mappings in the ``cleared`` ranges go, ``vmas`` (inside them) come;
    the rest stays as it was. A round then costs the mappings that changed, not all of them.
    The vDSO cluster never changes this way."""

    TYPE = 14
    cleared: Annotated[tuple[AddressRange, ...], Count(MAX_VMAS)]
    vmas: Annotated[tuple[Vma, ...], Count(MAX_VMAS)]

    def validate(self) -> None:
        prev_end = 0
        for r in self.cleared:
            _check(r.start % PAGE_SIZE == 0 and r.end % PAGE_SIZE == 0, f"unaligned range {r.start:#x}")
            _check(r.start < r.end and _user_addr(r.end), f"range {r.start:#x}-{r.end:#x} out of user space")
            _check(r.start > prev_end or prev_end == 0, f"ranges out of order or touching at {r.start:#x}")
            prev_end = r.end
        starts = [r.start for r in self.cleared]
        prev_end = 0
        for v in self.vmas:
            _check(v.kind in VMA_KINDS and v.kind not in ("vdso", "vvar", "vvar_vclock", "vsyscall"),
                   f"mapping kind {v.kind!r} in a layout change")
            _check(v.start % PAGE_SIZE == 0 and v.end % PAGE_SIZE == 0, f"unaligned mapping {v.start:#x}")
            _check(v.start < v.end and _user_addr(v.end), f"mapping {v.start:#x}-{v.end:#x} out of user space")
            _check(v.start >= prev_end, f"overlapping mapping at {v.start:#x}")
            i = bisect.bisect_right(starts, v.start) - 1
            _check(i >= 0 and v.end <= self.cleared[i].end, f"mapping at {v.start:#x} outside the ranges it changes")
            _check(v.pgoff % PAGE_SIZE == 0, f"mapping at {v.start:#x}: file offset {v.pgoff:#x} not page-aligned")
            _check(v.pgoff + (v.end - v.start) < 1 << 63, f"mapping at {v.start:#x}: file offset {v.pgoff:#x}")
            _check(v.kind != "file" or bool(v.path), f"file mapping at {v.start:#x} without a path")
            prev_end = v.end


# --- files --------------------------------------------------------------------------------

EVENT_KINDS = ("eventfd", "timerfd", "signalfd", "epoll", "pidfd", "inotify", "fanotify")
FD_KINDS = ("file", "dir", "chr", "pipe", "unix", "redirect", "deleted", "fifo", "inet") + EVENT_KINDS
# fds of these kinds refer to an object the stream carries
OBJECT_KINDS = ("pipe", "unix", "deleted", "fifo", "inet") + EVENT_KINDS
SHM_DIR = "/dev/shm/"          # files here (tmpfs) are host-local: their contents are carried
MEMFD_SEALS = 0x3f             # F_SEAL_SEAL, _SHRINK, _GROW, _WRITE, _FUTURE_WRITE, _EXEC
# The character devices an fd may be carried on (agent.procfs refuses the others): opening a
# device can have effects of its own, so an image that names another one is refused too.
CHAR_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
MAX_PIPE_SIZE = 1 << 28        # well above /proc/sys/fs/pipe-max-size's default of 1 MiB
O_CLOEXEC_FLAG = 0o2000000     # per fd, not per description


LOCK_KINDS = ("posix", "ofd", "flock", "lease")


@frozen
class FileLock:
    """A lock held through an fd: a POSIX record lock (the process's), an OFD lock, a flock or
    a lease (``F_SETLEASE``; the open file description's). ``length`` 0: to the end of the
    file, however long (a flock or a lease: the whole file, 0 and 0)."""

    kind: Annotated[str, Text(8)]     # one of LOCK_KINDS
    write: Flag
    start: Offset = 0
    length: Offset = 0


@frozen
class FileDesc:
    """One fd. ``kind`` says what it refers to: a path ("file", "dir", "chr"), an end of a pipe
    in ``Pipes`` ("pipe"; ``flags`` tell which end), an open of a FIFO whose pipe is in
    ``Pipes`` ("fifo": ``path`` names the FIFO, ``flags`` how it was opened), a socket in ``UnixSockets`` ("unix") or
    ``InetSockets`` ("inet"), or a
    file the user named to take the place of what the fd referred to ("redirect", with
    ``--redirect FD=PATH``)."""

    fd: Fd
    kind: Annotated[str, Text(16)]
    path: Annotated[str, AbsPath(optional=True)]
    flags: Annotated[int, Int(0, (1 << 31) - 1, "open flags")]   # as /proc/PID/fdinfo shows them
                             # (octal there)
    pos: Offset
    size: Annotated[int, Int(-1, (1 << 63) - 1, "a file size or -1")] = -1
    mtime_ns: I64 = 0
    desc: U64 = 0            # fds with the same non-zero ``desc`` share one open file description
                             # (dup, fork): one offset, one set of status flags
    obj: U64 = 0             # kind "pipe" or "fifo": the ``PipeBuffer.id`` of its pipe; "unix": the
                             # ``UnixSocket.id`` of its socket; "inet": the ``InetSocket.id``; an event kind:
                             # the ``EventFile.id``
    locks: Annotated[tuple[FileLock, ...], Count(1 << 16)] = ()   # kind "file": locks held through it
    waiting: Flag = 0        # kind "fifo", a reader of a FIFO no fd of the job writes: no writer came
                             # and went since it was opened, so poll shows no POLLHUP (a server
                             # waiting for its first client)
    sig: Annotated[int, Int(0, NSIG, "a signal number or 0")] = 0   # F_SETSIG of a description with a
                             # lease or O_ASYNC: the signal a lease break or I/O sends (0: SIGIO)
    owner: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "an fd's owner")] = 0   # F_GETOWN_EX of an O_ASYNC
                             # description: the thread, process or process group it signals (0: none)
    owner_kind: Annotated[int, Int(0, 2, "an fd owner's kind")] = 0   # F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP


@frozen
class Files(Record):
    TYPE = 4
    fds: Annotated[tuple[FileDesc, ...], Count(MAX_FDS)]

    def validate(self) -> None:
        seen: set[int] = set()
        shared: dict[int, FileDesc] = {}
        for f in self.fds:
            _check(f.fd not in seen, f"file descriptor number {f.fd} twice")
            _check(f.kind in FD_KINDS, f"file kind {f.kind!r}")
            _check(f.kind == "file" or not f.locks, f"fd {f.fd}: locks on a {f.kind}")
            for lock in f.locks:
                _check(lock.kind in LOCK_KINDS, f"fd {f.fd}: lock kind {lock.kind!r}")
                _check(lock.kind not in ("flock", "lease") or (lock.start, lock.length) == (0, 0),
                       f"fd {f.fd}: a {lock.kind} on a range")
            _check(f.kind in OBJECT_KINDS or bool(f.path), f"fd {f.fd}: no path")
            _check(f.kind != "chr" or f.path in CHAR_DEVICES, f"fd {f.fd}: device {f.path[:64]!r}")
            _check((f.kind in OBJECT_KINDS) == (f.obj > 0), f"fd {f.fd}: an object id where none belongs, "
                   "or none where one does")
            if f.desc:
                first = shared.setdefault(f.desc, f)
                _check((first.kind, first.path, first.obj, first.flags & ~O_CLOEXEC_FLAG, first.pos)
                       == (f.kind, f.path, f.obj, f.flags & ~O_CLOEXEC_FLAG, f.pos),
                       f"fd {f.fd} shares a description with fd {first.fd} but differs from it")
            seen.add(f.fd)


@frozen
class PipeBuffer:
    id: ObjectId             # the pipe's inode on the source host
    size: Annotated[int, Int(PAGE_SIZE, MAX_PIPE_SIZE, "a pipe capacity")]   # F_GETPIPE_SZ
    data: Annotated[bytes, Blob(MAX_BYTES)]    # the bytes in it, unread, in order
    # A FIFO's pipe: the FIFO's path (made again there if missing), permissions and owner.
    # An anonymous pipe has none.
    path: Annotated[str, AbsPath(optional=True)] = ""
    mode: Annotated[int, Int(0, 0o7777, "file permissions")] = 0
    uid: Id = 0
    gid: Id = 0
    # format 9: a pipe written in packet mode (O_DIRECT): ``data`` cut as its reader's reads
    # return it, one packet a read (each part's length, in order); () for a byte stream
    packets: Annotated[tuple[Annotated[int, Int(1, MAX_PIPE_SIZE, "a packet's length")], ...],
                       Count(MAX_PIPE_SIZE // PAGE_SIZE)] = ()     # (a packet takes a buffer: a page at most)


@frozen
class Pipes(Record):
    """The pipes the process's fds refer to (anonymous ones and FIFOs' pipes), with their
    bytes in flight."""

    TYPE = 8
    pipes: Annotated[tuple[PipeBuffer, ...], Count(MAX_FDS)]

    def validate(self) -> None:
        seen: set[int] = set()
        for p in self.pipes:
            _check(p.id not in seen, f"pipe id {p.id} twice")
            _check(len(p.data) <= p.size, f"pipe {p.id}: more bytes than it holds")
            _check(not p.packets or sum(p.packets) == len(p.data), f"pipe {p.id}: packets that are not its bytes")
            seen.add(p.id)


SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
MAX_SOCKET_QUEUE = 1 << 28
MAX_WATCHES = 1 << 20


UNIX_PATH_MAX = 108          # sizeof(sockaddr_un.sun_path)
UnixName = Annotated[bytes, Blob(UNIX_PATH_MAX)]
BPF_INSTRUCTION = 8          # struct sock_filter
BpfProgram = Annotated[bytes, Blob(BPF_INSTRUCTION * 4096)]   # BPF_MAXINSNS instructions at most


def unix_name_ok(name: bytes) -> bool:
    """b"" (unbound), b"\0" + an abstract name, or an absolute path without NULs that bind takes."""
    if not name or name[:1] == b"\0":
        return True
    return name[:1] == b"/" and b"\0" not in name and len(name) < UNIX_PATH_MAX


@frozen
class SocketOptions:
    """SOL_SOCKET options a unix socket gets again (buffer sizes as getsockopt shows them)."""

    rcvbuf: Annotated[int, Int(1, 1 << 31, "a socket buffer size")]
    sndbuf: Annotated[int, Int(1, 1 << 31, "a socket buffer size")]
    passcred: Flag = 0
    passsec: Flag = 0
    peek_off: Annotated[int, Int(-1, (1 << 31) - 1, "a peek offset")] = -1
    rcvlowat: Annotated[int, Int(0, (1 << 31) - 1, "SO_RCVLOWAT")] = 1
    oobinline: Flag = 0
    rcvtimeo_us: NonNegI64 = 0
    sndtimeo_us: NonNegI64 = 0
    passpidfd: Flag = 0
    passrights: Flag = 1
    bpf_filter: BpfProgram = b""   # a classic BPF filter (SO_ATTACH_FILTER), as SO_GET_FILTER reads it
    filter_locked: Flag = 0        # SO_LOCK_FILTER


@frozen
class UnixSocket:
    """A unix socket: one end of a socketpair or connection whose other end moves too
    (``peer``), one whose peer has closed, one never connected; bound to a name, listening
    (with the clients of the job waiting in its accept queue), accepted from a listener."""

    id: ObjectId             # its inode on the source host
    type: Annotated[int, Int(1, 5, "a socket type")]   # SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET
    peer: U64                # the ``id`` of its peer here; 0 if it has none
    peer_closed: bool        # it was connected, and its peer has gone since
    shutdown: Annotated[int, Int(0, 3, "a shutdown state")]   # sk_shutdown: 1 receive side, 2 send side
    options: SocketOptions
    queue: Annotated[tuple[Annotated[bytes, Blob(MAX_BYTES)], ...], Count(MAX_ITEMS)]   # its receive
                             # queue: one item for a stream, one per message otherwise
    # A named socket (``agent.unix_names``): its address as getsockname gives it, an absolute
    # path or b"\0" + an abstract name; b"": unbound.
    name: UnixName = b""
    accepted: bool = False   # stream/seqpacket: ``name`` is that of the listener it was accepted from
    listener: U64 = 0        # accepted: that listener (it moves too); a client waiting in an accept
                             # queue (``peer`` 0): the listener it waits on
    backlog: Annotated[int, Int(-1, (1 << 31) - 1, "a listen backlog")] = -1   # a listener's; -1: not listening
    pending: Annotated[tuple[ObjectId, ...], Count(MAX_ITEMS)] = ()   # a listener: the clients waiting
                             # in its accept queue, in the order accept returns them
    target: U64 = 0          # a datagram socket connected (one way) to the bound socket ``target``
    senders: Annotated[tuple[UnixName, ...], Count(MAX_ITEMS)] = ()   # a named datagram socket: the
                             # sender's name of each queued message (b"": unbound), as recvfrom gives it
    file_mode: Annotated[int, Int(0, 0o7777, "file permissions")] = 0   # a path's socket file: its
    file_uid: Id = 0         # permissions and owner
    file_gid: Id = 0
    file_dev: U64 = 0        # and the file's device and inode on the source host (the destination
    file_ino: U64 = 0        # replaces that file, the job's own, where both hosts see it)
    sent: Annotated[tuple[Annotated[bytes, Blob(MAX_BYTES)], ...], Count(MAX_ITEMS)] = ()   # a client
                             # waiting in an accept queue: what it sent, for the server to read once it
                             # accepts (one item for a stream, one per message otherwise)
    # What SO_PEERCRED said on it (the process that made the pair, or the other end of the
    # connection): pid (0: nothing, or not recorded), effective uid and gid (``agent.peercred``)
    cred_pid: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a pid or 0")] = 0
    cred_uid: Id = 0
    cred_gid: Id = 0
    # A client waiting in an accept queue: what its server end says to SO_PEERCRED once the
    # server accepts it (the process that connected): pid (0: not recorded), effective uid, gid
    conn_pid: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a pid or 0")] = 0
    conn_uid: Id = 0
    conn_gid: Id = 0
    # format 14: bound to a path whose socket file was removed (or replaced) since: bound there
    # again for its name (getsockname), its new file removed at once, what is there kept
    file_gone: bool = False


@frozen
class UnixSockets(Record):
    """The unix sockets the process's fds refer to, with what is queued in them."""

    TYPE = 9
    sockets: Annotated[tuple[UnixSocket, ...], Count(MAX_FDS)]

    def validate(self) -> None:
        by_id = {s.id: s for s in self.sockets}
        _check(len(by_id) == len(self.sockets), "socket ids repeat")
        for s in self.sockets:
            _check(s.type in (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET), f"socket {s.id}: type {s.type}")
            _check(len(s.options.bpf_filter) % BPF_INSTRUCTION == 0, f"socket {s.id}: a BPF filter of part "
                   "of an instruction")
            _check(s.peer == 0 or (s.peer in by_id and by_id[s.peer].peer == s.id and s.peer != s.id),
                   f"socket {s.id}: its peer {s.peer} is not a socket here that names it back")
            _check(not (s.peer and s.peer_closed), f"socket {s.id}: a peer that is both there and gone")
            _check(sum(len(m) for m in s.queue) <= MAX_SOCKET_QUEUE, f"socket {s.id}: queue too large")
            _check(s.type != SOCK_STREAM or len(s.queue) <= 1, f"socket {s.id}: a stream queues one run of bytes")
            _check(unix_name_ok(s.name), f"socket {s.id}: its name is neither an absolute path nor an abstract name")
            _check(not s.senders or len(s.senders) == len(s.queue), f"socket {s.id}: senders do not match its queue")
            _check(all(unix_name_ok(n) for n in s.senders), f"socket {s.id}: a sender's name")
            _check(not s.accepted or (bool(s.name) and s.listener != 0 and s.type != SOCK_DGRAM
                                      and (s.peer_closed if s.peer == 0 else not by_id[s.peer].accepted)),
                   f"socket {s.id}: accepted, but without a name, a listener or a peer")
            _check(s.backlog < 0 or (bool(s.name) and not s.accepted and s.peer == 0 and s.type != SOCK_DGRAM
                                     and not s.queue), f"socket {s.id}: a listener that is not one")
            _check(not s.sent or (s.listener != 0 and not s.accepted), f"socket {s.id}: bytes sent by a client "
                   "that does not wait in an accept queue")
            _check(sum(len(m) for m in s.sent) <= MAX_SOCKET_QUEUE, f"socket {s.id}: too much sent")
            _check(s.type != SOCK_STREAM or len(s.sent) <= 1, f"socket {s.id}: a stream sends one run of bytes")
            _check(not s.conn_pid or (s.listener != 0 and not s.accepted), f"socket {s.id}: who connected it, "
                   "but it does not wait in an accept queue")
            _check(not s.pending or s.backlog >= 0, f"socket {s.id}: pending connections on a socket not listening")
            for c in s.pending:
                _check(c in by_id and by_id[c].listener == s.id and by_id[c].peer == 0 and not by_id[c].accepted,
                       f"socket {s.id}: pending connection {c} is not a client waiting on it")
            if s.listener:
                other = by_id.get(s.listener)
                _check(other is not None and other.backlog >= 0 and (s.accepted or s.id in other.pending),
                       f"socket {s.id}: its listener {s.listener} is not a listener here that has it")
                _check(not s.accepted or (other is not None and other.name == s.name),
                       f"socket {s.id}: accepted from a listener of another name")
            if s.target:
                other = by_id.get(s.target)
                _check(s.type == SOCK_DGRAM and s.peer == 0 and other is not None and bool(other.name)
                       and other.type == SOCK_DGRAM, f"socket {s.id}: connected to {s.target}, not a bound datagram socket here")


@frozen
class EpollWatch:
    fd: Fd                   # the watched fd's number in the process
    events: U32              # the event mask as registered (EPOLLET, EPOLLONESHOT, ... included)
    data: U64


@frozen
class InotifyWatch:
    wd: Annotated[int, Int(1, (1 << 31) - 1, "an inotify watch descriptor")]
    mask: U32                # as the kernel keeps it (IN_ONESHOT, IN_EXCL_UNLINK, ... included)
    path: Annotated[str, AbsPath()]   # the watched file or directory, as the source host names it


FANOTIFY_MARKS = ("inode", "mount", "filesystem")


@frozen
class FanotifyMark:
    kind: Annotated[str, Text(16)]    # one of FANOTIFY_MARKS
    path: Annotated[str, AbsPath()]   # the marked file or directory (inode), or a path on the mount
                                      # or filesystem, as the source host names it
    mask: U64
    ignored_mask: U64 = 0
    mflags: Annotated[int, Int(0, 0xFFFF, "fanotify mark flags")] = 0   # FAN_MARK_IGNORED_SURV_MODIFY, ...


# --- TCP and UDP sockets ---------------------------------------------------------------------

AF_INET, AF_INET6 = 2, 10
IPPROTO_TCP, IPPROTO_UDP = 6, 17
SOL_SOCKET, SOL_IP, SOL_IPV6 = 1, 0, 41
# The socket options an image may set again on a TCP or UDP socket, (level, name) -> the size
# of the value getsockopt gives (0: a string of at most 16 bytes): the restorer runs as root,
# so an image names no option outside this list. (``agent.inet_sockets`` reads them.)
INET_OPTIONS: dict[tuple[int, int], int] = {
    **{(SOL_SOCKET, o): 4 for o in (2, 15, 9, 6, 5, 12, 36, 18, 10, 7, 8, 46, 11, 72)},
    # SO_REUSEADDR, SO_REUSEPORT, SO_KEEPALIVE, SO_BROADCAST, SO_DONTROUTE, SO_PRIORITY, SO_MARK,
    # SO_RCVLOWAT, SO_OOBINLINE, SO_SNDBUF, SO_RCVBUF, SO_BUSY_POLL, SO_NO_CHECK, SO_BUF_LOCK
    (SOL_SOCKET, 13): 8,                   # SO_LINGER (struct linger)
    (SOL_SOCKET, 20): 16, (SOL_SOCKET, 21): 16,   # SO_RCVTIMEO_OLD, SO_SNDTIMEO_OLD (timeval)
    (SOL_SOCKET, 25): 0,                   # SO_BINDTODEVICE (an interface name)
    **{(SOL_IP, o): 4 for o in (1, 2, 8, 10, 11, 12, 13, 15, 19, 20, 24, 33, 34, 49)},
    # IP_TOS, IP_TTL, IP_PKTINFO, IP_MTU_DISCOVER, IP_RECVERR, IP_RECVTTL, IP_RECVTOS, IP_FREEBIND,
    # IP_TRANSPARENT, IP_RECVORIGDSTADDR, IP_BIND_ADDRESS_NO_PORT, IP_MULTICAST_TTL,
    # IP_MULTICAST_LOOP, IP_MULTICAST_ALL
    **{(SOL_IPV6, o): 4 for o in (26, 16, 18, 19, 49, 67, 25, 78, 75, 23)},
    # IPV6_V6ONLY, IPV6_UNICAST_HOPS, IPV6_MULTICAST_HOPS, IPV6_MULTICAST_LOOP, IPV6_RECVPKTINFO,
    # IPV6_TCLASS, IPV6_RECVERR, IPV6_FREEBIND, IPV6_TRANSPARENT, IPV6_MTU_DISCOVER
    **{(IPPROTO_TCP, o): 4 for o in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 23, 25)},
    # TCP_NODELAY, TCP_MAXSEG, TCP_CORK, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_SYNCNT,
    # TCP_LINGER2, TCP_DEFER_ACCEPT, TCP_WINDOW_CLAMP, TCP_USER_TIMEOUT, TCP_FASTOPEN,
    # TCP_NOTSENT_LOWAT
    (IPPROTO_TCP, 13): 0,                  # TCP_CONGESTION (an algorithm's name)
    **{(IPPROTO_UDP, o): 4 for o in (1, 103, 104)},   # UDP_CORK, UDP_SEGMENT, UDP_GRO
}


@frozen
class InetOption:
    """A socket option the program changed from what a new socket has: getsockopt's bytes."""

    level: Annotated[int, Int(0, 255, "a socket option level")]
    name: Annotated[int, Int(0, 255, "a socket option")]
    value: Annotated[bytes, Blob(16)]


@frozen
class TcpConnection:
    """An established TCP connection whose other end moves too, as ``TCP_REPAIR`` reads it and
    makes it again: sequence numbers, both queues, the options agreed at the handshake, the
    window. ``send_queue`` starts at ``send_seq`` (the first byte not acknowledged); its last
    ``unsent`` bytes had not been sent. ``recv_queue`` starts at ``recv_seq`` (the first byte
    the program has not read)."""

    send_seq: U32
    recv_seq: U32
    # each queue in slices of at most MAX_BYTES (a record's blobs are bounded; TCP's buffers
    # grow to megabytes)
    send_queue: Annotated[tuple[Annotated[bytes, Blob(MAX_BYTES)], ...], Count(MAX_SOCKET_QUEUE // MAX_BYTES)]
    unsent: Annotated[int, Int(0, MAX_SOCKET_QUEUE, "a byte count")]
    recv_queue: Annotated[tuple[Annotated[bytes, Blob(MAX_BYTES)], ...], Count(MAX_SOCKET_QUEUE // MAX_BYTES)]
    mss: Annotated[int, Int(0, 65535, "a segment size")]
    options: Annotated[int, Int(0, 15, "TCP options (TCPI_OPT_*)")]   # timestamps 1, SACK 2, window scale 4
    snd_wscale: Annotated[int, Int(0, 14, "a window scale")]
    rcv_wscale: Annotated[int, Int(0, 14, "a window scale")]
    timestamp: U32           # TCP_TIMESTAMP: the connection's timestamp clock when read
    snd_wl1: U32             # TCP_REPAIR_WINDOW
    snd_wnd: U32
    max_window: U32
    rcv_wnd: U32
    rcv_wup: U32


@frozen
class InetDatagram:
    """A datagram queued on a UDP socket, and who sent it (as recvfrom names the sender)."""

    address: Annotated[bytes, Blob(16)]
    port: Annotated[int, Int(0, 65535, "a port")]
    data: Annotated[bytes, Blob(65535)]


@frozen
class InetSocket:
    """A TCP socket that is not connected (new, bound, or listening with nothing waiting in
    its accept queue), a TCP connection whose other end moves too (``connection``), or a UDP
    socket with nothing queued: made again with its options, bound to its address and port,
    listening or connected as it was."""

    id: ObjectId             # its inode on the source host
    family: Annotated[int, Int(AF_INET, AF_INET6, "an address family")]
    type: Annotated[int, Int(SOCK_STREAM, SOCK_DGRAM, "a socket type")]
    protocol: Annotated[int, Int(IPPROTO_TCP, IPPROTO_UDP, "a protocol")]
    address: Annotated[bytes, Blob(16)] = b""   # bound: its address (4 or 16 bytes); b"": unbound
    port: Annotated[int, Int(0, 65535, "a port")] = 0
    scope_id: U32 = 0        # an IPv6 link-local address's interface (its index on the source)
    peer_address: Annotated[bytes, Blob(16)] = b""   # UDP, connected: its peer; b"": none
    peer_port: Annotated[int, Int(0, 65535, "a port")] = 0
    backlog: Annotated[int, Int(-1, (1 << 31) - 1, "a listen backlog")] = -1   # TCP listening; -1: not
    options: Annotated[tuple[InetOption, ...], Count(len(INET_OPTIONS))] = ()
    # TCP, ESTABLISHED: the connection (one item), to ``peer_address``:``peer_port``
    connection: Annotated[tuple[TcpConnection, ...], Count(1)] = ()
    shutdown: Annotated[int, Int(0, 3, "a shutdown state")] = 0   # UDP: shut for receiving 1, sending 2
    # UDP: the datagrams queued, in order (sent again from their senders' addresses)
    datagrams: Annotated[tuple[InetDatagram, ...], Count(MAX_ITEMS)] = ()
    nonlocal_address: bool = False   # bound to an address its host did not have (IP_FREEBIND at the time)
    bpf_filter: BpfProgram = b""   # a classic BPF filter (SO_ATTACH_FILTER), as SO_GET_FILTER reads it
    filter_locked: bool = False    # SO_LOCK_FILTER


@frozen
class InetSockets(Record):
    """The TCP and UDP sockets the process's fds refer to."""

    TYPE = 15
    sockets: Annotated[tuple[InetSocket, ...], Count(MAX_FDS)]

    def validate(self) -> None:
        seen: set[int] = set()
        for s in self.sockets:
            _check(s.id not in seen, f"inet socket {s.id} twice")
            seen.add(s.id)
            _check(s.family in (AF_INET, AF_INET6), f"inet socket {s.id}: family {s.family}")
            _check(len(s.bpf_filter) % BPF_INSTRUCTION == 0, f"inet socket {s.id}: a BPF filter of part of an "
                   "instruction")
            _check((s.type, s.protocol) in ((SOCK_STREAM, IPPROTO_TCP), (SOCK_DGRAM, IPPROTO_UDP)),
                   f"inet socket {s.id}: type {s.type} protocol {s.protocol}")
            size = 4 if s.family == AF_INET else 16
            _check(len(s.address) in (0, size) and len(s.peer_address) in (0, size),
                   f"inet socket {s.id}: an address of the wrong size")
            _check(bool(s.address) or s.port == 0, f"inet socket {s.id}: a port without an address")
            _check(bool(s.peer_address) == bool(s.peer_port) and (not s.peer_address or s.type == SOCK_DGRAM
                                                                     or bool(s.connection)),
                   f"inet socket {s.id}: a peer")
            _check(not s.connection or (s.protocol == IPPROTO_TCP and bool(s.peer_address) and bool(s.address)
                                        and s.port != 0 and s.backlog < 0),
                   f"inet socket {s.id}: a connection without both ends' addresses")
            for c in s.connection:
                _check(c.unsent <= sum(map(len, c.send_queue)), f"inet socket {s.id}: more unsent than queued")
            _check(not s.shutdown or s.type == SOCK_DGRAM, f"inet socket {s.id}: a shut TCP socket")
            _check(not s.datagrams or s.type == SOCK_DGRAM, f"inet socket {s.id}: datagrams on a TCP socket")
            _check(all(len(d.address) == size for d in s.datagrams), f"inet socket {s.id}: a sender's address")
            _check(sum(len(d.data) for d in s.datagrams) <= MAX_SOCKET_QUEUE, f"inet socket {s.id}: queue too large")
            _check(not s.nonlocal_address or bool(s.address), f"inet socket {s.id}: an unbound nonlocal address")
            _check(s.backlog < 0 or (s.type == SOCK_STREAM and bool(s.address) and not s.peer_address),
                   f"inet socket {s.id}: a listener that is not one")
            names = [(o.level, o.name) for o in s.options]
            _check(len(set(names)) == len(names), f"inet socket {s.id}: an option twice")
            for o in s.options:
                want = INET_OPTIONS.get((o.level, o.name))
                _check(want is not None and (len(o.value) == want if want else 0 < len(o.value) <= 16),
                       f"inet socket {s.id}: option {o.level}/{o.name}")


@frozen
class EventFile:
    """An eventfd, timerfd, signalfd, epoll instance, pidfd, inotify or fanotify instance, with its state."""

    id: ObjectId
    kind: Annotated[str, Text(16)]   # one of EVENT_KINDS
    count: Annotated[int, Int(0, (1 << 64) - 2, "an eventfd counter")] = 0   # eventfd: the counter
    semaphore: bool = False  # eventfd: EFD_SEMAPHORE
    clockid: Annotated[int, Int(0, 15, "a clock id")] = 0   # timerfd: its clock
    value_ns: NonNegI64 = 0  # timerfd: time left to the next expiry (0: disarmed)
    interval_ns: NonNegI64 = 0   # timerfd: period
    ticks: U64 = 0           # timerfd: expirations not read yet
    sigmask: U64 = 0         # signalfd: the signals it reads
    watches: Annotated[tuple[EpollWatch, ...], Count(MAX_WATCHES)] = ()    # epoll: its interest list
    pid: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a pid or 0")] = 0   # pidfd: the process it refers to
                             # (one that moves too)
    inotify: Annotated[tuple[InotifyWatch, ...], Count(MAX_WATCHES)] = ()   # inotify: its watches
    queued: U32 = 0          # inotify, fanotify: bytes of events queued at the freeze (not carried)
    init_flags: Annotated[int, Int(0, (1 << 31) - 1, "fanotify_init flags")] = 0   # fanotify: its class, ...
    event_flags: Annotated[int, Int(0, (1 << 31) - 1, "open flags")] = 0   # fanotify: how events' fds are opened
    marks: Annotated[tuple[FanotifyMark, ...], Count(MAX_WATCHES)] = ()   # fanotify: its marks
    # format 9: timerfd: its last timerfd_settime's flags, TFD_TIMER_ABSTIME (1) and
    # TFD_TIMER_CANCEL_ON_SET (2: a clock_settime of CLOCK_REALTIME cancels it, ECANCELED)
    settime_flags: Annotated[int, Int(0, 3, "timerfd settime flags")] = 0


@frozen
class EventFiles(Record):
    """The eventfds, timerfds, signalfds and epoll instances the process's fds refer to."""

    TYPE = 12
    files: Annotated[tuple[EventFile, ...], Count(MAX_FDS)]

    def validate(self) -> None:
        seen: set[int] = set()
        for e in self.files:
            _check(e.id not in seen and e.kind in EVENT_KINDS, f"event file {e.id}")
            _check(e.kind == "epoll" or not e.watches, f"event file {e.id}: watches on a {e.kind}")
            _check((e.pid > 0) if e.kind == "pidfd" else e.pid == 0, f"event file {e.id}: its process")
            _check(e.kind == "inotify" or not e.inotify, f"event file {e.id}: inotify watches on a {e.kind}")
            _check(e.kind in ("inotify", "fanotify") or not e.queued, f"event file {e.id}: events queued on a "
                   f"{e.kind}")
            _check(e.kind == "fanotify" or not (e.marks or e.init_flags or e.event_flags),
                   f"event file {e.id}: fanotify marks on a {e.kind}")
            _check(all(m.kind in FANOTIFY_MARKS for m in e.marks), f"event file {e.id}: a fanotify mark's kind")
            _check(len({w.wd for w in e.inotify}) == len(e.inotify), f"event file {e.id}: an inotify watch twice")
            _check(e.kind == "timerfd" or not e.settime_flags, f"event file {e.id}: timerfd flags on a {e.kind}")
            seen.add(e.id)


@frozen
class FileContents(Record):
    """A slice of the contents of a deleted file the process holds open (fds of kind
    "deleted" name it by ``id``); the file is made again, unlinked, from its slices. A memfd
    is made again as a memfd of its name (the fd's path, ``/memfd:NAME``), with its seals
    (``F_GET_SEALS``) added once its contents are in. Shared mappings of the file are mapped
    from the file made again (``Vma.ino`` is ``id``). One no fd of the job holds, only its
    mappings (a memfd mapped and closed), is carried the same way, and made again by ``name``."""

    TYPE = 13
    id: ObjectId             # the file's inode on the source host
    size: Offset             # the file's size (the slices of a file all say the same)
    offset: Offset
    data: Annotated[bytes, Blob(MAX_BYTES)]
    mode: Annotated[int, Int(0, 0o7777, "file permissions")] = 0o600
    uid: Id = 0
    gid: Id = 0
    memfd: bool = False
    seals: Annotated[int, Int(0, MEMFD_SEALS, "memfd seals")] = 0
    # A file under /dev/shm (tmpfs: host-local) that still has its name: made again at ``path``
    # where the destination has no file there, used as it is where the destination sees this
    # very file (``boot`` and ``dev`` the source's, ``id`` its inode); fds and mappings name it
    # by its path.
    path: Annotated[str, AbsPath(optional=True)] = ""
    dev: U64 = 0
    boot: Annotated[str, Text(64)] = ""
    # format 6: a deleted file or memfd that no fd of the job holds, only mappings: the name
    # they show (``/memfd:NAME``, or the path the file had), to make it again by (no fd names it)
    name: Annotated[str, AbsPath(optional=True)] = ""
    # format 10: its access and modification times (ns; 0: not recorded), set again once its
    # contents are in
    atime_ns: NonNegI64 = 0
    mtime_ns: NonNegI64 = 0

    def validate(self) -> None:
        _check(self.offset + len(self.data) <= self.size, f"deleted file {self.id}: a slice past its end")
        _check(not (self.path and self.name), f"file {self.id}: a /dev/shm file with the name of a deleted one")
        _check(self.memfd or not self.seals, f"deleted file {self.id}: seals on a file that is no memfd")
        _check(not (self.path and self.memfd), f"file {self.id}: a memfd with a path")
        _check(not self.path or is_shm_path(self.path), f"file {self.id}: {self.path[:80]!r} is not a file of {SHM_DIR}")


def is_shm_path(path: str) -> bool:
    """A file directly in /dev/shm (no subdirectory, no ``..``), as shm_open() makes them."""
    name = path[len(SHM_DIR):]
    return path.startswith(SHM_DIR) and bool(name) and "/" not in name and name not in (".", "..")


def check_objects_referenced(files: Files, pipes: Pipes, sockets: UnixSockets,
                             events: EventFiles = EventFiles(()), *contents: FileContents,
                             inet: InetSockets = InetSockets(())) -> None:
    """Every pipe, socket, event or deleted-file fd refers to an object the stream carries,
    of its kind."""
    ids: dict[str, set[int]] = {"pipe": {p.id for p in pipes.pipes if not p.path},
                                "fifo": {p.id for p in pipes.pipes if p.path}, "unix": {s.id for s in sockets.sockets},
                                "deleted": {c.id for c in contents}, "inet": {s.id for s in inet.sockets}}
    for e in events.files:
        ids.setdefault(e.kind, set()).add(e.id)
    for kind in EVENT_KINDS:
        ids.setdefault(kind, set())
    for f in files.fds:
        _check(f.kind not in ids or f.obj in ids[f.kind],
               f"fd {f.fd} refers to {f.kind} {f.obj}, which the stream lacks")


# --- threads ------------------------------------------------------------------------------

@frozen
class GpRegs:
    r15: U64
    r14: U64
    r13: U64
    r12: U64
    rbp: U64
    rbx: U64
    r11: U64
    r10: U64
    r9: U64
    r8: U64
    rax: U64
    rcx: U64
    rdx: U64
    rsi: U64
    rdi: U64
    orig_rax: U64
    rip: U64
    cs: U16
    eflags: U64
    rsp: U64
    ss: U16
    fs_base: TlsBase
    gs_base: TlsBase
    ds: U16
    es: U16
    fs: U16
    gs: U16

    def validate(self) -> None:
        # As the kernel's putreg() has it: a selector is null or of privilege level 3, and the
        # code and stack selectors are not null.
        for name in ("cs", "ss", "ds", "es", "fs", "gs"):
            value = getattr(self, name)
            _check((value == 0 and name not in ("cs", "ss")) or value & 3 == 3, f"{name} selector {value:#x}")

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in GP_REG_NAMES)

    @classmethod
    def from_tuple(cls, values: tuple[int, ...]) -> "GpRegs":
        return cls(**dict(zip(GP_REG_NAMES, values)))


# Seccomp (linux/seccomp.h, linux/filter.h): a thread's mode, and in filter mode its chain of
# classic BPF programs, oldest first, each with the flags the kernel reports for it.
SECCOMP_MODE_DISABLED, SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 0, 1, 2
SECCOMP_FILTER_FLAG_LOG = 2
BPF_MAXINSNS = 4096           # instructions of one program
BPF_INSN_SIZE = 8             # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
MAX_INSNS_PER_PATH = 1 << 15  # the kernel's bound on a chain: each program's length plus 4
MAX_SECCOMP_FILTERS = MAX_INSNS_PER_PATH // 5


@frozen
class SeccompFilter:
    flags: Annotated[int, Int(0, SECCOMP_FILTER_FLAG_LOG, "seccomp filter flags")]  # SECCOMP_FILTER_FLAG_LOG
    program: Annotated[bytes, Blob(BPF_MAXINSNS * BPF_INSN_SIZE, BPF_INSN_SIZE)]     # struct sock_filter[]

    def validate(self) -> None:
        _check(self.flags in (0, SECCOMP_FILTER_FLAG_LOG), f"seccomp filter flags {self.flags:#x}")
        _check(len(self.program) % BPF_INSN_SIZE == 0,
               f"a seccomp program of {len(self.program)} bytes (8-byte instructions)")


@frozen
class ThreadState(Record):
    TYPE = 5
    tid: Pid
    leader: bool
    comm: Comm
    regs: GpRegs
    xstate: Annotated[bytes, Blob(MAX_XSTATE, XSAVE_MIN)]   # the NT_X86_XSTATE regset as
                             # PTRACE_GETREGSET returned it
    sigmask: U64
    pending: Annotated[tuple[Siginfo, ...], Count(MAX_PENDING)]   # thread-private siginfo_t records
    tid_address: UserAddr    # set_tid_address / CLONE_CHILD_CLEARTID
    robust_list: UserAddr
    robust_list_len: Annotated[int, Int(0, ROBUST_LIST_HEAD_SIZE, "a robust list head size")]
    rseq_addr: UserAddr = 0
    rseq_len: Annotated[int, Int(0, 1024, "an rseq area size")] = 0
    rseq_sig: U32 = 0
    altstack_sp: UserAddr = 0
    altstack_flags: U32 = 2  # SS_DISABLE
    altstack_size: UserAddr = 0
    # Scheduling, per thread: nice, policy and real-time priority, the CPUs it may run on (a
    # bitmask, CPU 0 in the low bit of the first byte; empty: every CPU), timer slack (0: the
    # default). SCHED_DEADLINE (6) is refused before freezing, so it never appears here.
    nice: Annotated[int, Int(-20, 19, "a nice value")] = 0
    sched_policy: Annotated[int, Int(0, 5, "a scheduling policy")] = 0
    sched_priority: Annotated[int, Int(0, 99, "a real-time priority")] = 0
    sched_reset_on_fork: Flag = 0
    cpus: Annotated[bytes, Blob(MAX_CPUS // 8)] = b""
    timer_slack_ns: U64 = 0
    ioprio: Annotated[int, Int(0, (3 << 13) | 7, "an I/O priority")] = 0   # ionice: class << 13 | level
    # format 6: SECCOMP_MODE_*, and in filter mode the thread's filters, oldest first
    seccomp: Annotated[int, Int(0, SECCOMP_MODE_FILTER, "a seccomp mode")] = 0
    seccomp_filters: Annotated[tuple[SeccompFilter, ...], Count(MAX_SECCOMP_FILTERS)] = ()
    # its NUMA memory policy (set_mempolicy; 0: MPOL_DEFAULT), mode flags and nodes (as MemPolicy's)
    mempolicy: Annotated[int, Int(0, MPOL_MODES - 1, "a NUMA policy mode")] = 0
    mempolicy_flags: Annotated[int, Int(0, MPOL_MODE_FLAGS, "NUMA policy mode flags")] = 0
    mempolicy_nodes: Annotated[bytes, Blob(MAX_NUMNODES // 8)] = b""
    # format 8: the signal it gets when the thread that made it exits (PR_SET_PDEATHSIG; 0: none)
    pdeathsig: Annotated[int, Int(0, NSIG, "a signal number")] = 0

    def validate(self) -> None:
        _check(self.sched_policy != 4, "scheduling policy 4 (no such policy)")
        _check((self.seccomp == SECCOMP_MODE_FILTER) == bool(self.seccomp_filters),
               f"seccomp mode {self.seccomp} with {len(self.seccomp_filters)} filters")
        insns = sum(len(f.program) // BPF_INSN_SIZE + 4 for f in self.seccomp_filters)
        _check(insns <= MAX_INSNS_PER_PATH, f"seccomp filters of {insns} instructions in all (the kernel "
                                            f"takes {MAX_INSNS_PER_PATH})")
        _check((self.sched_priority > 0) == (self.sched_policy in (1, 2)),
               f"real-time priority {self.sched_priority} under scheduling policy {self.sched_policy}")
        for info in self.pending:
            _check(1 <= _signo(info) <= NSIG, f"a pending signal numbered {_signo(info)}")
        _check(self.robust_list_len in (0, ROBUST_LIST_HEAD_SIZE), f"robust list head of {self.robust_list_len} bytes")
        _check(self.mempolicy_flags & ~MPOL_MODE_FLAGS == 0, f"NUMA policy mode flags {self.mempolicy_flags:#x}")
        _check(self.rseq_addr % 32 == 0, f"rseq area at {self.rseq_addr:#x} (rseq areas are 32-byte aligned)")


def check_threads(proc: ProcessState, threads: list[ThreadState], header: ImageHeader) -> None:
    """A process's thread records together: one leader, whose tid is the process's pid; no tid
    twice; every xstate of the one size the header declares (or, in a live stream, whose header
    comes before the threads, of one size) and holding no CPU state component it does not; the
    thread a POSIX timer signals among them."""
    where = f"ThreadState records of process {proc.pid}"
    _check(1 <= len(threads) <= MAX_THREADS, f"{where}: {len(threads)} of them")
    leaders = [t for t in threads if t.leader]
    _check(len(leaders) == 1, f"{where}: {len(leaders)} main threads; a process has one")
    _check(leaders[0].tid == proc.pid, f"{where}: its main thread has tid {leaders[0].tid}")
    _check(len({t.tid for t in threads}) == len(threads), f"{where}: a thread id twice")
    tids = {t.tid for t in threads}
    for timer in proc.posix_timers:
        _check(not timer.notify & 4 or timer.tid in tids, f"{where}: POSIX timer {timer.id} signals thread "
               f"{timer.tid}, which the process lacks")
    size = header.xsave_size or len(threads[0].xstate)
    for t in threads:
        _check(len(t.xstate) == size, f"{where}: thread {t.tid} has an xstate of {len(t.xstate)} bytes, not {size}")
        features = int.from_bytes(t.xstate[512:520], "little")
        _check(not features & ~header.xsave_mask, f"{where}: thread {t.tid} holds CPU state components {features:#x} "
               f"beyond the image's {header.xsave_mask:#x}")


# --- process trees -----------------------------------------------------------------------

MAX_PROCESSES = 1 << 12


@frozen
class TreeMember:
    pid: Pid
    ppid: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a parent pid")]   # the parent's pid (outside the
                             # tree for its root; 0 where that is the kernel)
    pgid: OuterPid           # 0: the group's or session's leader is in a pid namespace above
    sid: OuterPid            # the one the process was read in (as in a container's shell)
    comm: Comm
    exit_status: Annotated[int, Int(-1, 0xFFFF, "a wait status or -1")] = -1   # a zombie: the wait status
                             # its parent has yet to collect; -1: it runs

    @property
    def zombie(self) -> bool:
        return self.exit_status >= 0


@frozen
class ProcessTree(Record):
    """The processes of an image of a process and its descendants, parents before children.
    Each one's records and pages follow a ``ProcessBegin`` naming it; a zombie (exited, not
    yet waited for) has none: it is made again and ends with its status."""

    TYPE = 10
    members: Annotated[tuple[TreeMember, ...], Count(MAX_PROCESSES, 1)]

    def validate(self) -> None:
        seen: set[int] = set()
        for i, m in enumerate(self.members):
            _check(m.pid not in seen, f"process id {m.pid} twice")
            _check(i == 0 or m.ppid in seen, f"process {m.pid} comes before its parent {m.ppid}")
            _check(i > 0 or not m.zombie, f"process {m.pid}: the tree's root is a zombie")
            seen.add(m.pid)


@frozen
class ProcessBegin(Record):
    """The records and pages that follow, up to the next ``ProcessBegin``, are this process's."""

    TYPE = 11
    pid: Pid


MAX_PARENT_RANGES = 1 << 16     # per record: a process with more sends several


@frozen
class ParentPages(Record):
    """Pages of this process that are its parent's very pages at the same addresses (one
    frame for both since a fork, written by neither), not sent again: the restore forks the
    process from its parent's once the parent's pages are in, and it holds them so
    (``agent.inherited``). Only in a process's first copy (an image; a live migration's
    first round), among its pages, before them.

    ``complete``: the source read the frames, and these records name every page of the
    first copy that is the parent's: each other page it brings is one the child wrote since
    the fork, a frame of its own at the source, and is written without comparing it with
    what the child holds. (A version 16 reader drops the flag and compares every page, as
    it did.)"""

    TYPE = 16
    ranges: Annotated[tuple[AddressRange, ...], Count(MAX_PARENT_RANGES)]
    complete: Flag = 0

    def validate(self) -> None:
        prev_end = 0
        for r in self.ranges:
            _check(r.start % PAGE_SIZE == 0 and r.end % PAGE_SIZE == 0, f"unaligned range {r.start:#x}")
            _check(r.start < r.end and _user_addr(r.end), f"range {r.start:#x}-{r.end:#x} out of user space")
            _check(r.start > prev_end or prev_end == 0, f"ranges out of order or touching at {r.start:#x}")
            prev_end = r.end


# --- end of an image ----------------------------------------------------------------------

@frozen
class EndOfImage(Record):
    """Last record: its counts let the reader prove nothing was lost."""

    TYPE = 7
    page_batches: NonNegI64
    pages: NonNegI64
    records: NonNegI64


# --- live protocol (agents) ---------------------------------------------------------------
# Types 32 and up are reserved for the live wire protocol (handshake, rounds, control).

RECORD_TYPES: dict[int, type[Record]] = {
    cls.TYPE: cls
    for cls in (ImageHeader, ProcessState, Mappings, Files, ThreadState, EndOfImage, Pipes,
                UnixSockets, ProcessTree, ProcessBegin, EventFiles, FileContents, MappingsDelta, InetSockets,
                ParentPages)
}


def prepare_codecs() -> None:
    """Encoders and decoders of every record type worked out now (``records.prepare``), and
    the ``__init__`` of every frozen class imported so far (``frozen.ready_all``): an agent or
    a checkpoint does it before it freezes anything."""
    prepare(list(RECORD_TYPES.values()))
    ready_all()


def register(cls: type[Record]) -> type[Record]:
    """Add a record type to the table (used by modules that define live-protocol records)."""
    if cls.TYPE in RECORD_TYPES and RECORD_TYPES[cls.TYPE] is not cls:
        raise ValueError(f"record type id {cls.TYPE} is taken by {RECORD_TYPES[cls.TYPE].__name__}")
    RECORD_TYPES[cls.TYPE] = cls
    return cls


# Sizes msgpack may allocate for while unpacking a record: a string, byte string, list or map
# that claims more is refused from its header, before anything is allocated for it. (A list
# allocates room for the items it claims, so a few bytes that claim millions cost memory.)
UNPACK_LIMITS = {"max_str_len": MAX_STR, "max_bin_len": MAX_BYTES, "max_array_len": MAX_ITEMS,
                 "max_map_len": 1 << 16, "max_ext_len": 0}


def decode_record(payload: bytes | memoryview) -> Record:
    """Decode one record frame's payload, checking everything before building it."""
    try:
        # No item can take less than a byte: nothing may claim more than the payload holds.
        limits = {k: min(v, len(payload)) for k, v in UNPACK_LIMITS.items()}
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True, **limits)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        if "exceeds max_" in str(exc):     # "70000 exceeds max_str_len(65536)"
            raise ProtocolError(f"invalid record: an item too long ({exc})") from None
        raise ProtocolError(f"invalid record: not valid msgpack ({exc})") from None
    except MemoryError:
        raise ProtocolError("invalid record: it claims more memory than this host can give") from None
    if not isinstance(body, dict):
        raise ProtocolError("invalid record: not a map")
    type_id = body.get("t")
    cls = RECORD_TYPES.get(type_id) if isinstance(type_id, int) else None
    if cls is None:
        raise ProtocolError(f"invalid record: unknown record type {type_id!r}")
    version = body.get("v")
    if not isinstance(version, int) or version < 1:
        raise ProtocolError(f"invalid record: {cls.__name__} without a version")
    if version > cls.VERSION:
        raise ProtocolError(
            f"{cls.__name__} record version {version} is newer than this kcr-migrate reads "
            f"({cls.VERSION}); upgrade kcr-migrate on this host")
    return cls.from_wire(body)


def record_to_json(rec: Record) -> dict[str, Any]:
    """A JSON-friendly view for `kcr-migrate show`: bytes become hex, ints stay ints."""
    wire = rec.to_wire()
    out: dict[str, Any] = {"type": type(rec).__name__}
    out.update({k: _jsonable(v) for k, v in wire.items() if k not in ("t", "v")})
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value

