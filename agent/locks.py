"""File locks a process holds: read on the source, checked on the destination in preflight,
taken again by the restored process before it runs.

Three kinds are carried, read from the fdinfo of the fd they are held through:

- POSIX record locks (``fcntl(F_SETLK)``) belong to the process: fdinfo shows every POSIX
  lock taken through that open file description, whoever took it, so only the lines with
  this process's pid are its own. Restore injects ``fcntl(F_SETLK)`` into the process once
  its fd table is final (closing any fd of the file, as restore's spare fds are, would drop
  them again).
- OFD locks (``F_OFD_SETLK``) and ``flock`` locks belong to the open file description:
  taken through it again, once per description.
- Leases (``F_SETLEASE``, read or write) belong to the open file description too: taken
  again through it, after the signal a break sends (``F_SETSIG``). Nothing of kcr-migrate
  may open a leased file while the lease is held, or the kernel starts breaking it (a
  non-blocking open too: the holder gets its signal): preflight does not hash a file the
  process holds a lease on (the destination must see that very file, or a filesystem hook
  bring it; a write lease's file no hook may read), and opens no file a process of the
  destination holds a write lease on. A write lease on a file both hosts see is refused, as a
  write lock is: the destination's open of it would break the source's. A lease being broken
  at the time, and delegations (NFS server's), are refused.

A lock that cannot be taken on the destination fails the restore, so a live migration
rolls back and the source keeps its locks. Preflight checks first that nobody there holds a
conflicting lock: the destination's ``/proc/locks`` (locks of that host's processes on the
same inode) and ``F_OFD_GETLK`` (which also asks a network filesystem's server). When the
destination sees the same file as the source (the same host, or storage both share), the
source's own write lock conflicts: a write lock cannot change hands between two processes
without a moment where a third could take it. Read locks are shared and simply held by both
until the source ends. A write lock the job holds only for moments (a database's, held for
each commit) is no reason to refuse: the destination names its very files, the source waits
in preflight for a moment the job holds no write lock on one (``job_write_lock``) and
refuses only a lock held throughout ``UNLOCK_WAIT``; the holder freezes the job at such a
moment (thawed and frozen again while it holds one), so no write lock changes hands.
"""
from __future__ import annotations

import fcntl
import os
import struct
import time
from typing import Any, Callable, Collection, Iterable, Sequence

from transport.errors import NoSuchProcess, ProtocolError, RestoreError, UnsupportedResource
from transport.schema import FileLock

F_RDLCK, F_WRLCK = 0, 1
F_SETLK, F_SETSIG, F_GETSIG, F_OFD_GETLK, F_OFD_SETLK = 6, 10, 11, 36, 37
F_SETLEASE = 1024
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
_KINDS = {"POSIX": "posix", "OFDLCK": "ofd", "FLOCK": "flock", "LEASE": "lease"}
_NAMES = {"posix": "POSIX record", "ofd": "OFD", "flock": "flock", "lease": "lease"}
FLOCK = struct.Struct("<hh4xqqi4x")     # struct flock on x86_64: type, whence, start, len, pid
UNLOCK_WAIT = 1.0        # seconds preflight waits for the job to let go of a write lock on a very file
UNLOCK_POLL = 0.002


def parse(pid: int, fd: int, target: str, lines: Sequence[str]) -> tuple[FileLock, ...]:
    """The locks process ``pid`` holds through ``fd`` (fdinfo's ``lock:`` lines)."""
    out: list[FileLock] = []
    for line in lines:
        # "1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF", "2: FLOCK  ADVISORY  READ  1234 fe:00:5678 0 EOF"
        parts = line.split()
        if len(parts) < 8 or parts[1] == "->":
            continue
        kind = _KINDS.get(parts[1])
        if kind is None:
            what = {"DELEG": "a delegation"}.get(parts[1], f"a {parts[1]} lock")
            raise UnsupportedResource(
                f"pid {pid} holds {what} on {target} (fd {fd}): kcr-migrate cannot carry it, and one lost on the "
                "way is how data gets corrupted; move the process when it does not hold it", pid=pid)
        if kind == "lease" and parts[2] != "ACTIVE":
            raise UnsupportedResource(
                f"pid {pid}'s lease on {target} (fd {fd}) is being broken (another process opened the file): "
                "move the process once it has let the lease go (F_SETLEASE F_UNLCK)", pid=pid)
        if kind == "posix" and int(parts[4]) != pid:
            continue                 # another process's lock, taken through a description we share
        if kind == "lease":
            out.append(FileLock(kind="lease", write=int(parts[3] == "WRITE")))
            continue
        start = int(parts[6])
        length = 0 if parts[7] == "EOF" else int(parts[7]) - start + 1
        out.append(FileLock(kind=kind, write=int(parts[3] == "WRITE"), start=start, length=length))
    return tuple(dict.fromkeys(out))


def describe(lock: FileLock) -> str:
    if lock.kind == "lease":
        return f"a {'write' if lock.write else 'read'} lease"
    span = "" if lock.kind == "flock" else (
        f" on bytes {lock.start}-{lock.start + lock.length - 1}" if lock.length else f" from byte {lock.start} on")
    return f"a {'write' if lock.write else 'read'} {_NAMES[lock.kind]} lock{span}"


def held_by(pid: int) -> list[dict[str, Any]]:
    """What preflight tells the destination: each lock ``pid`` holds, with the path it is on."""
    from agent.procfs import list_fds
    return [{"path": info.target, "kind": lock.kind, "write": lock.write, "start": lock.start, "length": lock.length}
            for info in list_fds(pid) for lock in parse(pid, info.fd, info.target, info.locks)]


def from_wire(items: object) -> list[tuple[str, FileLock]]:
    """The source's list, checked (it comes from another host)."""
    if not isinstance(items, list) or len(items) > 1 << 16:
        raise ProtocolError("the source's summary lists locks that cannot be")
    out = []
    for item in items:
        try:
            path, lock = item["path"], FileLock(kind=item["kind"], write=int(bool(item["write"])),
                                                start=int(item["start"]), length=int(item["length"]))
        except (TypeError, KeyError, ValueError):
            raise ProtocolError("the source's summary lists a lock that cannot be") from None
        if not (isinstance(path, str) and path.startswith("/") and lock.kind in _NAMES
                and 0 <= lock.start < 1 << 63 and 0 <= lock.length < 1 << 63):
            raise ProtocolError("the source's summary lists a lock that cannot be")
        out.append((path, lock))
    return out


def _host_locks() -> list[list[str]]:
    """The fields of each lock this host's processes hold (/proc/locks: "1:", kind, mode,
    READ/WRITE, pid, major:minor:inode, start, end or EOF), those waiting for one left out."""
    with open("/proc/locks") as f:
        return [parts for parts in map(str.split, f) if len(parts) >= 8 and parts[1] != "->"]


def _held_here(path: str) -> list[tuple[str, bool, int, int, int]]:
    """(kind, write, pid, start, end or -1) of every lock this host's processes hold on the
    inode ``path`` names (/proc/locks)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return [(_KINDS.get(parts[1], parts[1].lower()), parts[3] == "WRITE", int(parts[4]), int(parts[6]),
             -1 if parts[7] == "EOF" else int(parts[7])) for parts in _host_locks() if parts[5] == dev]


def _family(kind: str) -> str:
    """Locks of one family exclude each other; of two, never (a flock and a POSIX lock)."""
    return {"ofd": "posix", "deleg": "lease"}.get(kind, kind)


def write_lease_holder(path: str) -> int | None:
    """The pid of a process of this host that holds a write lease on ``path``: opening the file
    (for anything) would start breaking it. None if none does."""
    try:
        held = _held_here(path)
    except OSError:
        return None
    return next((pid for kind, write, pid, _, _ in held if _family(kind) == "lease" and write), None)


def _overlaps(lock: FileLock, start: int, end: int) -> bool:
    if lock.kind in ("flock", "lease"):
        return True
    mine_end = lock.start + lock.length - 1 if lock.length else -1
    return (end < 0 or lock.start <= end) and (mine_end < 0 or start <= mine_end)


def conflict(path: str, lock: FileLock) -> str | None:
    """Who on this host (or, through the filesystem, elsewhere) holds a lock that would keep
    ``lock`` from being taken on ``path``; None if nobody does. Takes no lock, breaks none."""
    for kind, write, pid, start, end in _held_here(path):
        if _family(kind) == _family(lock.kind) and (write or lock.write) and _overlaps(lock, start, end):
            what = "lease" if _family(kind) == "lease" else f"{_NAMES.get(kind, kind)} lock"
            return f"pid {pid} holds a {'write' if write else 'read'} {what} on it here"
    if lock.kind in ("flock", "lease"):
        return None                  # a lease is this host's alone; restore's F_SETLEASE decides the rest
    leaser = write_lease_holder(path)
    if leaser is not None:
        return f"pid {leaser} holds a write lease on it here, which opening the file to ask would break"
    # Read-only is enough to ask (F_OFD_GETLK takes no lock, whatever the probe's type), breaks
    # no read lease, and leaves the access time alone where we may (O_NOATIME: the owner or root).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        probe = FLOCK.pack(F_WRLCK if lock.write else F_RDLCK, os.SEEK_SET, lock.start, lock.length, 0)
        kind, _, _, _, pid = FLOCK.unpack(fcntl.fcntl(fd, F_OFD_GETLK, probe))
    except OSError:
        return None                  # a filesystem without lock queries: the restore's own try decides
    finally:
        os.close(fd)
    if kind in (F_RDLCK, F_WRLCK):
        holder = f"pid {pid}" if pid > 0 else "another open file description"
        return f"{holder} holds a {'write' if kind == F_WRLCK else 'read'} lock on it (seen through the filesystem)"
    return None


def check_free(locks: list[tuple[str, FileLock]], host: str, pid: int | None, exempt: Sequence[str],
               very: Collection[str] = ()) -> None:
    """Preflight on the destination: every lock the process holds can be taken here. ``very``:
    the paths that are here the very file the source has (``agent.files.check_files``): a lease
    on one is refused (opening the file here would break it); a write lock on one is the
    source's to wait out (``job_write_lock``), the job's own, whether or not this host's
    /proc/locks shows it (it does not when the source's processes are outside this host's pid
    namespace)."""
    for path, lock in locks:
        if any(path == e or path.startswith(e.rstrip("/") + "/") for e in exempt):
            continue                 # a filesystem hook brings it later; restore takes the lock or fails
        if path in very:
            if lock.kind == "lease" and lock.write:
                refuse_same_file(path, lock, host, pid)
            if lock.write:
                continue             # the job's own: frozen at a moment it holds none
        try:
            who = conflict(path, lock)
        except OSError:
            continue                 # missing here: the file checks say so
        if who is None:
            continue
        if who.startswith(f"pid {pid} "):
            refuse_same_file(path, lock, host, pid)
        raise RestoreError(f"pid {pid} holds {describe(lock)} of {path}, which cannot be taken on {host}: {who}; "
                           "move the process when that lock is released", pid=pid, host=host)


def refuse_same_file(path: str, lock: FileLock, host: str, pid: int | None, held_for: float = 0.0) -> None:
    held = f"pid {pid} holds {describe(lock)} of {path}"
    if lock.kind == "lease":
        raise RestoreError(f"{held}, and {host} sees that same file (the same host): opening it there would "
                           "break the lease before the move; move the process when it does not hold it, or to "
                           "another host", pid=pid, host=host)
    throughout = f" (held throughout {held_for:g} s)" if held_for else ""
    raise RestoreError(f"{held}{throughout}, and {host} sees that same file (the same host, or storage both "
                       "share): a write lock cannot change hands between two processes without a moment where a "
                       "third could take it; move the process when it does not hold it, or to a host with its "
                       "own copy of the file", pid=pid, host=host)


def job_write_lock(pids: Iterable[int], files: Collection[tuple[int, int]]) -> tuple[int, str, FileLock] | None:
    """A write lock (POSIX, OFD or flock; a lease is refused in preflight) a process of
    ``pids`` holds on one of ``files`` ((st_dev, st_ino) pairs), as (pid, path, lock); None
    if it holds none. Reads the fdinfo of the job's own fds, never /proc/locks: reading that
    takes the kernel's file-lock rwsem for writing (``locks_start``), which waits out an RCU
    grace period when no one read it a moment before: 8 ms here, and this runs inside the
    freeze. Only an fd that holds a lock on an inode of such a number is stat()ed (that goes
    to the filesystem, which a hung network mount would not answer)."""
    from agent.procfs import fd_links, read_text
    if not files:
        return None
    inodes = {ino for _, ino in files}
    for pid in pids:
        try:
            links = fd_links(pid)
        except (OSError, NoSuchProcess):
            continue                 # gone: the freeze sees it leave
        for fd, target in links:
            if not target.startswith("/"):
                continue             # pipes, sockets, anonymous inodes
            try:
                info = read_text(pid, "fdinfo", str(fd))
            except (OSError, NoSuchProcess):
                continue                 # closed meanwhile
            fields = [line.partition(":") for line in info.splitlines()]
            lines = [value.strip() for key, _, value in fields if key == "lock"]
            ino = next((value.strip() for key, _, value in fields if key == "ino"), "")
            if not lines or (ino.isdigit() and int(ino) not in inodes):
                continue
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue                 # closed meanwhile
            if (st.st_dev, st.st_ino) not in files:
                continue
            for lock in parse(pid, fd, target, lines):
                if lock.write and lock.kind != "lease":
                    return pid, target, lock
    return None


def wait_unlocked(pids: Callable[[], Iterable[int]], files: Collection[tuple[int, int]],
                  within: float) -> tuple[int, str, FileLock] | None:
    """Wait up to ``within`` seconds for a moment the job (``pids()``, read again each look)
    holds no write lock on ``files``: None then, else the lock it held throughout."""
    deadline = time.monotonic() + within
    while True:
        held = job_write_lock(pids(), files)
        if held is None or time.monotonic() >= deadline:
            return held
        time.sleep(UNLOCK_POLL)


def take_calls(fd: int, lock: FileLock, scratch: int) -> tuple[str, tuple[int, ...], bytes | None]:
    """The system call the restored process makes to take ``lock`` through ``fd``: (name, args,
    the struct flock to put at ``scratch`` first, if any)."""
    if lock.kind == "flock":
        return "flock", (fd, (LOCK_EX if lock.write else LOCK_SH) | LOCK_NB), None
    if lock.kind == "lease":
        return "fcntl", (fd, F_SETLEASE, F_WRLCK if lock.write else F_RDLCK), None
    arg = FLOCK.pack(F_WRLCK if lock.write else F_RDLCK, os.SEEK_SET, lock.start, lock.length, 0)
    return "fcntl", (fd, F_SETLK if lock.kind == "posix" else F_OFD_SETLK, scratch), arg


def holders(path: str) -> str:
    """Who holds locks on ``path`` here, for an error message."""
    try:
        held = _held_here(path)
    except OSError:
        return "unknown"
    return ", ".join(sorted({f"pid {pid}" for _, _, pid, _, _ in held})) or "nobody on this host"
