"""A process's state as the tests see it: a snapshot before a move and one after, compared.

Driven by the rows of ``agent/inventory.py``, read two ways:

- **observed**: what each carried or warned row means, read from outside and independent of
  the dump: /proc (status, stat, limits, fdinfo, smaps, timers, cgroup, ...) and the
  process's fds taken with ``pidfd_getfd`` (bytes queued, pipe sizes, socket options, memfd
  seals), per row in ``OBSERVE``. It finds what the dump never reads.
- **records**: the process frozen for an instant (``agent.freeze``) and read with the dump's
  own code; every record field a carried or warned row names is compared, but for those
  ``VOLATILE`` says change while a process runs (and how they are compared instead). It finds
  what the dump reads and restore drops: what only the process can tell (handlers, timers,
  timer slack, rseq, ...) is read by injected calls, which no outside reading reaches.

A carried or warned row with neither an ``OBSERVE`` entry nor a reason in ``UNOBSERVED``
fails ``tests/test_inventory.py``, as does a record field the records cannot compare.

Pids and tids are written as ``T0`` (the process), ``T1``... (its other threads, in tid
order), so a process moved under a new pid compares equal; object ids (inodes, description
numbers) as the order in which the fd table first names them.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import socket
import stat as stat_mod
import struct
from typing import Any, Callable

from agent import dump, freeze, inventory
from agent.fdtable import peek_pipe_reads
from agent.inject import RemoteMemory
from precopy.kernel import get_robust_list, pidfd_getfd
from tests._workloads import Workload

F_GET_SEALS, F_GETPIPE_SZ, FIONREAD, F_GETLEASE, F_GETSIG = 1034, 1032, 0x541B, 1025, 11


class Proc:
    """One reading of process ``pid``: files read once, pids written as labels."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # Threads in the order of their robust-list heads (in their own memory, so the same for
        # a copy under new tids, which need not come in the same order), then of their tids.
        self.tids = sorted((int(t) for t in os.listdir(f"/proc/{pid}/task")),
                           key=lambda t: (t != pid, get_robust_list(t)[0], t))
        self.labels = {tid: f"T{i}" for i, tid in enumerate(self.tids)}
        self.fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        self._cache: dict[str, str] = {}
        self._objects: dict[str, str] = {}

    def text(self, *parts: str) -> str:
        key = "/".join(parts)
        if key not in self._cache:
            with open(f"/proc/{self.pid}/{key}", errors="replace") as f:
                self._cache[key] = f.read()
        return self._cache[key]

    def status(self, tid: int | None = None) -> dict[str, str]:
        text = self.text("status") if tid is None else self.text("task", str(tid), "status")
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def label(self, pid: int) -> str | int:
        return self.labels.get(pid, pid)

    def obj(self, ident: object) -> str:
        """An object (inode, description) named by the order the fd table first shows it."""
        key = str(ident)
        return self._objects.setdefault(key, f"#{len(self._objects)}")

    def link(self, fd: int) -> str:
        return os.readlink(f"/proc/{self.pid}/fd/{fd}")

    def fdinfo(self, fd: int) -> dict[str, str]:
        text = self.text("fdinfo", str(fd))
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def fdinfo_lines(self, fd: int, prefix: str) -> list[str]:
        return [line for line in self.text("fdinfo", str(fd)).splitlines() if line.startswith(prefix)]

    def stat(self, fd: int) -> os.stat_result:
        return os.stat(f"/proc/{self.pid}/fd/{fd}")

    def dup(self, fd: int) -> int:
        pidfd = os.pidfd_open(self.pid)
        try:
            return pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)

    def kind_fds(self, test: Callable[[str, os.stat_result], bool]) -> list[int]:
        out = []
        for fd in self.fds:
            try:
                if test(self.link(fd), self.stat(fd)):
                    out.append(fd)
            except OSError:
                continue
        return out


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]


def _with_dup(p: Proc, fd: int, read: Callable[[int], Any]) -> Any:
    dup = p.dup(fd)
    try:
        return read(dup)
    finally:
        os.close(dup)


# Flags that act when a file is opened and that F_GETFL shows after: a description made again
# another way (a deleted file by O_TMPFILE, ...) need not show them (the inventory's lost row
# "a deleted file's name and open-only flags").
OPEN_ONLY = 0o100 | 0o200 | 0o400 | 0o1000 | 0o200000 | 0o400000 | 0o20000000   # O_CREAT ... O_TMPFILE


def _common(p: Proc, fd: int, remade: bool = False) -> tuple[int, str, int]:
    """fd, its flags (O_CLOEXEC among them; ``remade``: a description made again another way,
    without its open-only flags) and offset."""
    info = p.fdinfo(fd)
    return fd, oct(int(info["flags"], 8) & ~(OPEN_ONLY if remade else 0)), int(info["pos"])


def _deleted_name(link: str) -> str:
    """A deleted file's directory: the name it had is gone with it (made again, it has none)."""
    return os.path.dirname(link) + "/ (deleted)"


def _mapped_name(name: str) -> str:
    """A mapping's name, a deleted file's without the name it had (a memfd keeps its own)."""
    if name.endswith(" (deleted)") and name.startswith("/") and not name.startswith(("/memfd:", "/dev/zero", "/SYSV")):
        return _deleted_name(name)
    return name


def _is_path(link: str) -> bool:
    return link.startswith("/") and not link.endswith(" (deleted)")


def _files(mode: Callable[[int], bool]) -> Callable[[Proc], object]:
    def observe(p: Proc) -> object:
        return [(*_common(p, fd), p.link(fd))
                for fd in p.kind_fds(lambda link, st: _is_path(link) and mode(st.st_mode))]
    return observe


def _deleted(memfd: bool) -> Callable[[Proc], object]:
    def observe(p: Proc) -> object:
        out = []
        for fd in p.kind_fds(lambda link, st: link.endswith(" (deleted)") and stat_mod.S_ISREG(st.st_mode)
                             and link.startswith("/memfd:") == memfd):
            st = p.stat(fd)
            with open(f"/proc/{p.pid}/fd/{fd}", "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            link = p.link(fd) if memfd else _deleted_name(p.link(fd))
            row: tuple[object, ...] = (*_common(p, fd, remade=True), link, p.obj(("ino", st.st_ino)), st.st_size, digest,
                                       oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns)
            if memfd:
                row += (_with_dup(p, fd, lambda d: fcntl.fcntl(d, F_GET_SEALS)),)
            out.append(row)
        return out
    return observe


def _owner(p: Proc, d: int) -> tuple[object, ...]:
    kind, who = struct.unpack("<ii", fcntl.fcntl(d, 16, bytes(8)))        # F_GETOWN_EX
    if kind == 2:                  # a process group: the process's own, whatever its number
        who = "own group" if who == os.getpgid(p.pid) else who
    return kind, p.label(who) if isinstance(who, int) else who, fcntl.fcntl(d, F_GETSIG)


def _locks(p: Proc) -> object:
    # "lock:\t1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF": kind, mode, access, pid, range
    out = []
    for fd in p.fds:
        try:
            lines = p.fdinfo_lines(fd, "lock:")
            deleted = p.link(fd).endswith(" (deleted)")
        except OSError:
            continue
        for line in lines:
            parts = line.split()[2:]
            if len(parts) >= 7:
                out.append((fd, parts[0], parts[1], parts[2], p.label(int(parts[3])),
                            "" if deleted else parts[4], parts[5], parts[6]))
    return out


def _pipes(p: Proc) -> object:
    def read(d: int) -> tuple[int, int, object]:
        # A read end's bytes as reads return them: packets one by one (packet mode), else at once.
        reads = [len(r) for r in peek_pipe_reads(d)[1]] if fcntl.fcntl(d, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY \
            else None
        return _ioctl_int(d, FIONREAD), fcntl.fcntl(d, F_GETPIPE_SZ), reads
    return [(*_common(p, fd), p.obj(p.link(fd)), *_with_dup(p, fd, read))
            for fd in p.kind_fds(lambda link, st: link.startswith("pipe:"))]


def _fifos(p: Proc) -> object:
    def read(d: int) -> tuple[int, int]:
        return _ioctl_int(d, FIONREAD), fcntl.fcntl(d, F_GETPIPE_SZ)
    return [(*_common(p, fd), p.link(fd), *_with_dup(p, fd, read))
            for fd in p.kind_fds(lambda link, st: _is_path(link) and stat_mod.S_ISFIFO(st.st_mode))]


def _unix_sockets(p: Proc) -> object:
    def read(d: int) -> tuple[object, ...]:
        s = socket.socket(fileno=os.dup(d))
        try:
            if s.family != socket.AF_UNIX:
                return ("not unix",)
            opt = s.getsockopt
            # (SIOCOUTQ counts the memory of what is sent and unread, which depends on how it
            # was cut into messages: the receiving end's FIONREAD counts its bytes.)
            listening = opt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)     # (a listener has no FIONREAD)
            return (s.type, -1 if listening else _ioctl_int(d, FIONREAD), opt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                    opt(socket.SOL_SOCKET, socket.SO_SNDBUF), opt(socket.SOL_SOCKET, socket.SO_PASSCRED),
                    opt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), opt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
                    opt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16), opt(socket.SOL_SOCKET, socket.SO_OOBINLINE))
        finally:
            s.close()
    return [(*_common(p, fd), *_with_dup(p, fd, read)) for fd in p.kind_fds(lambda link, st: link.startswith("socket:"))]


def _peer_credentials(p: Proc) -> object:
    """What SO_PEERCRED names on each unix socket: pid (as a label where it is the process), uid, gid."""
    def read(d: int) -> tuple[object, ...]:
        s = socket.socket(fileno=os.dup(d))
        try:
            if s.family != socket.AF_UNIX:
                return ()
            pid, uid, gid = struct.unpack("<iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return (p.label(pid), uid, gid) if pid else ()
        finally:
            s.close()
    return [(fd, _with_dup(p, fd, read)) for fd in p.kind_fds(lambda link, st: link.startswith("socket:"))]


def _bound_sockets(p: Proc) -> object:
    """Unix sockets with a name: the name, and whether they listen."""
    def read(d: int) -> tuple[object, ...]:
        s = socket.socket(fileno=os.dup(d))
        try:
            if s.family != socket.AF_UNIX:
                return ()
            return s.getsockname(), s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        finally:
            s.close()
    found = [(fd, _with_dup(p, fd, read)) for fd in p.kind_fds(lambda link, st: link.startswith("socket:"))]
    return [(fd, got) for fd, got in found if got and got[0]]


def _inet_sockets(p: Proc) -> object:
    """TCP and UDP sockets: family, type, protocol, the port (and the address where not
    connected: a connected UDP socket's is what the host's route chose), listening and its
    backlog's effect left aside, peer, and every option kcr-migrate carries."""
    from transport.schema import INET_OPTIONS

    def read(d: int) -> tuple[object, ...]:
        s = socket.socket(fileno=os.dup(d))
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6):
                return ()
            try:
                peer = s.getpeername()
            except OSError:
                peer = None
            name = s.getsockname()
            levels = {socket.SOL_SOCKET, s.proto, socket.IPPROTO_IP if s.family == socket.AF_INET else socket.IPPROTO_IPV6}
            # what the kernel tunes on a connection is not carried (its buffers, MSS, window
            # clamp); multicast options mean nothing to TCP
            skip = ({(0, 33), (0, 34), (0, 49), (41, 18), (41, 19)} if s.type == socket.SOCK_STREAM else set()) | (
                {(1, 7), (1, 8), (6, 2), (6, 10)} if s.type == socket.SOCK_STREAM and peer is not None else set())
            options = []
            for level, opt in sorted(INET_OPTIONS):
                if level in levels and (level, opt) not in skip:
                    try:
                        options.append((level, opt, s.getsockopt(level, opt, INET_OPTIONS[level, opt] or 16)))
                    except OSError:
                        pass
            return (s.family, s.type, s.proto, name[1], name[0] if peer is None else None, peer,
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), tuple(options))
        finally:
            s.close()
    found = [(fd, _with_dup(p, fd, read)) for fd in p.kind_fds(lambda link, st: link.startswith("socket:"))]
    return [(fd, got) for fd, got in found if got]


def _socket_filters(p: Proc) -> object:
    """Each socket's classic BPF filter, instruction for instruction, and SO_LOCK_FILTER.
    SO_GET_FILTER counts in instructions where getsockopt's length is in bytes: through libc."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def read(d: int) -> tuple[object, ...]:
        room = ctypes.c_uint32(4096)
        buf = ctypes.create_string_buffer(8 * 4096)
        if libc.getsockopt(d, socket.SOL_SOCKET, 26, buf, ctypes.byref(room)) != 0:     # SO_GET_FILTER
            return ("unreadable", ctypes.get_errno())
        lock = ctypes.c_int(0)
        size = ctypes.c_uint32(4)
        libc.getsockopt(d, socket.SOL_SOCKET, 44, ctypes.byref(lock), ctypes.byref(size))   # SO_LOCK_FILTER
        return (buf.raw[:8 * room.value], lock.value) if room.value else ()
    found = [(fd, _with_dup(p, fd, read)) for fd in p.kind_fds(lambda link, st: link.startswith("socket:"))]
    return [(fd, got) for fd, got in found if got]


def _tcp_connections(p: Proc) -> object:
    """Each connection's two ends (their ports; both are the job's). The bytes queued are not
    compared: the kernel moves them from one end's queue to the other's while the job is
    frozen (the workloads check that every byte arrives once)."""
    def read(d: int) -> tuple[object, ...]:
        s = socket.socket(fileno=os.dup(d))
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                return ()
            try:
                peer = s.getpeername()
            except OSError:
                return ()
            return (s.getsockname()[1], peer[1])
        finally:
            s.close()
    found = [(fd, _with_dup(p, fd, read)) for fd in p.kind_fds(lambda link, st: link.startswith("socket:"))]
    return [(fd, got) for fd, got in found if got]


def _anon(name: str, keys: tuple[str, ...], lines: str = "") -> Callable[[Proc], object]:
    """fdinfo fields ``keys`` (and lines starting ``lines``: watches) of each fd of one anon-inode kind."""
    def observe(p: Proc) -> object:
        out = []
        for fd in p.kind_fds(lambda link, st: link == f"anon_inode:[{name}]" or link == f"anon_inode:{name}"):
            info = p.fdinfo(fd)
            row: list[object] = [*_common(p, fd)[:2], *(info.get(k) for k in keys)]
            if lines:
                row.append(sorted(_watch(line) for line in p.fdinfo_lines(fd, lines)))
            out.append(tuple(row))
        return out
    return observe


def _watch(line: str) -> tuple[str, ...]:
    # "tfd:        5 events:       19 data:                5  pos:0 ino:12 sdev:10": fd, events, data;
    # "inotify wd:1 ino:1234 sdev:800001 mask:fce ignored_mask:0 fhandle-bytes:8 ...": wd, inode, mask
    fields = dict(part.split(":", 1) for part in line.replace(": ", ":").replace(":  ", ":").split() if ":" in part)
    if line.startswith("tfd"):
        text = " ".join(line.split())
        tfd, events, data = text.split()[1], text.split()[3], text.split()[5]
        return (tfd, events, data)
    return tuple(fields.get(k, "") for k in ("wd", "ino", "sdev", "mask", "ignored_mask"))


def _timerfds(p: Proc) -> object:
    out = []
    for fd in p.kind_fds(lambda link, st: link == "anon_inode:[timerfd]"):
        info = p.fdinfo(fd)
        # A periodic timer that expired is re-armed only when read: expirations count as armed.
        armed = info["it_value"] != "(0, 0)" or int(info["ticks"]) > 0
        out.append((*_common(p, fd)[:2], info["clockid"], info["settime flags"], info["it_interval"], armed))
    return out


def _pidfds(p: Proc) -> object:
    return [(*_common(p, fd)[:2], p.label(int(p.fdinfo(fd)["Pid"])))
            for fd in p.kind_fds(lambda link, st: link == "anon_inode:[pidfd]")]


def _smaps(p: Proc) -> list[dict[str, str]]:
    vmas: list[dict[str, str]] = []
    for line in p.text("smaps").splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            vmas.append({"range": head[0], "perms": head[1], "offset": head[2], "inode": head[4],
                         "name": head[5] if len(head) > 5 else ""})
        elif vmas:
            k, _, v = line.partition(":")
            vmas[-1][k] = v.strip()
    return vmas


def _merged(vmas: list[dict[str, str]]) -> list[dict[str, str]]:
    """Adjacent anonymous mappings alike in all but their range, as one: where the kernel draws
    the line between them (it merges them only while their pages' bookkeeping allows) is
    nothing the process asked for, and a copy made again may draw it elsewhere."""
    out: list[dict[str, str]] = []
    for v in vmas:
        last = out[-1] if out else None
        if last is not None and not v["name"] and not last["name"] and last["range"].split("-")[1] == \
                v["range"].split("-")[0] and last["perms"] == v["perms"] and \
                _flags(last) == _flags(v) and last.get("Locked") == v.get("Locked") == "0 kB":
            last["range"] = last["range"].split("-")[0] + "-" + v["range"].split("-")[1]
            continue
        out.append(dict(v))
    return out


def _flags(v: dict[str, str]) -> list[str]:
    return sorted(set(v.get("VmFlags", "").split()) - TRANSIENT_VMFLAGS)


def _merged_vmas(vmas: list[Any]) -> list[Any]:
    """``_merged`` for the records."""
    out: list[Any] = []
    for v in vmas:
        last = out[-1] if out else None
        if last is not None and v.kind == last.kind == "anon" and last.end == v.start and \
                dataclasses.replace(last, start=0, end=0, pgoff=0) == dataclasses.replace(v, start=0, end=0, pgoff=0):
            out[-1] = dataclasses.replace(last, end=v.end)
            continue
        out.append(v)
    return out


def _sysv(p: Proc) -> object:
    """The SysV segments the process attaches (its mappings named /SYSV..., whose inode is the
    segment's id): key, id, permissions, size and owner, as /proc/sysvipc/shm shows them."""
    ids = {v["inode"] for v in _smaps(p) if v["name"].startswith("/SYSV")}
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    # key shmid perms size cpid lpid nattch uid gid ...
    return sorted((r[0], r[1], r[2], r[3], r[7], r[8]) for r in rows if r[1] in ids)


def _shm_files(p: Proc) -> object:
    """Files of /dev/shm the process holds open or maps: path, size, contents, owner, mode."""
    paths = {p.link(fd) for fd in p.fds if p.link(fd).startswith("/dev/shm/")}
    paths |= {v["name"] for v in _smaps(p) if v["name"].startswith("/dev/shm/")}
    out = []
    for path in sorted(paths):
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            out.append((path, exc.strerror))
            continue
        out.append((path, st.st_size, digest, oct(st.st_mode), st.st_uid, st.st_gid))
    return out


def _mappings(p: Proc) -> object:
    return [(v["range"], v["perms"], v["offset"], _mapped_name(v["name"])) for v in _merged(_smaps(p))]


# VmFlags that say how the kernel treats the mapping now rather than what the process asked:
# soft-dirty tracking, accounting, and the uffd-wp registration of a live migration's tracker.
# "gu": a guard page may have been installed in it once (sticky; the pages compare: _guards)
TRANSIENT_VMFLAGS = {"sd", "ac", "uw", "um", "ui", "gu"}


def _guards(p: Proc) -> object:
    """The guard pages, as PAGEMAP_SCAN tells them (none where the kernel cannot)."""
    return dump.read_guard_regions(p.pid)


def _advice(p: Proc) -> object:
    out = [(v["range"], _flags(v), v.get("Locked")) for v in _merged(_smaps(p))]
    return out, p.status()["VmLck"]


# numa_maps: "7f55a8000000 bind=static:0 anon=1 ...", "... weighted interleave:0 ...", "... default file=..."
NUMA_POLICY = re.compile(r"([0-9a-f]+) ([a-z ()]+(?:=[a-z|]+)?:[0-9,-]+|\w+)")


def _numa_policies(p: Proc, tid: int) -> object:
    """Each mapping's policy as numa_maps names it, seen from the thread (a mapping without
    one of its own shows the thread's); not the page counts after it, which change. Runs of
    mappings under one policy as one (numa_maps lists mappings, which a restore may merge
    where the kernel had not yet: 'a mapping' compares the layout)."""
    out: list[tuple[str, str]] = []
    for m in (NUMA_POLICY.match(line) for line in p.text("task", str(tid), "numa_maps").splitlines()):
        if m and (not out or out[-1][1] != m.group(2)):
            out.append((m.group(1), m.group(2)))
    return out


def _status(*keys: str) -> Callable[[Proc], object]:
    return lambda p: tuple(p.status().get(k) for k in keys)


def _per_thread(read: Callable[[Proc, int], object]) -> Callable[[Proc], object]:
    return lambda p: [(p.label(tid), read(p, tid)) for tid in p.tids]


def _sched(p: Proc, tid: int) -> object:
    from agent import sched
    slack = p.text("timerslack_ns").strip() if tid == p.pid else None   # the leader's only, in /proc
    return (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
            os.getpriority(os.PRIO_PROCESS, tid), sched._ioprio_get(tid), slack)


def _timers(p: Proc) -> object:
    out = []
    for block in p.text("timers").split("ID:")[1:]:
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in ("ID:" + block).splitlines())}
        how, _, target = fields.get("notify", "").partition("/")
        kind, _, who = target.partition(".")
        out.append((fields["ID"], fields.get("signal"), how, kind, p.label(int(who)) if who else "",
                    fields.get("ClockID")))
    return out


def _stat_mm(p: Proc) -> object:
    text = p.text("stat")
    fields = ["", "", ""] + text[text.rindex(")") + 2:].split()
    with open(f"/proc/{p.pid}/auxv", "rb") as f:
        auxv = hashlib.sha256(f.read()).hexdigest()
    return [fields[i] for i in (26, 27, 28, 45, 46, 47, 48, 49, 50, 51)], auxv


# An interval timer's signals come and go as it runs (records: those the kernel sent, SI_KERNEL).
ITIMER_SIGNALS = (1 << 13) | (1 << 25) | (1 << 26)      # SIGALRM, SIGVTALRM, SIGPROF
SI_KERNEL = 0x80


def _pending_mask(mask: str) -> int:
    return int(mask, 16) & ~ITIMER_SIGNALS


def _not_itimer(infos: tuple[bytes, ...]) -> list[bytes]:
    return [i for i in infos if not (1 << (int.from_bytes(i[:4], "little") - 1) & ITIMER_SIGNALS
                                     and int.from_bytes(i[8:12], "little", signed=True) == SI_KERNEL)]


def _dumpable(p: Proc) -> object:
    # A process that is not dumpable has its /proc files owned by root.
    st = os.stat(f"/proc/{p.pid}/status")
    return p.status()["Umask"], p.text("personality").strip(), (st.st_uid, st.st_gid)


OBSERVE: dict[str, Callable[[Proc], object]] = {
    "a regular file": _files(stat_mod.S_ISREG),
    "a directory": _files(stat_mod.S_ISDIR),
    "/dev/null and similar": _files(stat_mod.S_ISCHR),
    "a FIFO": _fifos,
    "a deleted file": _deleted(memfd=False),
    "a memfd": _deleted(memfd=True),
    "a file lock": _locks,
    "whom an O_ASYNC fd signals, and with what": lambda p: [
        (fd, _with_dup(p, fd, lambda d: _owner(p, d))) for fd in p.fds if int(p.fdinfo(fd)["flags"], 8) & os.O_ASYNC],
    "a lease": lambda p: [(fd, _with_dup(p, fd, lambda d: (fcntl.fcntl(d, F_GETLEASE), fcntl.fcntl(d, F_GETSIG))))
                          for fd in p.kind_fds(lambda link, st: stat_mod.S_ISREG(st.st_mode))
                          if any(" LEASE " in line for line in p.fdinfo_lines(fd, "lock:"))],
    "a pipe": _pipes,
    "a unix socket": _unix_sockets,
    "a unix socket bound to a path or an abstract name": _bound_sockets,
    "who made a unix socketpair or listener, or connected to one (SO_PEERCRED)": _peer_credentials,
    "a TCP or UDP socket": _inet_sockets,
    "a socket's classic BPF filter (SO_ATTACH_FILTER) and its lock": _socket_filters,
    "a TCP connection between processes of the job": _tcp_connections,
    "an eventfd": _anon("eventfd", ("eventfd-count", "eventfd-semaphore")),
    "a timerfd": _timerfds,
    "a signalfd": _anon("signalfd", ("sigmask",)),
    "an epoll instance": _anon("eventpoll", (), lines="tfd:"),
    "a pidfd": _pidfds,
    "an inotify instance": _anon("inotify", (), lines="inotify"),
    "a fanotify instance": lambda p: [(*_common(p, fd)[:2], sorted(p.fdinfo_lines(fd, "fanotify")))
                                      for fd in p.kind_fds(lambda link, st: link == "anon_inode:[fanotify]")],
    "a mapping": _mappings,
    "SysV shared memory": _sysv,
    "a file of /dev/shm, held open or mapped": _shm_files,
    "madvise state, mlock and MAP_DROPPABLE": _advice,
    "guard pages (MADV_GUARD_INSTALL)": _guards,
    "speculation mitigations it asked for (PR_SET_SPECULATION_CTRL)": lambda p: (
        p.status().get("Speculation_Store_Bypass"), p.status().get("SpeculationIndirectBranch")),
    "its pid": lambda p: p.label(int(p.status()["Tgid"])),
    "its executable, working and root directory": lambda p: tuple(
        os.readlink(f"/proc/{p.pid}/{w}") for w in ("exe", "cwd", "root")),
    "umask, personality, dumpable": _dumpable,
    "credentials": _status("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"),
    "resource limits": lambda p: p.text("limits"),
    "its memory layout fields and auxv": _stat_mm,
    "signal dispositions and pending signals": lambda p: (p.status()["SigIgn"], p.status()["SigCgt"],
                                                          _pending_mask(p.status()["ShdPnd"])),
    "POSIX timers": _timers,
    "child subreaper, THP disable, mlockall(MCL_FUTURE)": _status("THP_enabled"),
    "oom_score_adj": lambda p: p.text("oom_score_adj").strip(),
    "coredump_filter": lambda p: p.text("coredump_filter").strip(),
    "loginuid": lambda p: p.text("loginuid").strip() if os.path.exists(f"/proc/{p.pid}/loginuid") else None,
    "its cgroups": lambda p: p.text("cgroup"),
    "its tid, name and registers": _per_thread(lambda p, t: p.text("task", str(t), "comm").strip()),
    "signal mask and pending signals": _per_thread(lambda p, t: (p.status(t)["SigBlk"],
                                                                 _pending_mask(p.status(t)["SigPnd"]))),
    "scheduling": _per_thread(_sched),
    "seccomp: strict mode, filters and their log flag": _per_thread(
        lambda p, t: (p.status(t)["Seccomp"], p.status(t)["Seccomp_filters"], p.status(t)["NoNewPrivs"])),
    "NUMA memory policy (set_mempolicy)": _per_thread(_numa_policies),
    "NUMA memory policies of ranges (mbind)": _per_thread(_numa_policies),
    "CPU pinning": _per_thread(lambda p, t: (sorted(os.sched_getaffinity(t)), p.status(t)["Cpus_allowed_list"])),
    "a job-control stop (SIGSTOP, Ctrl-Z, Slurm's suspend)": lambda p: p.status()["State"].startswith("T"),
}

# Carried or warned rows no outside reading shows, and where they are checked instead.
UNOBSERVED: dict[str, str] = {
    "events queued on an inotify or fanotify instance": "not carried (the report warns): the queue starts empty",
    "a redirected fd": "becomes another file by design: tests/test_programs.py checks what it writes",
    "a FIFO deleted from its directory": "moves as a pipe: 'a pipe' compares it",
    "a one-shot epoll watch that fired, its file not ready at restore":
        "'an epoll instance' compares the watches' event masks (the report warns where they differ)",
    "a deleted file or memfd mapped (shared or private) and held open":
        "'a mapping' and 'a deleted file'/'a memfd' compare it",
    "a memfd mapped but not held open, or a deleted file mapped privately":
        "'a mapping' compares its name; tests/test_memfd.py reads it whole, with its seals, through map_files",
    "a NUMA policy naming nodes the destination has no memory on": "one host has the nodes it has: "
        "tests/test_mempolicy.py restores an image naming others",
    "who connected a unix connection waiting in an accept queue (SO_PEERCRED once accepted)": "only accepting "
        "it shows it: tests/workloads/ckpt_peercred.c and unix_server.c accept it after the move and check it",
    "SO_PEERCRED naming a process that does not move": "tests/test_peercred.py restores a socketpair whose "
        "maker stays behind",
    "CPU pinning to CPUs the destination lacks": "one host has the CPUs it has: tests/test_sched.py restores "
                                                 "an image naming others",
    "interval timers": "only the process reads them (getitimer): the records compare them",
    "its monotonic and boot-time clocks (and time namespace)":
        "only the process reads them: tests/test_timens.py's job checks they never step",
    "a POSIX timer's overrun count": "counts expirations while frozen: the workloads check it",
    "membarrier registrations": "only the process reads them: the records compare them",
    "a system call the kernel continues after a stop (restart_syscall) that no code names":
        "a sleep that ends early: tests/test_checkpoint.py's restart_sleep checks it",
    "memory-deny-write-execute (PR_SET_MDWE)": "only the process reads it (PR_GET_MDWE): the records compare it, "
                                                "and ckpt_signals prints it",
    "clear_child_tid, robust futex list, rseq": "only ptrace or the process reads them: the records compare them",
    "alternate signal stack": "only the process reads it (sigaltstack): the records compare it",
    "its parent-death signal (PR_SET_PDEATHSIG)": "only the process reads it (PR_GET_PDEATHSIG): the records "
                                                  "compare it",
}


def _armed(value: int) -> bool:
    return value > 0


# Record fields that change while a process runs: None (not compared, with why) or how they are.
VOLATILE: dict[str, Callable[[Any], object] | None] = {
    "ThreadState.regs": None,            # a running thread's registers: the workload's own checks see them
    "ThreadState.xstate": None,
    "ProcessState.itimers": lambda its: [(t.which, t.interval_us, _armed(t.value_us)) for t in its],
    "PosixTimer.value_ns": _armed,
    "PosixTimer.overrun": None,          # expirations while frozen
    "EventFile.value_ns": None,          # a periodic timerfd that expired shows 0 until read ("a timerfd" sees it)
    "EventFile.watches": lambda ws: sorted(ws, key=lambda w: w.fd),   # the kernel's order is its tree's
    "EventFile.ticks": None,             # expirations while frozen
    "FileDesc.mtime_ns": None,           # a file the process writes (its log) changes
    "FileDesc.size": None,
    "ProcessState.shared_pending": _not_itimer,
    "ThreadState.pending": _not_itimer,
    "FileContents.data": lambda d: hashlib.sha256(d).hexdigest(),
    "Vma.file_mtime_ns": None,
    "EventFile.queued": None,            # not carried (warned): the new queue fills with what happens since
    "Vma.ino": None,                     # a deleted file or memfd made again is another inode
    "UnixSocket.file_ino": None,         # a named socket's file, bound again, is a new file
    # a deleted file only mapped, made again: named by its directory (its name is gone with it)
    "FileContents.name": lambda n: n if not n or n.startswith("/memfd:") else _deleted_name(n),
}
# Fields that hold pids (written as labels) and ids (written as first-seen order).
PIDS = {"ProcessState.pid", "ThreadState.tid", "PosixTimer.tid", "EventFile.pid", "FileDesc.owner",
        "UnixSocket.cred_pid", "UnixSocket.conn_pid"}
IDS = {"FileDesc.desc", "FileDesc.obj", "EventFile.id", "PipeBuffer.id", "UnixSocket.id", "UnixSocket.peer",
       "UnixSocket.target", "UnixSocket.listener", "FileContents.id"}


def _records(p: Proc) -> dict[str, object]:
    """Record fields, by "Record.field", each a list over the record's instances."""
    held = freeze.seize(p.pid)
    mem = RemoteMemory(p.pid, writable=True)
    try:
        got = dump.collect(held, mem)
        layout = dump.collect_layout(p.pid)
    finally:
        mem.close()
        freeze.let_go(held)
    fds = got.fds
    instances: dict[str, list[Any]] = {
        "ProcessState": [got.process], "Creds": [got.process.creds], "MmFields": [got.process.mm],
        "PosixTimer": list(got.process.posix_timers),
        "ThreadState": sorted(got.threads, key=lambda t: p.tids.index(t.tid)),
        "FileDesc": [dataclasses.replace(f, flags=f.flags & ~OPEN_ONLY, path=_deleted_name(f.path) if not
                                         f.path.startswith("/memfd:") else f.path) if f.kind == "deleted" else f
                     for f in fds.files.fds], "EventFile": list(fds.events.files), "PipeBuffer": list(fds.pipes.pipes),
        "UnixSocket": list(fds.sockets.sockets), "FileContents": list(fds.contents), "Vma": _merged_vmas([dataclasses.replace(v, path=_mapped_name(v.path)) for v in layout.vmas])}
    # Object ids as the fd table first names them, pids as labels.
    for f in fds.files.fds:
        p.obj(("obj", f.obj))
    out: dict[str, object] = {}
    for record, items in instances.items():
        for field in (dataclasses.fields(type(items[0])) if items else ()):
            name = f"{record}.{field.name}"
            values = []
            for item in items:
                v = getattr(item, field.name)
                if name in PIDS:
                    v = p.label(v) if v else v
                elif name in IDS:
                    v = p.obj(("obj", v)) if v else v
                elif type(v).__name__ in instances or (isinstance(v, tuple) and v and type(v[0]).__name__ in instances):
                    if name not in VOLATILE:
                        continue              # a record compared by its own fields
                if name in VOLATILE:
                    how = VOLATILE[name]
                    if how is None:
                        continue
                    v = how(v)
                values.append(v)
            out[name] = values
    return out


def snapshot(pid: int, *, records: bool = True) -> dict[str, object]:
    """What ``pid`` holds, by inventory row: ``observed`` (from outside) and, where ``records``,
    the row's record fields read by the dump's code (the process stopped for an instant)."""
    p = Proc(pid)
    observed = {what: read(p) for what, read in OBSERVE.items()}
    out: dict[str, object] = {"observed": observed}
    if records:
        fields = _records(p)
        out["records"] = {row.what: {f: fields[f] for f in row.fields if f in fields}
                          for row in inventory.ROWS if row.status in (inventory.CARRIED, inventory.WARNED)}
    return out


def _changed(a: object, b: object) -> str:
    """``a`` became ``b``: for lists of one length, only the items that differ."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == len(b):
            return "; ".join(f"{x!r} became {y!r}" for x, y in zip(a, b) if x != y)
        gone, new = [x for x in a if x not in b], [y for y in b if y not in a]
        return f"{len(a)} items became {len(b)}: without {gone!r}, with {new!r}"
    return f"{a!r} became {b!r}"


def differences(before: dict[str, Any], after: dict[str, Any], *, ignore: frozenset[str] = frozenset()) -> list[str]:
    """One line per row whose state differs (rows in ``ignore`` aside)."""
    out = []
    for part in ("observed", "records"):
        a, b = before.get(part, {}), after.get(part, {})
        for what in sorted(set(a) | set(b)):
            if what in ignore or a.get(what) == b.get(what):
                continue
            if part == "records":
                for f in sorted(set(a[what]) | set(b[what])):
                    if a[what].get(f) != b[what].get(f):
                        out.append(f"{what} ({f}): {_changed(a[what].get(f), b[what].get(f))}")
            else:
                out.append(f"{what}: {_changed(a.get(what), b.get(what))}")
    return out


def assert_same_state(before: dict[str, Any], after: dict[str, Any], *, ignore: frozenset[str] = frozenset()) -> None:
    diff = differences(before, after, ignore=ignore)
    assert not diff, "the moved process's state differs:\n" + "\n".join(diff)


# Workloads whose records are not read: reading a unix socket's queue marks a zero-length
# datagram as peeked, and the kernel hides a peeked one from every later peek, so the dump
# would refuse it (the inventory's row for it). Their observed state is compared all the same.
NO_RECORDS = {"ckpt_sockets"}


class Watch:
    """The state of a lingering workload (``LINGERING``, started with ``hold=True``, ready: it
    lingers, quiet, until let go) before a move, compared with its moved copy's; then the
    workload goes on."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.records = w.name not in NO_RECORDS
        self.before = snapshot(w.pid, records=self.records)

    def check(self, new_pid: int) -> None:
        try:
            assert_same_state(self.before, snapshot(new_pid, records=self.records))
        finally:
            self.w.release()
