"""A process's fd table as restore rebuilds it: open file descriptions, pipes, redirections.

- fds that share one open file description (``dup``, ``fork``, ``2>&1``) are found with
  ``kcmp(KCMP_FILE)`` and restored as one description, dup'd: one offset, one set of status
  flags, as before (two separate opens would let stdout and stderr overwrite each other);
- a pipe is carried when nothing outside the process holds either of its ends (a self-pipe,
  a pipe whose writer has exited): its capacity and the bytes in it travel, read without
  consuming them (``tee(2)`` from a dup taken with ``pidfd_getfd``), so a process that runs on
  (a rollback, ``--leave-running``) loses nothing;
- a FIFO (named pipe) likewise, when every fd open on it moves: its pipe travels as a pipe
  does, with its path, permissions and owner, and each fd as an open of that path with its
  flags (kind "fifo"); one deleted from its directory is a pipe (kind "pipe"); a FIFO that a
  process outside also holds is refused, naming it;
- eventfds (counter, semaphore mode), timerfds (clock, time left, period, expirations not
  read), signalfds (mask) and epoll instances (every watch: fd, event mask with its
  EPOLLET/EPOLLONESHOT/... flags, data), all read from fdinfo; a watch on an fd closed or
  replaced since it was registered is refused (the kernel still reports it, restore could not
  make it again); inotify instances (every watch by path, mask and number; ``agent.inotify``);
- file locks held through an fd (POSIX record locks that are the process's own, OFD locks,
  flocks) go with its record (``agent.locks``); leases are refused;
- an unbound unix socket likewise (a socketpair, as asyncio's self-pipe and
  multiprocessing's duplex pipes are; a socket whose peer has closed; one never connected):
  type, options, shutdown state and every queued message travel (``agent.unix_sockets``);
- an fd whose other end is outside (a pipe to the launcher, a terminal, a socket connected
  to a server) is refused with the process at the other end named, unless the user said what
  it becomes on the destination: ``redirect`` maps fd -> PATH, opened there for appending (or
  reading, for a read end). Sockets of other families are refused.
- a unix socket bound to an absolute path or an abstract name (``agent.unix_names``): bound
  again there; a listener listens again with its backlog, and the clients of the job waiting
  in its accept queue wait there again (one outside the job is refused; one that already sent
  bytes moves only where the source ends once dumped, which lets the dump accept it to read
  them: ``accept_waiting``; there every waiting connection is accepted, to ask who connected
  it, as SO_PEERCRED on the server's end will say once the restored server accepts it; a live
  dump names the client's holder instead, and refuses a socket made under other ids than it has); a connection accepted from it keeps the listener's name, its
  client the peer name; a named datagram socket keeps its queued datagrams with their
  senders' names (senders of the job), and one connected to it stays connected.

``describe`` is the one place that decides, for preflight and dump alike.
"""
from __future__ import annotations

import errno
import functools
import fcntl
import os
import select
import stat
import struct
import termios
import threading
import time
from dataclasses import replace
from typing import Callable, Collection, Mapping, Sequence

from agent import fanotify, inet_sockets, inotify, locks, shm_files, socket_filter, unix_names, unix_sockets
from agent.carried_files import CarriedFile
from agent.procfs import (MQUEUE_MAGIC, SECRETMEM_MAGIC, FdInfo, MappedOnly, check_mapped_only, classify_fd, fd_links,
                          list_fds, mapped_only, read_stat, read_status, read_text, thread_ids)
from precopy.layout import FrozenFileMaps, MapEntry, file_maps
from precopy.kernel import KCMP_FILE, epoll_watches_fd, kcmp, pidfd_getfd, pidfd_open, tee
from transport.errors import NoSuchProcess, UnsupportedResource
from transport.frozen import frozen
from transport.schema import (
    EVENT_KINDS,
    O_CLOEXEC_FLAG,
    IPPROTO_TCP,
    SOCK_DGRAM,
    SOCK_STREAM,
    EpollWatch,
    EventFile,
    EventFiles,
    FanotifyMark,
    FileContents,
    FileDesc,
    FileLock,
    Files,
    InetSocket,
    InetSockets,
    InotifyWatch,
    PipeBuffer,
    Pipes,
    SocketOptions,
    UnixSocket,
    UnixSockets,
    check_objects_referenced,
)

O_ACCMODE = 3
MAX_ID = (1 << 32) - 2     # a uid or gid the kernel could hold (-1 means none)
READ_MODES = (os.O_RDONLY, os.O_RDWR)
# What a redirected fd may have referred to: things whose other end is outside the process.
_REDIRECTABLE = ("a pipe", "a socket", "a terminal", "a FIFO")


@frozen
class Peer:
    """A process outside the migrated set that holds an fd on the same object."""

    pid: int
    comm: str
    fd: int

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm})"


EVENT_TARGETS = {"anon_inode:[eventfd]": "eventfd", "anon_inode:[timerfd]": "timerfd",
                 "anon_inode:[signalfd]": "signalfd", "anon_inode:[eventpoll]": "epoll",
                 "anon_inode:[pidfd]": "pidfd", "anon_inode:inotify": "inotify",
                 "anon_inode:[fanotify]": "fanotify"}


def object_of(target: str) -> tuple[str, int] | None:
    """("pipe" | "socket", inode) from an fd's /proc link ("pipe:[1234]"), or None."""
    for kind in ("pipe", "socket"):
        if target.startswith(f"{kind}:[") and target.endswith("]"):
            return kind, int(target[len(kind) + 2:-1])
    return None


OutsideFd = tuple[int, int, str]      # (pid, fd, what /proc/PID/fd/FD links to)


class ScanStopped(Exception):
    """An ``OutsideScan`` asked to stop (``OutsideWatch.latest``) before it was done."""


def outside_fds(inside: set[int], only: Collection[int] | None = None,
                stop: threading.Event | None = None) -> list[OutsideFd]:
    """Every fd of every process but ``inside`` (and this one), or of ``only`` those: one pass
    over /proc that the checks for pipes, sockets and event files shared with the outside all
    read. It costs every fd on the host (0.25 s for 86,000 here): ``OutsideScan`` keeps it out
    of a frozen job's downtime. ``stop``: once set, the pass ends (``ScanStopped``) before
    the next process."""
    out: list[OutsideFd] = []
    skip = inside | {os.getpid()}
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in os.listdir(proc) if only is None else map(str, only):
            if stop is not None and stop.is_set():
                raise ScanStopped()
            if not name.isdigit() or int(name) in skip:
                continue
            try:       # each link read relative to its directory: no walk from /proc per fd
                fds = os.open(f"{name}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
            except OSError:
                continue          # gone, or not ours to read
            try:
                pid = int(name)
                for fd in os.listdir(fds):
                    try:
                        out.append((pid, int(fd), os.readlink(fd, dir_fd=fds)))
                    except OSError:
                        continue          # closed meanwhile
            except OSError:
                continue                  # gone meanwhile
            finally:
                os.close(fds)
    finally:
        os.close(proc)
    return out


class Outside:
    """The fds of the processes outside a job (``outside_fds``), by what they refer to: the
    checks for pipes, sockets, FIFOs and event files shared with the outside look up the job's
    own objects, each a dictionary lookup, not a pass over every fd of the host.

    ``exclude``: processes whose fds here no longer count (read again in ``extra``, or in the
    job now); ``fifos``: the FIFOs among the fds' paths, if known (else found when first asked:
    a stat of every path an fd outside has open); ``job``: the job's processes as listed (a
    process forked by one of them since is of the job, not outside: ``forked_by_job``)."""

    def __init__(self, fds: list[OutsideFd], *, exclude: Collection[int] = (), extra: "Outside | None" = None,
                 fifos: dict[tuple[int, int], list[OutsideFd]] | None = None,
                 by_target: dict[str, list[OutsideFd]] | None = None, job: Collection[int] = ()) -> None:
        self.fds = fds
        if by_target is None:
            by_target = {}
            for held in fds:
                by_target.setdefault(held[2], []).append(held)
        self.by_target = by_target
        self.exclude = set(exclude)
        self.extra = extra
        self._fifos = fifos
        self.job = frozenset(job)
        self._of_job: dict[int, bool] = {}

    def _get(self, found: list[OutsideFd]) -> list[OutsideFd]:
        return [held for held in found if held[0] not in self.exclude] if self.exclude else list(found)

    def forked_by_job(self, pid: int) -> bool:
        """Does ``pid`` descend from a process of the job? A running job forks (a pool's new
        worker, make's next child) between the listing of its pids and the read of the fds
        outside it: such a child holds what its parent does, and joins the job at its next
        look (where it is checked with the rest), so it is no peer outside. Asked of a
        process found sharing one of the job's objects only (it reads /proc up the tree)."""
        if not self.job:
            return False
        seen = self._of_job.get(pid)
        if seen is not None:
            return seen
        chain: list[int] = []
        up, found = pid, False
        while up > 1 and len(chain) < 4096:
            if up in self.job:
                found = True
                break
            known = self._of_job.get(up)
            if known is not None:
                found = known
                break
            chain.append(up)
            try:
                up = int(read_stat(up)[4])
            except NoSuchProcess:
                break
        for p in chain:
            self._of_job[p] = found
        return found

    def of_target(self, target: str) -> list[OutsideFd]:
        """The fds whose /proc link reads ``target``."""
        return self._get(self.by_target.get(target, [])) + (self.extra.of_target(target) if self.extra else [])

    def holders(self, objects: set[tuple[str, int]]) -> dict[tuple[str, int], list[Peer]]:
        """The processes holding any of these pipes or sockets, as the scan saw them and as
        they still do: one made while the job ran may list a process that has exited or
        closed it since (make's children come and go), which holds nothing now."""
        found: dict[tuple[str, int], list[Peer]] = {}
        for kind, ino in objects:
            target = f"{kind}:[{ino}]"                                # as /proc/PID/fd shows them
            for pid, fd, _ in self.of_target(target):
                if _still_holds(pid, fd, target) and not self.forked_by_job(pid):
                    found.setdefault((kind, ino), []).append(Peer(pid, _comm(pid), fd))
        return found

    def of_kind(self, kind: str) -> list[OutsideFd]:
        """The fds on event files of this kind (``EVENT_TARGETS``)."""
        return [held for target, k in EVENT_TARGETS.items() if k == kind for held in self.of_target(target)]

    def fifos(self) -> dict[tuple[int, int], list[OutsideFd]]:
        """The fds on FIFOs, by the FIFO's (st_dev, st_ino): opened by whatever path (a hard
        link, another mount namespace's view)."""
        if self._fifos is None:
            self._fifos = fifos_among(self.fds)
        out = {ident: self._get(held) for ident, held in self._fifos.items()}
        for ident, held in (self.extra.fifos() if self.extra else {}).items():
            out.setdefault(ident, []).extend(held)
        return out


def _still_holds(pid: int, fd: int, target: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == target
    except OSError:
        return False


def fifos_among(fds: list[OutsideFd], stop: threading.Event | None = None) -> dict[tuple[int, int], list[OutsideFd]]:
    """The fds of ``fds`` on FIFOs, by (st_dev, st_ino). ``stop``: once set, the pass ends
    (``ScanStopped``) before the next fd."""
    out: dict[tuple[int, int], list[OutsideFd]] = {}
    for held in fds:
        other, ofd, target = held
        if not target.startswith("/"):
            continue          # pipes, sockets, anonymous inodes: not a FIFO opened by a path
        if stop is not None and stop.is_set():
            raise ScanStopped()
        try:
            st = os.stat(f"/proc/{other}/fd/{ofd}")
        except OSError:
            continue          # closed or gone while we looked
        if stat.S_ISFIFO(st.st_mode):
            out.setdefault((st.st_dev, st.st_ino), []).append(held)
    return out


class OutsideScan:
    """``outside_fds`` of a job, read while it runs, before it is frozen (``OutsideWatch``),
    indexed (``Outside``); brought up to date once it is frozen (``now``) by reading again only
    what can have changed meanwhile in a way that matters: the processes started since (a child
    that left the job, forked after the read: a daemon's double fork) and those of the job that
    left it (their parent exited: reparented away, holding what they inherited). A process
    outside that was there all along can only take one of the job's objects meanwhile by being
    handed it (a unix socket, pidfd_getfd, /proc/PID/fd): that is not seen (README, Limits). A
    holder the earlier read saw is refused as it was then; the job runs on, and moves at the
    next try once that is no longer so.

    The processes started since: those whose pids were handed out since, which the pid
    namespace's last pid bounds (with its wrap); should more processes have been made since
    than there are pids (the fork count says), every process is read again."""

    def __init__(self, inside: set[int], stop: threading.Event | None = None) -> None:
        """``stop``: once set, the scan ends unmade (``ScanStopped``)."""
        self.inside = set(inside)
        self.started = time.monotonic()
        self.last_pid, self.forks = _pid_clock()
        fds = outside_fds(self.inside, stop=stop)
        self.outside = Outside(fds, fifos=fifos_among(fds, stop))
        self.seconds = time.monotonic() - self.started

    @property
    def fds(self) -> list[OutsideFd]:
        return self.outside.fds

    def now(self, inside: set[int]) -> Outside:
        """Every fd of every process outside ``inside`` (the job now, frozen)."""
        last_pid, forks = _pid_clock()
        if last_pid < 0 or self.last_pid < 0 or forks - self.forks >= _pid_max() - 1:
            return Outside(outside_fds(inside), job=inside)      # the pids went round, or unknown: any could be new
        fresh = {p for p in _pids() if _handed_out(p, self.last_pid, last_pid)}
        fresh |= {p for p in self.inside - inside if os.path.exists(f"/proc/{p}")}
        base = self.outside
        return Outside(base.fds, exclude=fresh | inside, extra=Outside(outside_fds(inside, fresh)),
                       fifos=base._fifos, by_target=base.by_target, job=inside)


class OutsideWatch:
    """``OutsideScan``s made in a thread of their own while a job runs (pre-copy), one at a
    time and busy a fifth of the time at most (on a host of many processes a scan takes a
    good part of a second): the freeze takes the newest, so that neither the frozen job nor
    the last moment before it (the job dirtying its memory) waits for one, and stops one that
    runs, so that it does not take the CPU and the interpreter from the frozen job's reads."""

    BUSY = 0.2

    def __init__(self) -> None:
        self._latest: OutsideScan | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def refresh(self, inside: set[int]) -> None:
        """Start a scan of the outside of ``inside`` (the job now), unless one runs or was
        made lately."""
        if self._thread is not None and self._thread.is_alive():
            return
        last = self._latest
        if last is not None and time.monotonic() - last.started < last.seconds / self.BUSY:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, args=(set(inside), self._stop), name="outside-scan",
                                        daemon=True)
        self._thread.start()

    def _scan(self, inside: set[int], stop: threading.Event) -> None:
        try:
            self._latest = OutsideScan(inside, stop)
        except (OSError, ScanStopped):
            pass            # the next one, or the freeze's own, reads it

    def latest(self, inside: set[int]) -> OutsideScan:
        """The newest scan; one that runs is stopped where an earlier one was made, else waited
        for; without either, one made now (and kept: the next checks of the job take it too)."""
        if self._thread is not None:
            if self._latest is not None:
                self._stop.set()        # ends before its next process's fds, or next stat
            self._thread.join()
        if self._latest is None:
            self._latest = OutsideScan(inside)
        return self._latest

    @property
    def newest(self) -> OutsideScan | None:
        """The newest scan made, if any (none is made for it)."""
        return self._latest


def _pid_clock() -> tuple[int, int]:
    """(the last pid handed out in our pid namespace, or -1 on a kernel that does not say
    (without CONFIG_CHECKPOINT_RESTORE); processes made since boot)."""
    try:
        with open("/proc/sys/kernel/ns_last_pid") as f:
            last = int(f.read())
    except OSError:
        last = -1
    with open("/proc/stat") as f:
        forks = next(int(line.split()[1]) for line in f if line.startswith("processes "))
    return last, forks


def _pid_max() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _handed_out(pid: int, before: int, after: int) -> bool:
    """Whether ``pid`` was handed out after ``before`` up to ``after`` (pids go up, and wrap)."""
    return before < pid <= after if after >= before else pid > before or pid <= after


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


Held = tuple[int, FdInfo]       # (pid, one of its fds)


def describe(pid: int, redirect: Mapping[int, str] | None = None) -> list[FileDesc]:
    """One process's fd table as records, or UnsupportedResource naming the first fd we
    cannot carry."""
    return describe_tree([pid], {pid: redirect or {}})[pid]


def describe_tree(pids: Sequence[int], redirect: Mapping[int, Mapping[int, str]] | None = None,
                  *, accept_waiting: bool = False, outside_watch: OutsideWatch | None = None) -> dict[int, list[FileDesc]]:
    """The fd tables of processes that move together (a process and its descendants): what
    they share among themselves (descriptions, pipes, sockets) is carried; what they share
    with a process outside is refused, naming it. ``redirect``: per pid, fd -> path.
    ``accept_waiting``: the source ends once dumped, so a connection waiting in an accept
    queue with bytes sent may be accepted to read them (``collect_tree``). ``outside_watch``:
    where the outside's fds are read, if the job holds anything they could share (its newest
    scan, brought up to date; one is made and kept there if none was), so that the job's
    later checks and its freeze do not read every fd of the host again (else read now)."""
    return _describe_tree(pids, redirect, accept_waiting=accept_waiting, outside_watch=outside_watch).tables


@frozen
class _Described:
    """``describe_tree``'s fd tables, with the files whose contents ``collect_tree`` carries
    that no fd names: each process's mappings are read once for both."""
    tables: dict[int, list[FileDesc]]
    mapped_only: dict[int, MappedOnly]          # deleted files and memfds mapped, no fd held, by inode
    shm: dict[int, shm_files.ShmFile]           # /dev/shm files held open or mapped, by inode
    fdinfo: dict[tuple[int, int], str]          # (pid, fd) -> /proc/PID/fdinfo/FD, of each event file
    # (pid, fd) -> what the check read of each inotify instance (its watches with their paths)
    # and each fanotify one (``fanotify.read``): found through the mount table and file handles,
    # read once for the check and the record
    watches: dict[tuple[int, int], tuple[InotifyWatch, ...]]
    marks: dict[tuple[int, int], tuple[int, int, tuple[FanotifyMark, ...]]]


def _describe_tree(pids: Sequence[int], redirect: Mapping[int, Mapping[int, str]] | None = None,
                   *, accept_waiting: bool = False, outside_scan: OutsideScan | None = None,
                   outside_watch: OutsideWatch | None = None, maps: FrozenFileMaps | None = None) -> _Described:
    redirect = redirect or {}
    inside = set(pids)
    tables: dict[int, list[FileDesc]] = {}
    objects: dict[tuple[str, int], list[Held]] = {}
    fifos: dict[tuple[int, int], list[Held]] = {}
    fdinfo: dict[tuple[int, int], str] = {}
    watched: dict[tuple[int, int], tuple[InotifyWatch, ...]] = {}
    marked: dict[tuple[int, int], tuple[int, int, tuple[FanotifyMark, ...]]] = {}
    for pid in pids:
        tables[pid] = _records(pid, dict(redirect.get(pid, {})), objects, fifos, fdinfo)
    deleted = {f.obj: f.size for fds in tables.values() for f in fds if f.kind == "deleted"}
    file_maps_of = maps.of if maps is not None else file_maps
    mapped = {pid: file_maps_of(pid) for pid in pids}
    found = job_mapped_only(pids, set(deleted), mapped)
    for m in found.values():
        check_mapped_only(m)
    shm = shm_files.find(pids, mapped)
    events = [(pid, f) for pid, fds in tables.items() for f in fds if f.kind in EVENT_KINDS]
    outside = Outside([])
    if objects or events or fifos:
        scan = outside_scan or (outside_watch.latest(inside) if outside_watch is not None else None)
        outside = scan.now(inside) if scan is not None else Outside(outside_fds(inside), job=inside)
    if fifos:
        _check_fifos_not_shared(fifos, outside)
    sockets = {ino: held for (kind, ino), held in objects.items() if kind == "socket"}
    if sockets:
        known = unix_sockets.query(sockets)
        inet = _check_inet_sockets({ino: held for ino, held in sockets.items() if ino not in known})
        if inet:
            for pid in tables:
                tables[pid] = [replace(f, kind="inet") if f.kind == "unix" and f.obj in inet else f
                               for f in tables[pid]]
        unix = {ino: held for ino, held in sockets.items() if ino in known}
        if unix:
            _check_sockets(unix, outside, accept_waiting, known)
    if events:
        _check_event_files_not_shared(events, outside)
        _check_pidfds(events, inside)
        for pid, f in events:          # every watch still reachable by a path (or refused now)
            if f.kind == "inotify":
                watched[pid, f.fd] = inotify.watches(pid, fdinfo[pid, f.fd])
            elif f.kind == "fanotify":        # and a notification group's (or refused now)
                marked[pid, f.fd] = fanotify.read(pid, f.fd, fdinfo[pid, f.fd])
    if objects:
        shared = outside.holders(set(objects))
        order = {pid: i for i, pid in enumerate(pids)}
        # The one named first: the job's first process's lowest such fd (stdin before stdout).
        for obj, peers in sorted(shared.items(), key=lambda o: (order[objects[o[0]][0][0]], objects[o[0]][0][1].fd)):
            pid, info = objects[obj][0]
            what = "a pipe" if obj[0] == "pipe" else "a socket"
            # Every fd of that process to the outside in one line (a job started over ssh has
            # three), so one more try with them all redirected is the last.
            fds = sorted({i.fd for o in shared for p, i in objects[o] if p == pid})
            others = [fd for fd in fds if fd != info.fd]
            also = f" (as are its fd{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
            raise UnsupportedResource(
                f"pid {pid}'s fd {info.fd} is {what} shared with {peers[0]}, which does not move with it{also}: "
                f"give {_redirect_options(fds)} to open PATH in its place on the destination", pid=pid)
    return _Described(_share_descriptions(tables), found, shm, fdinfo, watched, marked)


def _check_pidfds(ours: list[tuple[int, FileDesc]], inside: set[int]) -> None:
    """A pidfd is made again on the destination for the process it refers to: one that moves
    too (a child the process waits for through it, as asyncio does)."""
    for pid, f in ours:
        if f.kind == "pidfd":
            target = _pidfd_pid(pid, f.fd)
            if target not in inside:
                whom = "a process that has exited and was reaped" if target < 0 else f"pid {target}"
                raise UnsupportedResource(
                    f"pid {pid}'s fd {f.fd} is a pidfd of {whom}, which does not move with it: {_CANNOT}", pid=pid)


def _pidfd_pid(pid: int, fd: int) -> int:
    for line in read_text(pid, "fdinfo", str(fd)).splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


def _check_event_files_not_shared(ours: list[tuple[int, FileDesc]], outside: Outside) -> None:
    """An eventfd, timerfd, signalfd or epoll instance is one object however many processes
    hold it: one that a process outside also holds would be split in two. Refused, naming it
    (kcmp against that process's fds of the same kind)."""
    theirs = {kind: outside.of_kind(kind) for kind in {f.kind for _, f in ours}}
    for pid, f in ours:
        for other, ofd, _ in theirs[f.kind]:
            if _same_description(pid, f.fd, other, ofd) and not outside.forked_by_job(other):
                kind = f.kind
                raise UnsupportedResource(
                    f"pid {pid}'s fd {f.fd} is {'an' if kind[0] in 'e' else 'a'} {kind} shared with "
                    f"{Peer(other, _comm(other), ofd)}, which does not move with it: {_CANNOT}", pid=pid)


def _check_fifos_not_shared(fifos: dict[tuple[int, int], list[Held]], outside: Outside) -> None:
    """A FIFO's pipe is one object however many processes hold it open: one that a process
    outside also holds would be split in two. Refused, naming it: an outside fd on the same
    inode, whatever path it was opened by (a hard link, another mount namespace's view)."""
    theirs = outside.fifos()
    for ident, held in fifos.items():
        peers = [h for h in theirs.get(ident, []) if not outside.forked_by_job(h[0])]
        if not peers:
            continue
        other, ofd, target = peers[0]
        pid, info = held[0]
        also = "" if target == info.target else f" (opened there as {target})"
        raise UnsupportedResource(
            f"pid {pid}'s fd {info.fd} is the FIFO {info.target} shared with {Peer(other, _comm(other), ofd)}{also}, "
            f"which does not move with it: move them together, or give --redirect {info.fd}=PATH to open PATH in "
            "its place on the destination", pid=pid)


FIFO_IDS = 1 << 63      # FIFOs' pipes are numbered from here in the image, clear of pipes' inodes


def _records(pid: int, redirect: dict[int, str], objects: dict[tuple[str, int], list[Held]],
             fifos: dict[tuple[int, int], list[Held]], fdinfo: dict[tuple[int, int], str]) -> list[FileDesc]:
    for fd, path in redirect.items():
        if not path.startswith("/"):
            raise UnsupportedResource(f"--redirect {fd}={path}: give an absolute path", pid=pid)
    infos = list_fds(pid)
    missing = sorted(set(redirect) - {i.fd for i in infos})
    if missing:
        raise UnsupportedResource(
            f"--redirect names fd {missing[0]}, which pid {pid} does not have open: check `ls -l /proc/{pid}/fd`",
            pid=pid)
    out: list[FileDesc] = []
    for info in infos:
        # Before anything opens the file (preflight hashes it): a lease would break.
        held = locks.parse(pid, info.fd, info.target, info.locks)
        if held and info.fd in redirect:
            raise UnsupportedResource(f"pid {pid} holds {locks.describe(held[0])} on {info.target} through fd "
                                      f"{info.fd}, which --redirect replaces: the lock would be lost", pid=pid)
        if info.fd in redirect:
            out.append(FileDesc(fd=info.fd, kind="redirect", path=redirect[info.fd], flags=info.flags, pos=0))
            continue
        obj = object_of(info.target)
        if obj is not None:
            objects.setdefault(obj, []).append((pid, info))
            out.append(FileDesc(fd=info.fd, kind="pipe" if obj[0] == "pipe" else "unix", path="",
                                flags=info.flags, pos=0, obj=obj[1]))
            continue
        if info.target in EVENT_TARGETS:
            out.append(FileDesc(fd=info.fd, kind=EVENT_TARGETS[info.target], path="", flags=info.flags, pos=0))
            fdinfo[pid, info.fd] = info.fdinfo       # (read once: the job is frozen, or this is a look)
            continue
        if info.target.endswith(" (deleted)") and info.st is not None and stat.S_ISREG(info.st.st_mode) \
                and info.fs_type not in (MQUEUE_MAGIC, SECRETMEM_MAGIC):
            out.append(_deleted(pid, info, held))
            continue
        if info.st is not None and stat.S_ISFIFO(info.st.st_mode) and info.target.startswith("/"):
            out.append(_fifo(pid, info, held, fifos))
            continue
        kind, why = classify_fd(info)
        if kind is None:
            same = [i.fd for i in infos if i.target == info.target and i.fd not in redirect]
            fds = f"fd {info.fd}" if len(same) == 1 else f"fds {', '.join(map(str, same))}"
            raise UnsupportedResource(f"pid {pid} has {why} open as {fds}: {_CANNOT}"
                                      f"{_redirect_hint(same, why)}", pid=pid)
        if held and kind != "file":
            raise UnsupportedResource(f"pid {pid} holds {locks.describe(held[0])} on {info.target} (fd {info.fd}), "
                                      "which is not a regular file: kcr-migrate carries locks on regular files only", pid=pid)
        if kind == "dir" and not info.flags & os.O_PATH and _signal_owner(pid, info.fd):
            raise UnsupportedResource(
                f"pid {pid}'s fd {info.fd} (the directory {info.target}) signals a process of its changes, as a "
                "dnotify watch (fcntl F_NOTIFY) makes it: the kernel shows such watches nowhere, so they cannot be "
                f"carried; watch it with inotify, or {_CANNOT}", pid=pid)
        st = info.st
        out.append(FileDesc(fd=info.fd, kind=kind, path=info.target, flags=info.flags, pos=info.pos,
                            size=st.st_size if st is not None and kind == "file" else -1,
                            mtime_ns=st.st_mtime_ns if st is not None and kind == "file" else 0, locks=held,
                            sig=_lease_signal(pid, info.fd) if any(h.kind == "lease" for h in held) else 0))
    return [_async_owner(pid, f) if f.flags & os.O_ASYNC and f.kind != "redirect" else f for f in out]


F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
F_GETOWN_EX = 16


def _dup(pid: int, fd: int) -> int:
    """A dup, here, of ``pid``'s ``fd`` (pidfd_getfd): its open file description itself, not a
    new open of the file; the caller closes it."""
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)

def _async_owner(pid: int, f: FileDesc) -> FileDesc:
    """An O_ASYNC description's owner (F_GETOWN_EX: whom its I/O signals) and signal
    (F_GETSIG), asked of the description itself. One that signals a process that does not
    move is refused: on the destination that pid is another process, or none."""
    dup = _dup(pid, f.fd)
    try:
        sig = fcntl.fcntl(dup, locks.F_GETSIG)
        kind, who = _getown_ex(dup)
    finally:
        os.close(dup)
    if who and not ((kind == F_OWNER_PID and who == pid) or (kind == F_OWNER_TID and who in thread_ids(pid))
                    or (kind == F_OWNER_PGRP and who == os.getpgid(pid))):
        what = {F_OWNER_TID: "thread", F_OWNER_PID: "process", F_OWNER_PGRP: "process group"}.get(kind, "owner")
        raise UnsupportedResource(
            f"pid {pid}'s fd {f.fd} sends its I/O signals (O_ASYNC, F_SETOWN) to {what} {who}, which does not move "
            f"with it: point them at the process itself (F_SETOWN), or {_CANNOT}", pid=pid)
    return replace(f, sig=sig, owner=who, owner_kind=kind if who else 0)


def _signal_owner(pid: int, fd: int) -> int:
    """Whom ``pid``'s ``fd`` signals (F_GETOWN_EX; 0: nobody), asked of the description
    itself: on a directory, F_NOTIFY (dnotify) made it its caller. (Not for an O_PATH fd,
    which takes neither: EBADF.)"""
    dup = _dup(pid, fd)
    try:
        return _getown_ex(dup)[1]
    finally:
        os.close(dup)


def _getown_ex(fd: int) -> tuple[int, int]:
    """F_GETOWN_EX of ``fd``'s description: (F_OWNER_TID, _PID or _PGRP; the id, 0 for none)."""
    kind, who = struct.unpack("<ii", fcntl.fcntl(fd, F_GETOWN_EX, bytes(8)))
    return kind, who


def _lease_signal(pid: int, fd: int) -> int:
    """The signal a break of the lease held through ``fd`` sends (F_GETSIG; 0: SIGIO), asked of
    the description itself (a dup taken with pidfd_getfd: opening the file would break it)."""
    dup = _dup(pid, fd)
    try:
        return fcntl.fcntl(dup, locks.F_GETSIG)
    finally:
        os.close(dup)


_CANNOT = "kcr-migrate cannot move it yet (see README, Limits)"


def _fifo(pid: int, info: FdInfo, held: tuple[FileLock, ...], fifos: dict[tuple[int, int], list[Held]]) -> FileDesc:
    """An open of a FIFO: kind "fifo", its pipe numbered from ``FIFO_IDS`` in the order the
    FIFOs are met. One deleted from its directory (nothing can open it by path any more) is
    a pipe like any other, kind "pipe"."""
    if held:
        raise UnsupportedResource(f"pid {pid} holds {locks.describe(held[0])} on the FIFO {info.target} (fd "
                                  f"{info.fd}): kcr-migrate carries locks on regular files only", pid=pid)
    assert info.st is not None
    key = (info.st.st_dev, info.st.st_ino)
    deleted = info.target.endswith(" (deleted)")
    first = fifos.setdefault(key, [(pid, info)])[0][1]
    if first is not info:
        fifos[key].append((pid, info))
    if first.target.endswith(" (deleted)") != deleted:
        raise UnsupportedResource(f"pid {pid}'s fd {info.fd} is the FIFO {info.target}, which fd {first.fd} has "
                                  f"open as {first.target}: a FIFO deleted under one name but linked under "
                                  f"another; {_CANNOT}", pid=pid)
    return FileDesc(fd=info.fd, kind="pipe" if deleted else "fifo", path="" if deleted else info.target,
                    flags=info.flags, pos=0, obj=FIFO_IDS + 1 + list(fifos).index(key))


def _deleted(pid: int, info: FdInfo, held: tuple[FileLock, ...]) -> FileDesc:
    """A deleted regular file open as an fd (a temporary file, O_TMPFILE): its contents are
    carried and it is made again, unlinked. One still linked under another name is refused
    (a copy would no longer be that file)."""
    st = info.st
    assert st is not None
    name = info.target[:-len(" (deleted)")]
    if st.st_nlink:
        raise UnsupportedResource(f"pid {pid}'s fd {info.fd} is {name}, deleted under that name but still linked "
                                  f"under another (inode {st.st_ino}): {_CANNOT}", pid=pid)
    if name.startswith("/memfd:") and st.st_blksize > os.sysconf("SC_PAGE_SIZE"):
        # hugetlbfs gives its page size; made again here it would be a memfd of small pages
        raise UnsupportedResource(f"pid {pid}'s fd {info.fd} is the memfd {name} of huge pages (MFD_HUGETLB): "
                                  f"{_CANNOT}", pid=pid)
    if held:
        raise UnsupportedResource(f"pid {pid} holds {locks.describe(held[0])} on the deleted file {name} (fd "
                                  f"{info.fd}): kcr-migrate carries locks on files with a name only", pid=pid)
    return FileDesc(fd=info.fd, kind="deleted", path=name if name.startswith("/") else "/", flags=info.flags,
                    pos=info.pos, size=st.st_size, obj=st.st_ino)


def job_mapped_only(pids: Sequence[int], held: set[int], maps: Mapping[int, list[MapEntry]]
                    ) -> dict[int, MappedOnly]:
    """The deleted files and memfds the job maps but holds no fd of (``held``: the inodes it
    holds), by inode: carried whole like held ones, made again by the name their mappings show.
    ``maps``: each process's file mappings (``precopy.layout.file_maps``)."""
    out: dict[int, MappedOnly] = {}
    for pid in pids:
        for ino, m in mapped_only(pid, maps[pid], held).items():
            out.setdefault(ino, m)
    return out


def _redirect_hint(fds: Sequence[int], why: str) -> str:
    if why.startswith(_REDIRECTABLE):
        return f", or give {_redirect_options(fds)} to open PATH in its place on the destination"
    return ""


def _redirect_options(fds: Sequence[int]) -> str:
    return " ".join(f"--redirect {fd}=PATH" for fd in fds)


def _check_inet_sockets(sockets: dict[int, list[Held]]) -> set[int]:
    """Of sockets that are not unix ones, the TCP and UDP sockets ``agent.inet_sockets``
    carries, by inode; UnsupportedResource for any other (another family, a connection, ...)."""
    socks = {ino: (held[0][0], held[0][1].fd) for ino, held in sockets.items()}
    dups: dict[int, int] = {}
    try:
        for ino, (pid, fd) in socks.items():
            dups[ino] = _dup(pid, fd)
        _checked_inet(socks, dups)
    finally:
        for dup in dups.values():
            os.close(dup)
    return set(socks)


def _checked_inet(socks: Mapping[int, tuple[int, int]], dups: Mapping[int, int]
                  ) -> tuple[dict[int, tuple[int, int, int]], dict[int, inet_sockets.DiagInfo]]:
    """Each socket's (family, type, protocol) and what sock_diag says of it (inode -> the pid
    and fd holding it, and a dup of it here), each checked (``inet_sockets.check``): one of
    another family, or one ``record`` could not carry, is refused (UnsupportedResource). A
    connection's other end is looked for among these."""
    kinds: dict[int, tuple[int, int, int]] = {}
    for ino, dup in dups.items():
        try:
            kinds[ino] = inet_sockets.kind_of(dup)
        except OSError:
            kinds[ino] = (0, 0, 0)
        if not inet_sockets.is_inet(kinds[ino]):
            pid, fd = socks[ino]
            raise UnsupportedResource(
                f"pid {pid} has a socket other than a unix, TCP or UDP one (netlink, raw, SCTP, ...) open as fd {fd}: "
                f"{_CANNOT}{_redirect_hint([fd], 'a socket')}", pid=pid)
    ends = {(local, peer) for ino, dup in dups.items() if kinds[ino][1] == SOCK_STREAM
            for local, peer in [inet_sockets.endpoints(dup, kinds[ino][0])] if peer is not None}
    infos: dict[int, inet_sockets.DiagInfo] = {}
    for family, protocol in {(k[0], k[2]) for k in kinds.values()}:
        infos.update(inet_sockets.diag(family, protocol,
                                       [ino for ino, k in kinds.items() if (k[0], k[2]) == (family, protocol)]))
    for ino, dup in dups.items():
        pid, fd = socks[ino]
        inet_sockets.check(pid, fd, dup, kinds[ino], infos.get(ino), ends)
    return kinds, infos


def _inet_records(socks: Mapping[int, tuple[int, int]], pidfd: Callable[[int], int]) -> dict[int, InetSocket]:
    """The TCP and UDP sockets (inode -> the pid and fd that hold it) as the image carries
    them, each checked again: a connection may have reached a frozen listener since."""
    out: dict[int, InetSocket] = {}
    dups: dict[int, int] = {}
    try:
        for ino, (pid, fd) in socks.items():
            dups[ino] = pidfd_getfd(pidfd(pid), fd)
        kinds, infos = _checked_inet(socks, dups)
        connections = inet_sockets.read_connections(
            {ino: dup for ino, dup in dups.items() if ino in infos and kinds[ino][2] == IPPROTO_TCP
             and infos[ino].state == inet_sockets.TCP_ESTABLISHED})
        for ino, dup in dups.items():
            out[ino] = inet_sockets.record(ino, dup, kinds[ino], infos.get(ino), connections.get(ino))
    finally:
        for dup in dups.values():
            os.close(dup)
    return out


def _check_sockets(sockets: dict[int, list[Held]], outside: Outside, accept_waiting: bool = False,
                   known: Mapping[int, unix_sockets.UnixSocketInfo] | None = None) -> None:
    """Refuse the unix sockets we cannot carry: connections to a peer that does not move,
    connections waiting in an accept queue that cannot move with it; named sockets whose
    name restore could not bind again (``roles``). ``known``: sock_diag's view of them."""
    known = unix_sockets.query(sockets) if known is None else known
    for ino, held in sockets.items():
        pid, fd = held[0][0], held[0][1].fd
        info = known.get(ino)
        if info is None:
            raise UnsupportedResource(f"pid {pid}'s unix socket (fd {fd}) is not among this host's: {_CANNOT}",
                                      pid=pid)
        if info.peer and info.peer not in sockets:
            raise UnsupportedResource(
                f"pid {pid}'s fd {fd} is a unix socket connected to {_holder(info.peer, outside)}: {_CANNOT}"
                f"{_redirect_hint([fd], 'a socket')}", pid=pid)
        for client in info.icons:
            if client not in sockets:
                raise UnsupportedResource(
                    f"pid {pid}'s fd {fd} is a unix socket listening on {_name(info.name)} with a connection from "
                    f"{_holder(client, outside)} waiting in its accept queue: let the server accept it, or "
                    "move them together", pid=pid)
    roles(known, set(sockets), {ino: (held[0][0], held[0][1].fd) for ino, held in sockets.items()}, accept_waiting)


def _holder(ino: int, outside: Outside) -> str:
    holders = outside.holders({("socket", ino)})
    peer = next(iter(holders.values()))[0] if holders else None
    return f"{peer}, which does not move with it" if peer else "a socket outside what moves"


def _name(name: bytes) -> str:
    return (b"@" + name[1:] if name[:1] == b"\0" else name).decode(errors="replace")


@frozen
class Role:
    """What a unix socket is to the others of the job, as restore makes it again."""

    peer: int = 0           # a socketpair's or connection's other end
    accepted: bool = False  # the server's end of a connection: named after its listener
    listener: int = 0       # an accepted socket's listener, or a waiting client's
    target: int = 0         # a datagram socket connected one way to a bound one
    pending: tuple[int, ...] = ()   # a listener's waiting clients, in accept order


def roles(known: Mapping[int, unix_sockets.UnixSocketInfo], inside: set[int],
          where: Mapping[int, tuple[int, int]], accept_waiting: bool = False) -> dict[int, Role]:
    """Each socket's ``Role``; UnsupportedResource for a socket restore could not make again
    (``where``: inode -> (pid, fd) for messages)."""
    listeners = {(i.name, i.vfs): i.inode for i in known.values()
                 if i.inode in inside and i.state == unix_sockets.TCP_LISTEN}
    waiting = {c: i.inode for i in known.values() if i.inode in inside and i.state == unix_sockets.TCP_LISTEN
               for c in i.icons}
    out: dict[int, Role] = {}
    for ino in inside:
        info = known[ino]
        pid, fd = where[ino]
        if info.name[:1] not in (b"", b"\0", b"/"):
            raise UnsupportedResource(
                f"pid {pid}'s fd {fd} is a unix socket bound to the relative path {_name(info.name)}: kcr-migrate "
                "moves sockets bound to absolute paths or abstract names only", pid=pid)
        if info.state == unix_sockets.TCP_LISTEN:
            out[ino] = Role(pending=tuple(c for c in info.icons))
            continue
        if ino in waiting:
            if known[ino].wqueue and not accept_waiting:
                raise UnsupportedResource(
                    f"pid {pid}'s fd {fd} is a unix socket whose connection waits in an accept queue with bytes "
                    "already sent: they can be read only by accepting it, which the source, running on if the move "
                    "is rolled back, would miss; let the server accept it first, or move the job by checkpoint "
                    "and restore", pid=pid)
            if not accept_waiting:
                _check_connected_by_holder(pid, fd, known[waiting[ino]].name)
            out[ino] = Role(listener=waiting[ino])
            continue
        if not info.peer and info.state == unix_sockets.TCP_ESTABLISHED and info.type != SOCK_DGRAM \
                and not _peer_closed(info):
            raise UnsupportedResource(
                f"pid {pid}'s fd {fd} is a unix socket whose connection waits in the accept queue of a socket "
                f"outside what moves: {_CANNOT}", pid=pid)
        peer = known.get(info.peer) if info.peer else None
        if info.type != SOCK_DGRAM and info.name and (info.name, info.vfs) in listeners:
            # Named after a listener of the job and not it: accepted from it (its peer may have closed).
            out[ino] = Role(peer=info.peer if peer is not None else 0, accepted=True,
                            listener=listeners[(info.name, info.vfs)])
            continue
        if peer is None:
            out[ino] = Role()
            continue
        if info.type == SOCK_DGRAM and (peer.peer != ino or info.peer == ino):
            # Connected one way to a bound socket, or to its own name (it hears itself).
            if not peer.name:
                raise UnsupportedResource(f"pid {pid}'s fd {fd} is a datagram socket connected to an unbound one: "
                                          f"{_CANNOT}", pid=pid)
            out[ino] = Role(target=info.peer)
            continue
        if info.type != SOCK_DGRAM and info.name and not peer.name and peer.peer == ino:
            # The server's end of a connection (clients rarely bind) whose listener is gone.
            raise UnsupportedResource(
                f"pid {pid}'s fd {fd} is a unix connection accepted from a listener on {_name(info.name)} that "
                f"no process of the job holds any more: {_CANNOT}", pid=pid)
        out[ino] = Role(peer=info.peer)
    return out


def _peer_closed(info: unix_sockets.UnixSocketInfo) -> bool:
    """A connected socket whose peer has gone: a stream or seqpacket one is shut both ways by
    the kernel; a datagram one stays connected to nothing. (A named datagram socket another
    has connected to shows ESTABLISHED too, peerless: it is taken for one whose peer is there.)"""
    if info.peer or info.state != unix_sockets.TCP_ESTABLISHED:
        return False
    return (info.type == SOCK_DGRAM and not info.name) or info.shutdown == 3


def _share_descriptions(tables: dict[int, list[FileDesc]]) -> dict[int, list[FileDesc]]:
    """Give fds that are one open file description (dup, fork) the same ``desc``, numbered
    from 1 across all the processes."""
    by_look: dict[tuple[object, ...], list[tuple[int, FileDesc]]] = {}
    for pid, fds in tables.items():
        for f in fds:
            if f.kind != "redirect":
                by_look.setdefault((f.kind, f.path, f.obj, f.flags & ~O_CLOEXEC_FLAG, f.pos), []).append((pid, f))
    desc: dict[tuple[int, int], int] = {}
    ids = 0
    for group in by_look.values():
        for members in _descriptions(group):
            if len(members) > 1:
                ids += 1
                desc.update((m, ids) for m in members)
    # An eventfd, timerfd, signalfd or epoll instance is its description: one id each.
    events: dict[object, int] = {}
    out: dict[int, list[FileDesc]] = {}
    for pid, fds in tables.items():
        out[pid] = []
        for f in fds:
            d = desc.get((pid, f.fd), 0)
            obj = f.obj
            if f.kind in EVENT_KINDS:
                obj = events.setdefault(("desc", d) if d else (pid, f.fd), len(events) + 1)
            out[pid].append(replace(f, desc=d, obj=obj))
    return out


def _descriptions(group: list[tuple[int, FileDesc]]) -> list[list[tuple[int, int]]]:
    """``group``'s fds, (pid, fd), gathered by open file description: sorted in the order kcmp
    gives descriptions (0 for one and the same, 1 or 2 for before or after), so that fds of one
    description come next to each other: n log n comparisons, not one per pair of descriptions
    (a process with a thousand opens of one file looked alike)."""
    fds = [(pid, f.fd) for pid, f in group]
    if all(_same_description(*fds[0], *other) for other in fds[1:]):
        return [fds]            # one description (dup'd fds): n - 1 comparisons
    fds.sort(key=functools.cmp_to_key(_kcmp_order))
    out: list[list[tuple[int, int]]] = []
    for pid, fd in fds:
        if out and _same_description(*out[-1][0], pid, fd):
            out[-1].append((pid, fd))
        else:
            out.append([(pid, fd)])
    return out


def _kcmp_order(a: tuple[int, int], b: tuple[int, int]) -> int:
    """-1, 0 or 1 as the description of fd a (pid, fd) comes before, is, or comes after b's.
    One closed or gone meanwhile (the dump, frozen, looks again) sorts by its numbers."""
    try:
        order = kcmp(a[0], b[0], KCMP_FILE, a[1], b[1])
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ESRCH):
            return (a > b) - (a < b)
        raise UnsupportedResource(
            f"cannot tell whether fd {a[1]} of pid {a[0]} and fd {b[1]} of pid {b[0]} are one open file "
            f"({exc.strerror}): this kernel lacks kcmp(2) (CONFIG_KCMP)", pid=a[0]) from None
    return {0: 0, 1: -1, 2: 1}.get(order, (a > b) - (a < b))


def _same_description(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    try:
        return kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ESRCH):
            return False          # closed or gone while we looked: the dump, frozen, looks again
        raise UnsupportedResource(
            f"cannot tell whether fd {fd1} of pid {pid1} and fd {fd2} of pid {pid2} are one open file "
            f"({exc.strerror}): this kernel lacks kcmp(2) (CONFIG_KCMP)", pid=pid1) from None


@frozen
class FdState:
    """A process's fd table and the objects its fds refer to that the image carries."""

    files: Files
    pipes: Pipes
    sockets: UnixSockets
    events: EventFiles
    contents: tuple[FileContents, ...] = ()    # deleted files' contents, in slices (as restore reads them)
    # The files whose contents the dump carries (deleted, memfds, /dev/shm), read only as they
    # are sent (``carried_files.read``): their slices follow ``records()``.
    carried: tuple[CarriedFile, ...] = ()
    inet: InetSockets = InetSockets(())

    def records(self) -> tuple[Files | Pipes | UnixSockets | EventFiles | InetSockets | FileContents, ...]:
        return (self.files, self.pipes, self.sockets, self.events, *((self.inet,) if self.inet.sockets else ()),
                *self.contents)

    def check_referenced(self) -> None:
        """Every fd that refers to an object refers to one these records carry."""
        check_objects_referenced(self.files, self.pipes, self.sockets, self.events, *self.contents, inet=self.inet)


def collect(pid: int, redirect: Mapping[int, str] | None = None) -> FdState:
    """One process's fd table and what its pipes and sockets hold, from the frozen process
    (it is left as it was)."""
    return collect_tree([pid], {pid: redirect or {}})[pid]


def collect_tree(pids: Sequence[int], redirect: Mapping[int, Mapping[int, str]] | None = None,
                 *, accept_waiting: bool = False, outside_scan: OutsideScan | None = None,
                 maps: FrozenFileMaps | None = None) -> dict[int, FdState]:
    """``describe_tree`` with the pipes' and sockets' contents, from frozen processes. Each
    pipe or socket goes in the records of the first process (in ``pids`` order) that has it.
    ``accept_waiting`` (the source ends once dumped): the connections waiting in a listener's
    accept queue are accepted here, the bytes their clients sent read (``sent``) and who
    connected each asked (``conn_pid``). ``outside_scan``: the outside's fds as read before
    the freeze (else read now, every one). ``maps``: the processes' file mappings, as the
    freeze's checks read them (else read now)."""
    described = _describe_tree(pids, redirect, accept_waiting=accept_waiting, outside_scan=outside_scan, maps=maps)
    tables = described.tables
    readers: dict[int, tuple[int, int]] = {}
    ends: dict[int, tuple[int, int]] = {}
    socks: dict[int, tuple[int, int]] = {}
    inets: dict[int, tuple[int, int]] = {}
    events: dict[int, tuple[int, FileDesc]] = {}
    deleted: dict[int, tuple[int, int]] = {}
    for pid, fds in tables.items():
        for f in fds:
            if f.kind == "deleted":
                deleted.setdefault(f.obj, (pid, f.fd))
            if f.kind in EVENT_KINDS:
                events.setdefault(f.obj, (pid, f))
            if f.kind in ("pipe", "fifo"):
                ends.setdefault(f.obj, (pid, f.fd))
                if f.flags & O_ACCMODE in READ_MODES:
                    readers.setdefault(f.obj, (pid, f.fd))
            elif f.kind == "unix":
                socks.setdefault(f.obj, (pid, f.fd))
            elif f.kind == "inet":
                inets.setdefault(f.obj, (pid, f.fd))
    # FIFOs no fd of the job writes: each reader may be waiting for a first writer, or not.
    unwritten = {f.obj for fds in tables.values() for f in fds if f.kind == "fifo"} - {
        f.obj for fds in tables.values() for f in fds if f.kind == "fifo" and f.flags & O_ACCMODE != os.O_RDONLY}
    buffers: dict[int, list[PipeBuffer]] = {pid: [] for pid in pids}
    sockets: dict[int, list[UnixSocket]] = {pid: [] for pid in pids}
    inet: dict[int, list[InetSocket]] = {pid: [] for pid in pids}
    pidfds: dict[int, int] = {}
    accepted: list[int] = []         # connections accepted to read them (closed last: a client whose
                                     # peer closes with bytes unread reads ECONNRESET)

    def pidfd(pid: int) -> int:
        if pid not in pidfds:
            pidfds[pid] = pidfd_open(pid)
        return pidfds[pid]
    try:
        for ino, (owner, fd) in ends.items():
            src_pid, src_fd = readers.get(ino, (owner, fd))
            size, reads, st = _pipe_contents(pidfd(src_pid), src_fd, ino in readers)
            data = b"".join(reads)
            packets = tuple(map(len, reads)) if len(reads) > 1 else ()
            if ino in unwritten:
                for pid, fds in tables.items():
                    tables[pid] = [_waiting(pidfd(pid), f) if f.obj == ino and f.kind == "fifo" else f for f in fds]
            path = next(f.path for f in tables[owner] if f.fd == fd)     # a FIFO's; "" for a pipe
            if path:
                buffers[owner].append(PipeBuffer(id=ino, size=size, data=data, path=path, packets=packets,
                                                 mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid))
            else:
                buffers[owner].append(PipeBuffer(id=ino, size=size, data=data, packets=packets))
        known = unix_sockets.query(socks) if socks else {}
        role = roles(known, set(socks), socks, accept_waiting) if socks else {}
        sent = _accept_waiting(known, role, socks, pidfd, accepted) if accept_waiting else _holding_waiting(role, socks)
        order = {pid: i for i, pid in enumerate(pids)}
        # Sockets restore makes together go in one record, the first process's that holds any:
        # a pair, a listener with its connections, a datagram socket with those it hears from.
        group = _socket_groups(known, role, socks, order)
        job_files = {i.vfs for i in known.values() if i.vfs is not None}
        made = {ino: _socket(holder, pidfd(holder), fd, known[ino], role[ino], *sent.get(ino, ((), (0, 0, 0))),
                             _peer_wqueue(known, ino, role), job_files=job_files)
                for ino, (holder, fd) in socks.items()}
        _check_senders(made, socks)
        for ino, sock in made.items():
            sockets[group[ino]].append(sock)
        for ino, isock in _inet_records(inets, pidfd).items():
            inet[inets[ino][0]].append(isock)
    finally:
        for fd in pidfds.values():
            os.close(fd)
        for fd in accepted:
            os.close(fd)
    event_files: dict[int, list[EventFile]] = {pid: [] for pid in pids}
    for obj, (pid, f) in events.items():
        event_files[pid].append(_event_file(pid, f, obj, described.fdinfo[pid, f.fd],
                                            described.watches.get((pid, f.fd)), described.marks.get((pid, f.fd))))
    carried: dict[int, list[CarriedFile]] = {pid: [] for pid in pids}
    for ino, (pid, fd) in deleted.items():
        carried[pid].append(CarriedFile(pid, ino, f"/proc/{pid}/fd/{fd}"))
    for ino, m in described.mapped_only.items():
        carried[m.pid].append(CarriedFile(m.pid, ino, m.source, name=m.name))
    for ino, shm in described.shm.items():
        carried[shm.pid].append(CarriedFile(shm.pid, ino, shm.source, path=shm.path))
    return {pid: FdState(Files(tuple(tables[pid])), Pipes(tuple(buffers[pid])), UnixSockets(tuple(sockets[pid])),
                         EventFiles(tuple(event_files[pid])), carried=tuple(carried[pid]),
                         inet=InetSockets(tuple(inet[pid])))
            for pid in pids}


def _event_file(pid: int, f: FileDesc, obj: int, text: str, inotify_watches: tuple[InotifyWatch, ...] | None = None,
                marks: tuple[int, int, tuple[FanotifyMark, ...]] | None = None) -> EventFile:
    """An eventfd's, timerfd's, signalfd's or epoll instance's state, from its fdinfo ``text``;
    an inotify or fanotify instance's, from what the tree's check read of it (``inotify_watches``,
    ``marks``), else read now."""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    if f.kind == "eventfd":
        return EventFile(obj, "eventfd", count=int(fields["eventfd-count"], 16),
                         semaphore=fields.get("eventfd-semaphore", "0") == "1")
    if f.kind == "timerfd":
        return EventFile(obj, "timerfd", clockid=int(fields["clockid"]), ticks=int(fields["ticks"]),
                         value_ns=_timespec_ns(fields["it_value"]), interval_ns=_timespec_ns(fields["it_interval"]),
                         settime_flags=int(fields.get("settime flags", "0"), 8))
    if f.kind == "signalfd":
        return EventFile(obj, "signalfd", sigmask=int(fields["sigmask"], 16))
    if f.kind == "pidfd":
        return EventFile(obj, "pidfd", pid=int(fields["Pid"]))
    if f.kind in ("inotify", "fanotify"):
        dup = _dup(pid, f.fd)
        try:
            queued = inotify.queued_bytes(dup)
        finally:
            os.close(dup)
        if f.kind == "fanotify":
            init_flags, event_flags, found = marks if marks is not None else fanotify.read(pid, f.fd, text)
            return EventFile(obj, "fanotify", queued=queued, init_flags=init_flags, event_flags=event_flags,
                             marks=found)
        found_watches = inotify_watches if inotify_watches is not None else inotify.watches(pid, text)
        return EventFile(obj, "inotify", inotify=found_watches, queued=queued)
    watches = []
    for line in text.splitlines():
        if line.startswith("tfd:"):
            # "tfd:        5 events:       19 data:                5  pos:0 ino:12 sdev:10"
            parts = line.split()
            tfd = int(parts[1])
            if not epoll_watches_fd(pid, f.fd, tfd):
                raise UnsupportedResource(
                    f"pid {pid}'s epoll instance (fd {f.fd}) still watches fd {tfd}, which was closed or replaced "
                    f"since: restore could not register that file again; {_CANNOT}", pid=pid)
            watches.append(EpollWatch(fd=tfd, events=int(parts[3], 16), data=int(parts[5], 16)))
    return EventFile(obj, "epoll", watches=tuple(watches))


def _timespec_ns(text: str) -> int:
    """fdinfo's "(seconds, nanoseconds)"."""
    sec, nsec = text.strip("()").split(",")
    return int(sec) * 1_000_000_000 + int(nsec)


def _socket_groups(known: Mapping[int, unix_sockets.UnixSocketInfo], role: Mapping[int, Role],
                   socks: Mapping[int, tuple[int, int]], order: Mapping[int, int]) -> dict[int, int]:
    """inode -> the pid whose record carries it: sockets linked by a connection, a listener or
    a name go in the record of the first process that holds any of them."""
    parent = {ino: ino for ino in socks}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    named = {known[ino].name: ino for ino in socks if known[ino].name and not role[ino].accepted}
    for ino, r in role.items():
        for other in (r.peer, r.listener, r.target, *r.pending):
            if other in parent:
                parent[find(ino)] = find(other)
        if known[ino].type == SOCK_DGRAM and known[ino].name:
            for other_ino in named.values():       # it may have heard from any named socket of the job
                if known[other_ino].type == SOCK_DGRAM:
                    parent[find(ino)] = find(other_ino)
    first: dict[int, int] = {}
    for ino, (pid, _) in socks.items():
        root = find(ino)
        if root not in first or order[pid] < order[first[root]]:
            first[root] = pid
    return {ino: first[find(ino)] for ino in socks}


def _check_senders(made: Mapping[int, UnixSocket], socks: Mapping[int, tuple[int, int]]) -> None:
    """A queued datagram from a named socket is sent again from that socket: one of the job's."""
    names = {s.name for s in made.values() if s.name and not s.accepted}
    for ino, s in made.items():
        for sender in s.senders:
            if sender and sender not in names:
                pid, fd = socks[ino]
                raise UnsupportedResource(
                    f"pid {pid}'s fd {fd} is a unix datagram socket with a message queued from {_name(sender)}, a "
                    f"socket that does not move with it: {_CANNOT}; migrate once the program has read it", pid=pid)


def _accept_waiting(known: Mapping[int, unix_sockets.UnixSocketInfo], role: Mapping[int, Role],
                    socks: Mapping[int, tuple[int, int]], pidfd: Callable[[int], int],
                    accepted: list[int]) -> dict[int, tuple[tuple[bytes, ...], tuple[int, int, int]]]:
    """What the clients waiting in the job's listeners' accept queues sent, and what their
    server ends say to SO_PEERCRED (the process that connected), by client inode: every
    connection waiting on a listener of the job is accepted here (on a dup of the listener;
    the source ends once dumped), its bytes read and its peer asked; the connections are added
    to ``accepted``, for the caller to close once it has read the clients."""
    out: dict[int, tuple[tuple[bytes, ...], tuple[int, int, int]]] = {}
    for ino, r in role.items():
        if not r.pending:
            continue
        holder, fd = socks[ino]
        dup = pidfd_getfd(pidfd(holder), fd)
        try:
            for _ in r.pending:
                conn, _ = unix_sockets.accept(dup)
                accepted.append(conn)
                client = unix_sockets.query([os.fstat(conn).st_ino]).get(os.fstat(conn).st_ino)
                if client is None or client.peer not in r.pending:
                    raise UnsupportedResource(f"fd {fd}: a connection accepted from its accept queue is not one "
                                              "of the job's: try again")
                out[client.peer] = (tuple(unix_sockets.queued_data(conn, known[ino].type)),
                                    unix_sockets.peer_credentials(conn))
        finally:
            os.close(dup)
    return out


def _check_connected_by_holder(pid: int, fd: int, listener: bytes) -> None:
    """A live move names the holder of a client waiting in an accept queue as the process that
    connected it (``_holding_waiting``): refused where the socket was made under other ids than
    the holder's effective ones, a sign that another process made and connected it."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        status = read_status(pid)
    except OSError:
        return                 # gone: the checks of the frozen tree say so
    ids = int(status["Uid"].split()[1]), int(status["Gid"].split()[1])
    if (st.st_uid, st.st_gid) != ids:
        raise UnsupportedResource(
            f"pid {pid}'s fd {fd} is a unix socket waiting in the accept queue of {_name(listener)}, made as uid "
            f"{st.st_uid} gid {st.st_gid}, not as pid {pid} is now (uid {ids[0]} gid {ids[1]}): a live move cannot "
            "tell which process connected it, which the server asks (SO_PEERCRED) once it accepts; let the server "
            "accept it first, or move the job by checkpoint and restore", pid=pid)


def _holding_waiting(role: Mapping[int, Role], socks: Mapping[int, tuple[int, int]]
                     ) -> dict[int, tuple[tuple[bytes, ...], tuple[int, int, int]]]:
    """``_accept_waiting`` where the source may run on (a live move): no connection is accepted
    (none sent bytes, or ``describe_tree`` refused it), so who connected each cannot be asked;
    the process of the job holding the client (the first in the tree's order) stands for it,
    with its effective ids now."""
    out: dict[int, tuple[tuple[bytes, ...], tuple[int, int, int]]] = {}
    for r in role.values():
        for client in r.pending:
            pid = socks[client][0]
            status = read_status(pid)
            out[client] = ((), (pid, int(status["Uid"].split()[1]), int(status["Gid"].split()[1])))
    return out


def _peer_wqueue(known: Mapping[int, unix_sockets.UnixSocketInfo], ino: int, role: Mapping[int, Role]) -> int:
    """What the peer of an unnamed connected socket (one that moves too) is charged for what it
    sent and was not read (it sends to this socket alone); 0 where that is not known."""
    peer = known.get(role[ino].peer)
    return peer.wqueue if peer is not None and not peer.name and not known[ino].name else 0


def _socket(pid: int, pidfd: int, fd: int, info: unix_sockets.UnixSocketInfo, role: Role,
            sent: tuple[bytes, ...] = (), conn: tuple[int, int, int] = (0, 0, 0), peer_wqueue: int = 0, *,
            job_files: Collection[tuple[int, int]] = ()) -> UnixSocket:
    """``sent``, ``conn``: a waiting client's, from ``_accept_waiting``; ``peer_wqueue``: see
    ``_peer_wqueue`` (a message no peek shows is refused by it); ``job_files``: the socket
    files of the job's sockets (``_file_gone``)."""
    dup = pidfd_getfd(pidfd, fd)
    try:
        messages = unix_sockets.queued_messages(dup, info.type)
        unix_sockets.check_hidden_messages(fd, info.type, [m.data for m in messages], peer_wqueue)
        o = unix_sockets.socket_options(dup)
        cred = unix_sockets.peer_credentials(dup)
        program, locked = socket_filter.read(dup, f"pid {pid}'s fd {fd} (a unix socket)", pid)
    finally:
        os.close(dup)
    queue = [m.data for m in messages]
    options = SocketOptions(
        rcvbuf=o["SO_RCVBUF"], sndbuf=o["SO_SNDBUF"], passcred=o.get("SO_PASSCRED", 0),
        passsec=o.get("SO_PASSSEC", 0), peek_off=o.get("SO_PEEK_OFF", -1), rcvlowat=o.get("SO_RCVLOWAT", 1),
        oobinline=o.get("SO_OOBINLINE", 0), rcvtimeo_us=o.get("SO_RCVTIMEO", 0), sndtimeo_us=o.get("SO_SNDTIMEO", 0),
        passpidfd=o.get("SO_PASSPIDFD", 0), passrights=o.get("SO_PASSRIGHTS", 1),
        bpf_filter=program, filter_locked=int(locked))
    closed = _peer_closed(info)
    if queue and not role.peer and not closed and not info.name:
        raise UnsupportedResource(f"fd {fd} is an unconnected unix socket with messages queued: {_CANNOT}")
    named_dgram = info.type == SOCK_DGRAM and bool(info.name) and not role.peer
    listening = info.state == unix_sockets.TCP_LISTEN
    mode = uid = gid = dev = ino = 0
    gone = False
    if info.name[:1] == b"/" and not role.accepted and info.vfs is not None:
        dev, ino = info.vfs
        st = _lstat(info.name)
        gone = _file_gone(info.vfs, st, job_files)     # (bound again without a file: ``Names.bind_gone``)
        if st is not None and (st.st_dev, st.st_ino) == info.vfs:
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        else:
            mode = 0o755                      # its file was removed since: one as bind makes it
    return UnixSocket(id=info.inode, type=info.type, peer=role.peer, peer_closed=closed,
                      shutdown=0 if closed else info.shutdown, options=options, queue=tuple(queue),
                      name=info.name, accepted=role.accepted, listener=role.listener,
                      backlog=info.wqueue if listening else -1, pending=role.pending, target=role.target,
                      senders=tuple(m.sender for m in messages) if named_dgram else (),
                      file_mode=mode, file_uid=uid, file_gid=gid, file_dev=dev, file_ino=ino, sent=sent,
                      cred_pid=cred[0], cred_uid=min(cred[1], MAX_ID), cred_gid=min(cred[2], MAX_ID),
                      conn_pid=conn[0], conn_uid=min(conn[1], MAX_ID), conn_gid=min(conn[2], MAX_ID),
                      file_gone=gone)


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _file_gone(vfs: tuple[int, int], st: os.stat_result | None, job_files: Collection[tuple[int, int]]) -> bool:
    """Was the socket file (``vfs``: its device and inode) of a socket bound to a path removed
    since it was bound (``st``: what is at the path now, None: nothing), or replaced by a file
    that is no socket's or another socket's of the job (``job_files``: their files)? Its name
    stays its name (getsockname), but leads nowhere. (A socket file of a socket outside the
    job there is the rule of ``agent.unix_names``: refused where one listens.)"""
    if st is None:
        return True
    if (st.st_dev, st.st_ino) == vfs:
        return False
    return not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) in job_files


def _waiting(pidfd: int, f: FileDesc) -> FileDesc:
    """``f`` (a reader of a FIFO with no writer) as restore must open it: poll shows POLLHUP
    once a writer has come and gone since it was opened; before that, none."""
    dup = pidfd_getfd(pidfd, f.fd)
    try:
        p = select.poll()
        p.register(dup, select.POLLIN)
        hup = any(ev & select.POLLHUP for _, ev in p.poll(0))
    finally:
        os.close(dup)
    return replace(f, waiting=0 if hup else 1)


def _pipe_contents(pidfd: int, fd: int, readable: bool) -> tuple[int, list[bytes], os.stat_result]:
    """(capacity, the bytes in it as ``peek_pipe_reads`` cuts them, the stat of the pipe or
    FIFO). A pipe nobody can read (only write ends left) keeps no bytes: its writers get
    EPIPE, as before."""
    dup = pidfd_getfd(pidfd, fd)
    try:
        size = fcntl.fcntl(dup, fcntl.F_GETPIPE_SZ)
        st = os.fstat(dup)
        if not readable:
            return size, [], st
        queued, reads = peek_pipe_reads(dup)
        if sum(map(len, reads)) != queued:
            raise UnsupportedResource(f"could read only {sum(map(len, reads))} of the {queued} bytes in a pipe of "
                                      f"fd {fd}")
        return size, reads, st
    finally:
        os.close(dup)


def peek_pipe(fd: int) -> tuple[int, bytes]:
    """(how many bytes the pipe ``fd`` is a read end of holds, those bytes), left in it."""
    queued, reads = peek_pipe_reads(fd)
    return queued, b"".join(reads)


def peek_pipe_reads(fd: int) -> tuple[int, list[bytes]]:
    """(how many bytes the pipe ``fd`` is a read end of holds, those bytes as reads of all of
    them return them), left in it. A copy (tee) keeps each buffer's packet mark (written
    through an O_DIRECT end), and a read stops at the end of a marked buffer: one read for a
    byte stream, one per packet for packets."""
    queued = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")
    if not queued:
        return 0, []
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
        copied = tee(fd, w, queued)
        return queued, _read_all(r, copied)
    finally:
        os.close(r)
        os.close(w)


def _read_all(fd: int, n: int) -> list[bytes]:
    parts: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return parts


def _socket_holders(pids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Each socket the job holds (inode) -> the first (pid, fd) holding it. A process gone
    meanwhile (a running job's child that exited) holds none."""
    holders: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            links = fd_links(pid)
        except NoSuchProcess:
            continue
        for fd, target in links:
            obj = object_of(target)
            if obj is not None and obj[0] == "socket":
                holders.setdefault(obj[1], (pid, fd))
    return holders


def bound_names(pids: Sequence[int]) -> list[unix_names.Bound]:
    """The names the job's unix sockets are bound to (each once; an accepted socket's is its
    listener's), for the destination's preflight to check (``agent.unix_names.check``)."""
    inodes = set(_socket_holders(pids))
    if not inodes:
        return []           # no socket: nothing to ask sock_diag (a kernel may lack unix_diag)
    out: dict[bytes, unix_names.Bound] = {}
    socks = unix_sockets.query(inodes)
    job_files = {s.vfs for s in socks.values() if s.vfs is not None}
    for sock in socks.values():
        if sock.name[:1] == b"/" and sock.vfs is not None and _file_gone(sock.vfs, _lstat(sock.name), job_files):
            continue        # bound again wherever the path stands (``unix_names.Names.bind_gone``)
        if sock.name and (sock.name not in out or sock.state == unix_sockets.TCP_LISTEN):
            dev, ino = sock.vfs if sock.vfs is not None else (0, 0)
            out[sock.name] = unix_names.Bound(sock.name, sock.type, dev, ino)
    return list(out.values())


def inet_bound(pids: Sequence[int]) -> list[InetSocket]:
    """The job's TCP and UDP sockets that are bound (an address and port, with the options that
    change how bind behaves), for the destination's preflight to bind each once
    (``agent.inet_sockets.check_bindable``). One it cannot carry is refused by the job's
    checks, not here."""
    holders = _socket_holders(pids)
    if holders:
        holders = {ino: h for ino, h in holders.items() if ino not in unix_sockets.query(holders)}
    out: list[InetSocket] = []
    for ino, (pid, fd) in holders.items():
        try:
            dup = _dup(pid, fd)
        except OSError:
            continue
        try:
            kind = inet_sockets.kind_of(dup)
            if not inet_sockets.is_inet(kind):
                continue
            info = inet_sockets.diag(kind[0], kind[2], [ino]).get(ino)
            established = info is not None and kind[2] == IPPROTO_TCP and info.state == inet_sockets.TCP_ESTABLISHED
            s = inet_sockets.record(ino, dup, kind, info, inet_sockets.SUMMARY_CONNECTION if established else None)
            if s.address:
                out.append(s)
        finally:
            os.close(dup)
    return out


def silence_connections(fds: Mapping[int, FdState]) -> None:
    """The job's TCP connections put in repair mode, once it is dumped and about to be killed:
    closed, they send nothing (``agent.inet_sockets.silence``)."""
    ids = {s.id for st in fds.values() for s in st.inet.sockets if s.connection}
    held: dict[int, tuple[int, int]] = {}
    for pid, st in fds.items():
        for f in st.files.fds:
            if f.kind == "inet" and f.obj in ids:
                held.setdefault(f.obj, (pid, f.fd))
    for pid, fd in held.values():
        try:
            dup = _dup(pid, fd)
        except OSError:
            continue                  # (gone: nothing is left to close it loudly)
        try:
            inet_sockets.silence(dup)
        except OSError:
            pass                      # closed with a FIN then: the image is whole all the same
        finally:
            os.close(dup)


def socket_files(pids: Sequence[int]) -> list[tuple[str, int, int, int]]:
    """(path, type, device, inode) of each socket file the job's unix sockets are bound to
    (``agent.unix_names.reclaim`` puts them back after a rolled-back move)."""
    return [(os.fsdecode(b.name), b.type, b.dev, b.ino) for b in bound_names(pids)
            if b.name[:1] == b"/" and b.dev]
