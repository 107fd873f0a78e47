"""The one record schema: checkpoint images and the live wire protocol share it.

Every record has a type id in ``RECORD_TYPES``; ids are never reused, new fields are optional
and go last. ``FORMAT_VERSION`` sits in the image header (and, for live streams, in the
handshake). Page contents never travel inside records: they go in page frames
(``transport.pages``) beside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from transport.errors import ProtocolError
from transport.records import Record

# 1: the first format. 2: images may be signed (TAG frames, ``transport.signing``) and the
# header names the signing key (``ImageHeader.key_id``); a version 1 image reads as unsigned.
FORMAT_VERSION = 2
OLDEST_FORMAT_VERSION = 1
PAGE_SIZE = 4096
# x86_64 user space ends below this address (47-bit, 4-level paging).
TASK_SIZE = 0x7FFF_FFFF_F000
MAX_VMAS = 1 << 18          # well above vm.max_map_count's default of 65530
MAX_FDS = 1 << 20
MAX_THREADS = 1 << 15
MAX_XSTATE = 1 << 16
SIGINFO_SIZE = 128
NSIG = 64

# The x86_64 user_regs_struct, in kernel order.
GP_REG_NAMES: tuple[str, ...] = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp",
    "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(f"invalid record: {what}")


def _user_addr(addr: int) -> bool:
    return 0 <= addr <= TASK_SIZE


# --- the image header ---------------------------------------------------------------------

@dataclass(frozen=True)
class ImageHeader(Record):
    """First record of every image and live stream: who wrote it, for what machine."""

    TYPE = 1
    format_version: int
    tool_version: str
    kernel_release: str
    arch: str
    page_size: int
    xsave_mask: int          # XCR0 features present in the dumped xstate
    xsave_size: int          # bytes of the XSAVE area as dumped
    hostname: str
    created_unix: float
    pid: int
    kind: str                # "checkpoint" or "live"
    key_id: str = ""         # format 2: the id of the key that signed the image ("": unsigned)


# --- process-wide state -------------------------------------------------------------------

@dataclass(frozen=True)
class Creds:
    uids: tuple[int, int, int, int]      # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_inheritable: int
    cap_permitted: int
    cap_effective: int
    cap_bounding: int
    cap_ambient: int
    securebits: int
    no_new_privs: bool


@dataclass(frozen=True)
class SigAction:
    signo: int
    handler: int             # 0 = SIG_DFL, 1 = SIG_IGN, else an address
    flags: int
    restorer: int
    mask: int


@dataclass(frozen=True)
class ITimer:
    which: int               # ITIMER_REAL / VIRTUAL / PROF
    interval_us: int
    value_us: int


@dataclass(frozen=True)
class PosixTimer:
    """A timer_create() timer: restored under its id, with the time left to its next expiry
    (the clock stops while the process is frozen, as for every timer it has)."""

    id: int
    clockid: int
    signo: int               # the signal it sends (notify "signal")
    sigval: int              # sigev_value, as the process gave it
    notify: int              # SIGEV_SIGNAL 0, SIGEV_NONE 1, | SIGEV_THREAD_ID 4
    tid: int                 # SIGEV_THREAD_ID: the thread it signals
    value_ns: int            # time left (0: disarmed)
    interval_ns: int


SIGEV_NOTIFY = (0, 1, 4)     # SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID (glibc's SIGEV_THREAD is one)


@dataclass(frozen=True)
class Rlimit:
    resource: int
    soft: int
    hard: int


@dataclass(frozen=True)
class MmFields:
    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


@dataclass(frozen=True)
class ProcessState(Record):
    """Everything the process owns as a whole (threads, memory and files are separate)."""

    TYPE = 2
    pid: int
    exe: str
    cwd: str
    root: str
    umask: int
    personality: int
    dumpable: int
    creds: Creds
    rlimits: tuple[Rlimit, ...]
    mm: MmFields
    auxv: bytes
    sigactions: tuple[SigAction, ...]
    itimers: tuple[ITimer, ...]
    shared_pending: tuple[bytes, ...]   # siginfo_t, SIGINFO_SIZE bytes each
    child_subreaper: int = 0
    oom_score_adj: int = 0
    thp_disable: int = 0     # prctl(PR_SET_THP_DISABLE)
    lock_future: int = 0     # mlockall(MCL_FUTURE): mappings to come are locked
    posix_timers: tuple[PosixTimer, ...] = ()

    def validate(self) -> None:
        _check(len(self.sigactions) <= NSIG, "too many sigactions")
        for sa in self.sigactions:
            _check(1 <= sa.signo <= NSIG, f"signal number {sa.signo}")
        for info in self.shared_pending:
            _check(len(info) == SIGINFO_SIZE, "siginfo size")
        _check(len(self.shared_pending) <= 4096, "too many pending signals")
        _check(len(self.auxv) % 16 == 0 and len(self.auxv) <= 4096, "auxv size")
        _check(0 <= self.umask <= 0o777, "umask")
        for rl in self.rlimits:
            _check(0 <= rl.resource < 16, f"rlimit resource {rl.resource}")
        for name in ("start_brk", "brk", "arg_start", "arg_end", "env_start", "env_end", "start_stack"):
            _check(_user_addr(getattr(self.mm, name)), f"mm.{name} out of user space")
        _check(self.exe.startswith("/") and self.cwd.startswith("/"), "exe and cwd must be absolute")
        _check(-1000 <= self.oom_score_adj <= 1000 and self.thp_disable in (0, 1), "oom_score_adj or THP flag")
        _check(len(self.posix_timers) <= 1 << 16, "too many POSIX timers")
        ids: set[int] = set()
        for t in self.posix_timers:
            _check(0 <= t.id < 1 << 31 and t.id not in ids and 0 <= t.clockid < 16 and t.notify in SIGEV_NOTIFY
                   and (t.notify == 1 or 1 <= t.signo <= NSIG) and 0 <= t.sigval < 1 << 64
                   and (t.notify != 4 or 0 < t.tid < 1 << 22) and t.value_ns >= 0 and t.interval_ns >= 0,
                   f"POSIX timer {t.id}")
            ids.add(t.id)


# --- memory layout ------------------------------------------------------------------------

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4

VMA_KINDS = ("anon", "file", "heap", "stack", "vdso", "vvar", "vvar_vclock", "vsyscall")

# Advice recorded from smaps VmFlags and replayed with madvise().
ADV_DONTDUMP, ADV_DONTFORK, ADV_WIPEONFORK, ADV_HUGEPAGE, ADV_NOHUGEPAGE, ADV_MERGEABLE = (
    1, 2, 4, 8, 16, 32)
# Not advice but kept beside it: mlock()ed (VmFlags lo), and locked on fault (lf, mlock2 MLOCK_ONFAULT);
# may be made writable (mw: a MAP_SHARED file mapping of a file opened for writing, even if read-only now).
VMA_LOCKED, VMA_LOCKONFAULT, VMA_MAYWRITE = 64, 128, 256


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    prot: int
    shared: bool
    kind: str
    path: str = ""           # file-backed mappings only
    pgoff: int = 0           # offset into the file (or shared memory object), bytes
    growsdown: bool = False
    advice: int = 0
    file_size: int = -1      # size of the file when dumped, to detect a changed file
    file_mtime_ns: int = 0
    ino: int = 0             # the file's or shared memory object's inode on the source host (0: none):
                             # tells a new object mapped at the same place from the one before

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Mappings(Record):
    """The whole address space layout, sorted by address."""

    TYPE = 3
    vmas: tuple[Vma, ...]

    def validate(self) -> None:
        _check(len(self.vmas) <= MAX_VMAS, "too many mappings")
        prev_end = 0
        for v in self.vmas:
            _check(v.kind in VMA_KINDS, f"mapping kind {v.kind!r}")
            if v.kind == "vsyscall":
                continue  # fixed kernel address above user space, never restored
            _check(v.start % PAGE_SIZE == 0 and v.end % PAGE_SIZE == 0, f"unaligned mapping {v.start:#x}")
            _check(v.start < v.end and _user_addr(v.end), f"mapping {v.start:#x}-{v.end:#x} out of user space")
            _check(v.start >= prev_end, f"overlapping mapping at {v.start:#x}")
            _check(0 <= v.prot <= 7, "mapping protection")
            _check(v.pgoff >= 0 and v.pgoff % PAGE_SIZE == 0, "mapping file offset")
            _check(v.kind != "file" or v.path.startswith("/"), "file mapping without an absolute path")
            prev_end = v.end


# --- files --------------------------------------------------------------------------------

EVENT_KINDS = ("eventfd", "timerfd", "signalfd", "epoll", "pidfd")
FD_KINDS = ("file", "dir", "chr", "pipe", "unix", "redirect") + EVENT_KINDS
OBJECT_KINDS = ("pipe", "unix") + EVENT_KINDS    # fds of these kinds refer to an object the stream carries
# The character devices an fd may be carried on (agent.procfs refuses the others): opening a
# device can have effects of its own, so an image that names another one is refused too.
CHAR_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
MAX_PIPE_SIZE = 1 << 28        # well above /proc/sys/fs/pipe-max-size's default of 1 MiB
O_CLOEXEC_FLAG = 0o2000000     # per fd, not per description


@dataclass(frozen=True)
class FileDesc:
    """One fd. ``kind`` says what it refers to: a path ("file", "dir", "chr"), an end of a pipe
    in ``Pipes`` ("pipe"; ``flags`` tell which end), a socket in ``UnixSockets`` ("unix"), or a
    file the user named to take the place of what the fd referred to ("redirect", with
    ``--redirect FD=PATH``)."""

    fd: int
    kind: str
    path: str
    flags: int               # open flags as /proc/PID/fdinfo shows them (octal there)
    pos: int
    size: int = -1
    mtime_ns: int = 0
    desc: int = 0            # fds with the same non-zero ``desc`` share one open file description
                             # (dup, fork): one offset, one set of status flags
    obj: int = 0             # kind "pipe": the ``PipeBuffer.id`` of its pipe; "unix": the
                             # ``UnixSocket.id`` of its socket; an event kind: the ``EventFile.id``


@dataclass(frozen=True)
class Files(Record):
    TYPE = 4
    fds: tuple[FileDesc, ...]

    def validate(self) -> None:
        _check(len(self.fds) <= MAX_FDS, "too many file descriptors")
        seen: set[int] = set()
        shared: dict[int, FileDesc] = {}
        for f in self.fds:
            _check(0 <= f.fd < MAX_FDS and f.fd not in seen, f"file descriptor number {f.fd}")
            _check(f.kind in FD_KINDS, f"file kind {f.kind!r}")
            _check(f.kind in OBJECT_KINDS or f.path.startswith("/"), f"fd {f.fd}: path must be absolute")
            _check(f.kind != "chr" or f.path in CHAR_DEVICES, f"fd {f.fd}: device {f.path[:64]!r}")
            _check(f.pos >= 0, f"fd {f.fd}: offset")
            _check(f.desc >= 0 and f.obj >= 0, f"fd {f.fd}: description or object id")
            _check((f.kind in OBJECT_KINDS) == (f.obj > 0), f"fd {f.fd}: an object id where none belongs, "
                   "or none where one does")
            if f.desc:
                first = shared.setdefault(f.desc, f)
                _check((first.kind, first.path, first.obj, first.flags & ~O_CLOEXEC_FLAG, first.pos)
                       == (f.kind, f.path, f.obj, f.flags & ~O_CLOEXEC_FLAG, f.pos),
                       f"fd {f.fd} shares a description with fd {first.fd} but differs from it")
            seen.add(f.fd)


@dataclass(frozen=True)
class PipeBuffer:
    id: int                  # the pipe's inode on the source host
    size: int                # its capacity (F_GETPIPE_SZ)
    data: bytes              # the bytes in it, unread, in order


@dataclass(frozen=True)
class Pipes(Record):
    """The pipes the process's fds refer to, with their bytes in flight."""

    TYPE = 8
    pipes: tuple[PipeBuffer, ...]

    def validate(self) -> None:
        _check(len(self.pipes) <= MAX_FDS, "too many pipes")
        seen: set[int] = set()
        for p in self.pipes:
            _check(p.id > 0 and p.id not in seen, f"pipe id {p.id}")
            _check(4096 <= p.size <= MAX_PIPE_SIZE, f"pipe {p.id}: capacity {p.size}")
            _check(len(p.data) <= p.size, f"pipe {p.id}: more bytes than it holds")
            seen.add(p.id)


SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
MAX_SOCKET_QUEUE = 1 << 28


@dataclass(frozen=True)
class SocketOptions:
    """SOL_SOCKET options a unix socket gets again (buffer sizes as getsockopt shows them)."""

    rcvbuf: int
    sndbuf: int
    passcred: int = 0
    passsec: int = 0
    peek_off: int = -1
    rcvlowat: int = 1
    oobinline: int = 0
    rcvtimeo_us: int = 0
    sndtimeo_us: int = 0
    passpidfd: int = 0
    passrights: int = 1


@dataclass(frozen=True)
class UnixSocket:
    """An unbound unix socket: one end of a socketpair or connection whose other end moves
    too (``peer``), one whose peer has closed, or one never connected."""

    id: int                  # its inode on the source host
    type: int                # SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET
    peer: int                # the ``id`` of its peer here; 0 if it has none
    peer_closed: bool        # it was connected, and its peer has gone since
    shutdown: int            # sk_shutdown: 1 receive side, 2 send side
    options: SocketOptions
    queue: tuple[bytes, ...]   # its receive queue: one item for a stream, one per message otherwise


@dataclass(frozen=True)
class UnixSockets(Record):
    """The unix sockets the process's fds refer to, with what is queued in them."""

    TYPE = 9
    sockets: tuple[UnixSocket, ...]

    def validate(self) -> None:
        _check(len(self.sockets) <= MAX_FDS, "too many sockets")
        by_id = {s.id: s for s in self.sockets}
        _check(len(by_id) == len(self.sockets), "socket ids repeat")
        for s in self.sockets:
            _check(s.id > 0, f"socket id {s.id}")
            _check(s.type in (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET), f"socket {s.id}: type {s.type}")
            _check(s.peer == 0 or (s.peer in by_id and by_id[s.peer].peer == s.id and s.peer != s.id),
                   f"socket {s.id}: its peer {s.peer} is not a socket here that names it back")
            _check(not (s.peer and s.peer_closed), f"socket {s.id}: a peer that is both there and gone")
            _check(0 <= s.shutdown <= 3, f"socket {s.id}: shutdown {s.shutdown}")
            _check(sum(len(m) for m in s.queue) <= MAX_SOCKET_QUEUE, f"socket {s.id}: queue too large")
            _check(s.type != SOCK_STREAM or len(s.queue) <= 1, f"socket {s.id}: a stream queues one run of bytes")
            o = s.options
            _check(0 < o.rcvbuf <= 1 << 31 and 0 < o.sndbuf <= 1 << 31, f"socket {s.id}: buffer sizes")
            _check(o.rcvtimeo_us >= 0 and o.sndtimeo_us >= 0 and o.peek_off >= -1, f"socket {s.id}: options")


@dataclass(frozen=True)
class EpollWatch:
    fd: int                  # the watched fd's number in the process
    events: int              # the event mask as registered (EPOLLET, EPOLLONESHOT, ... included)
    data: int


@dataclass(frozen=True)
class EventFile:
    """An eventfd, timerfd, signalfd, epoll instance or pidfd, with its state."""

    id: int
    kind: str                # one of EVENT_KINDS
    count: int = 0           # eventfd: the counter
    semaphore: bool = False  # eventfd: EFD_SEMAPHORE
    clockid: int = 0         # timerfd: its clock
    value_ns: int = 0        # timerfd: time left to the next expiry (0: disarmed)
    interval_ns: int = 0     # timerfd: period
    ticks: int = 0           # timerfd: expirations not read yet
    sigmask: int = 0         # signalfd: the signals it reads
    watches: tuple[EpollWatch, ...] = ()     # epoll: its interest list
    pid: int = 0             # pidfd: the process it refers to (one that moves too)


MAX_WATCHES = 1 << 20


@dataclass(frozen=True)
class EventFiles(Record):
    """The eventfds, timerfds, signalfds and epoll instances the process's fds refer to."""

    TYPE = 12
    files: tuple[EventFile, ...]

    def validate(self) -> None:
        _check(len(self.files) <= MAX_FDS, "too many event files")
        seen: set[int] = set()
        for e in self.files:
            _check(e.id > 0 and e.id not in seen and e.kind in EVENT_KINDS, f"event file {e.id}")
            _check(0 <= e.count < (1 << 64) - 1 and e.value_ns >= 0 and e.interval_ns >= 0 and e.ticks >= 0
                   and 0 <= e.sigmask < 1 << 64 and 0 <= e.clockid < 16, f"event file {e.id}: its state")
            _check(len(e.watches) <= MAX_WATCHES, f"epoll {e.id}: too many watches")
            _check((0 < e.pid < 1 << 22) if e.kind == "pidfd" else e.pid == 0, f"event file {e.id}: its process")
            for w in e.watches:
                _check(0 <= w.fd < MAX_FDS and 0 <= w.events < 1 << 32 and 0 <= w.data < 1 << 64,
                       f"epoll {e.id}: a watch")
            seen.add(e.id)


def check_objects_referenced(files: Files, pipes: Pipes, sockets: UnixSockets,
                             events: EventFiles = EventFiles(())) -> None:
    """Every pipe, socket or event fd refers to an object the stream carries, of its kind."""
    ids: dict[str, set[int]] = {"pipe": {p.id for p in pipes.pipes}, "unix": {s.id for s in sockets.sockets}}
    for e in events.files:
        ids.setdefault(e.kind, set()).add(e.id)
    for kind in EVENT_KINDS:
        ids.setdefault(kind, set())
    for f in files.fds:
        _check(f.kind not in ids or f.obj in ids[f.kind],
               f"fd {f.fd} refers to {f.kind} {f.obj}, which the stream lacks")


# --- threads ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpRegs:
    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in GP_REG_NAMES)

    @classmethod
    def from_tuple(cls, values: tuple[int, ...]) -> "GpRegs":
        return cls(**dict(zip(GP_REG_NAMES, values)))


@dataclass(frozen=True)
class ThreadState(Record):
    TYPE = 5
    tid: int
    leader: bool
    comm: str
    regs: GpRegs
    xstate: bytes            # the NT_X86_XSTATE regset as PTRACE_GETREGSET returned it
    sigmask: int
    pending: tuple[bytes, ...]   # thread-private siginfo_t records
    tid_address: int         # set_tid_address / CLONE_CHILD_CLEARTID
    robust_list: int
    robust_list_len: int
    rseq_addr: int = 0
    rseq_len: int = 0
    rseq_sig: int = 0
    altstack_sp: int = 0
    altstack_flags: int = 2  # SS_DISABLE
    altstack_size: int = 0

    def validate(self) -> None:
        _check(len(self.xstate) <= MAX_XSTATE and len(self.xstate) >= 576 or not self.xstate, "xstate size")
        for info in self.pending:
            _check(len(info) == SIGINFO_SIZE, "siginfo size")
        _check(len(self.pending) <= 4096, "too many pending signals")
        _check(_user_addr(self.tid_address) and _user_addr(self.rseq_addr), "thread addresses")
        _check(_user_addr(self.robust_list), "robust list address")
        _check(0 <= self.rseq_len <= 1024, "rseq area size")
        _check(len(self.comm) < 64, "thread name")


# --- process trees -----------------------------------------------------------------------

MAX_PROCESSES = 1 << 12


@dataclass(frozen=True)
class TreeMember:
    pid: int
    ppid: int                # the parent's pid (outside the tree for its root)
    pgid: int
    sid: int
    comm: str
    exit_status: int = -1    # a zombie: the wait status its parent has yet to collect; -1: it runs

    @property
    def zombie(self) -> bool:
        return self.exit_status >= 0


@dataclass(frozen=True)
class ProcessTree(Record):
    """The processes of an image of a process and its descendants, parents before children.
    Each one's records and pages follow a ``ProcessBegin`` naming it; a zombie (exited, not
    yet waited for) has none: it is made again and ends with its status."""

    TYPE = 10
    members: tuple[TreeMember, ...]

    def validate(self) -> None:
        _check(1 <= len(self.members) <= MAX_PROCESSES, "process count")
        seen: set[int] = set()
        for i, m in enumerate(self.members):
            _check(0 < m.pid < 1 << 22 and m.pid not in seen, f"process id {m.pid}")
            _check(i == 0 or m.ppid in seen, f"process {m.pid} comes before its parent {m.ppid}")
            _check(m.pgid > 0 and m.sid > 0 and len(m.comm) < 64, f"process {m.pid}: group, session or name")
            _check(-1 <= m.exit_status <= 0xFFFF and (i > 0 or not m.zombie), f"process {m.pid}: exit status")
            seen.add(m.pid)


@dataclass(frozen=True)
class ProcessBegin(Record):
    """The records and pages that follow, up to the next ``ProcessBegin``, are this process's."""

    TYPE = 11
    pid: int


# --- end of an image ----------------------------------------------------------------------

@dataclass(frozen=True)
class EndOfImage(Record):
    """Last record: its counts let the reader prove nothing was lost."""

    TYPE = 7
    page_batches: int
    pages: int
    records: int


# --- live protocol (agents) ---------------------------------------------------------------
# Types 32 and up are reserved for the live wire protocol (handshake, rounds, control).

RECORD_TYPES: dict[int, type[Record]] = {
    cls.TYPE: cls
    for cls in (ImageHeader, ProcessState, Mappings, Files, ThreadState, EndOfImage, Pipes,
                UnixSockets, ProcessTree, ProcessBegin, EventFiles)
}


def register(cls: type[Record]) -> type[Record]:
    """Add a record type to the table (used by modules that define live-protocol records)."""
    if cls.TYPE in RECORD_TYPES and RECORD_TYPES[cls.TYPE] is not cls:
        raise ValueError(f"record type id {cls.TYPE} is taken by {RECORD_TYPES[cls.TYPE].__name__}")
    RECORD_TYPES[cls.TYPE] = cls
    return cls


def decode_record(payload: bytes | memoryview) -> Record:
    """Decode one record frame's payload, checking everything before building it."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"invalid record: not valid msgpack ({exc})") from None
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

