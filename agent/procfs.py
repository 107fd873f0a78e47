"""Reading a process through /proc: status, stat, threads, file descriptors, namespaces.

Also the preflight check: ``check_supported`` refuses, before anything is frozen, a process
that holds something kcr-migrate cannot carry yet, with one line that names it.
"""
from __future__ import annotations

import ctypes
import os
import re
import stat as stat_mod
from typing import TYPE_CHECKING, Collection, Iterable, Mapping

from agent import inventory, sched, timens
from transport.errors import NoSuchProcess, PermissionDenied, ProcessError, UnsupportedResource
from transport.frozen import frozen
from transport.schema import CHAR_DEVICES, SHM_DIR, is_shm_path

if TYPE_CHECKING:
    from precopy.layout import MapEntry

PF_KTHREAD = 0x00200000
NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")


def proc_path(pid: int, *parts: str) -> str:
    return os.path.join(f"/proc/{pid}", *parts)


def read_text(pid: int, *parts: str) -> str:
    # Read whole as bytes, then decoded: a text-mode open() costs twice as much for the small
    # files of /proc, read tens of times a process while a job is frozen.
    try:
        fd = os.open(proc_path(pid, *parts), os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode()
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}: check the pid (ps -p {pid})", pid=pid) from None
    except ProcessLookupError:
        raise NoSuchProcess(f"process {pid} exited", pid=pid) from None


def read_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in read_text(pid, "status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def read_stat(pid: int) -> list[str]:
    """/proc/PID/stat fields, 1-based as in proc(5): fields[1] is pid, fields[2] comm."""
    text = read_text(pid, "stat")
    lpar, rpar = text.index("("), text.rindex(")")
    return ["", text[:lpar].strip(), text[lpar + 1: rpar]] + text[rpar + 2:].split()


def ids_held_outside(pids: Collection[int]) -> list[str]:
    """Processes outside ``pids`` whose session or process group is one of theirs (a job
    member that left the tree, as a double fork leaves it), each as a phrase: while one runs,
    that id stays in use on this host, so the job cannot be made again here under its pids."""
    job = set(pids)
    out: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in job:
            continue
        try:
            stat = read_stat(int(entry))
        except (OSError, NoSuchProcess):
            continue                      # gone meanwhile
        pgid, sid = int(stat[5]), int(stat[6])
        held = sid if sid in job else pgid if pgid in job else 0
        if held:
            what = "session" if held == sid else "process group"
            out.append(f"pid {entry} ({stat[2]}) is in the {what} of pid {held} but not in the job")
    return out


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(proc_path(pid, "task")))
    except (FileNotFoundError, ProcessLookupError):      # (ESRCH: on its way out)
        raise NoSuchProcess(f"no process with pid {pid}", pid=pid) from None


def thread_comm(pid: int, tid: int) -> str:
    return read_text(pid, "task", str(tid), "comm").rstrip("\n")


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in thread_ids(pid):
        try:
            text = read_text(pid, "task", str(tid), "children")
        except NoSuchProcess:
            continue
        kids.extend(int(c) for c in text.split())
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents before children. A descendant that exits
    while the tree is read is left out (its children, reparented, are no longer the tree's);
    NoSuchProcess if ``pid`` itself is gone."""
    out = [pid]
    i = 0
    while i < len(out):
        try:
            kids = children(out[i])
        except NoSuchProcess:
            if i == 0:
                raise
            del out[i]
            continue
        out.extend(k for k in kids if k not in out)
        i += 1
    return out


@frozen
class FdInfo:
    fd: int
    target: str        # readlink of /proc/PID/fd/N
    pos: int
    flags: int
    mnt_id: int
    st: os.stat_result | None
    locks: tuple[str, ...] = ()     # fdinfo's "lock:" lines: POSIX, OFD and flock locks, leases
    fdinfo: str = ""                # all of /proc/PID/fdinfo/N (what each kind adds: counters, timers, ...)
    fs_type: int = 0                # statfs's f_type, asked only of a file that could be a message queue


def fd_links(pid: int) -> list[tuple[int, str]]:
    """(fd, what it links to) of each fd: ``list_fds`` without fdinfo or stat, for callers
    that pick a few fds by their target (a process of hundreds of fds is read once in full)."""
    fd_dir = proc_path(pid, "fd")
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no process with pid {pid}", pid=pid) from None
    except PermissionError:
        raise PermissionDenied(f"may not inspect pid {pid}'s files: run as its owner or as root", pid=pid) from None
    out = []
    for name in sorted(names, key=int):
        try:
            out.append((int(name), os.readlink(os.path.join(fd_dir, name))))
        except FileNotFoundError:
            continue          # closed while we looked
    return out


def list_fds(pid: int) -> list[FdInfo]:
    out: list[FdInfo] = []
    fd_dir = proc_path(pid, "fd")
    for fd, target in fd_links(pid):
        try:
            info = read_text(pid, "fdinfo", str(fd))
        except (FileNotFoundError, NoSuchProcess):
            continue          # closed while we looked
        fields: dict[str, str] = {}
        locks: list[str] = []
        for line in info.splitlines():
            k, _, v = line.partition(":")
            if k == "lock":
                locks.append(v.strip())
            else:
                fields[k] = v.strip()
        try:
            st: os.stat_result | None = os.stat(os.path.join(fd_dir, str(fd)))
        except FileNotFoundError:
            continue          # closed while we looked (a running process, in pre-copy)
        except OSError:
            st = None
        # A POSIX message queue (mq_open) shows as a regular file named /NAME on an anonymous
        # device: only such a one is asked its filesystem (a statfs of the fd's link).
        fs_type = _fs_type(os.path.join(fd_dir, str(fd))) if st is not None and stat_mod.S_ISREG(st.st_mode) \
            and os.major(st.st_dev) == 0 and target.rfind("/") == 0 else 0
        out.append(FdInfo(fd, target, int(fields.get("pos", "0")), int(fields.get("flags", "0"), 8),
                          int(fields.get("mnt_id", "0")), st, tuple(locks), info, fs_type))
    return out


MQUEUE_MAGIC = 0x19800202
SECRETMEM_MAGIC = 0x5345434D     # memfd_secret(): /secretmem (deleted)
_libc = ctypes.CDLL(None, use_errno=True)


def _fs_type(path: str) -> int:
    """statfs(path)'s f_type (0 where it cannot be asked)."""
    buf = ctypes.create_string_buffer(128)          # struct statfs: f_type (a long) first
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


RLIM_INFINITY = (1 << 64) - 1


def read_limits(pid: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) from /proc/PID/limits: prlimit() on another user's process
    needs CAP_SYS_RESOURCE, reading this file does not. Rows are in resource-number order."""
    out: list[tuple[int, int, int]] = []
    for resource, line in enumerate(read_text(pid, "limits").splitlines()[1:]):
        # "Max open files            1024                 524288               files"
        fields = line[26:].split()
        if len(fields) < 2:
            continue
        soft, hard = (RLIM_INFINITY if f == "unlimited" else int(f) for f in fields[:2])
        out.append((resource, soft, hard))
    return out


def namespace_ids(pid: int | str) -> dict[str, str]:
    out: dict[str, str] = {}
    for ns in NAMESPACES:
        try:
            out[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except FileNotFoundError:
            continue
    return out


def exists(pid: int) -> bool:
    return os.path.exists(proc_path(pid))


CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE = 21, 40


def check_restore_privileges(host: str | None = None) -> None:
    """Refuse, before anything is built, a restore the kernel would stop halfway: giving the
    process back its executable and memory layout (prctl PR_SET_MM_MAP with its exe) needs
    CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN in this process, and so does keeping its pid."""
    effective = int(read_status(os.getpid()).get("CapEff", "0"), 16)
    if not effective & (1 << CAP_CHECKPOINT_RESTORE | 1 << CAP_SYS_ADMIN):
        where = f"kcr-agent on {host}" if host else "kcr-migrate restore"
        raise PermissionDenied(f"restoring a process needs root, or the capability CAP_CHECKPOINT_RESTORE (or "
                               "CAP_SYS_ADMIN): the kernel lets nothing less set its executable and memory layout "
                               f"(prctl PR_SET_MM_MAP); run {where} as root", host=host)


def check_target(pid: int) -> None:
    """A pid we can work on at all: exists, not a kernel thread, not ourselves."""
    if pid <= 0:
        raise NoSuchProcess(f"invalid pid {pid}", pid=pid)
    if pid == os.getpid():
        raise ProcessError("cannot checkpoint kcr-migrate's own process", pid=pid)
    stat = read_stat(pid)
    if pid == 1:
        raise ProcessError(f"pid 1 ({stat[2]}) is the init of its pid namespace, which every other process there "
                           "depends on: it cannot be moved or checkpointed; give the pid of the job itself", pid=pid)
    if int(stat[9]) & PF_KTHREAD:
        raise ProcessError(f"pid {pid} ({stat[2]}) is a kernel thread: only user processes can be moved", pid=pid)
    if stat[3] in ("Z", "X"):
        if _thread_count(pid) > 1:
            raise UnsupportedResource(f"pid {pid}'s main thread has exited (pthread_exit) while its other threads "
                                      "run on: kcr-migrate cannot move such a process yet (see README, Limits)",
                                      pid=pid)
        raise NoSuchProcess(f"pid {pid} is a zombie: it has already exited", pid=pid)
    tgid = int(read_status(pid).get("Tgid", pid))
    if tgid != pid:
        raise ProcessError(f"{pid} is a thread of process {tgid}: give the process id {tgid}", pid=pid)


def _thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def mounts(pid: int | str = "self") -> list[tuple[int, int, str]]:
    """(major, minor, mount point) of each mount in ``pid``'s mount namespace, as mountinfo
    lists them (octal escapes such as ``\\040`` for a space undone)."""
    out: list[tuple[int, int, str]] = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                major, _, minor = fields[2].partition(":")
                out.append((int(major), int(minor), _unescape(fields[4])))
    return out


def mount_table(pid: int | str = "self") -> list[tuple[str, str, str, str]]:
    """(filesystem type, mount point, super options, the filesystem's directory mounted there)
    of each mount in ``pid``'s namespace."""
    out: list[tuple[str, str, str, str]] = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) > 4 and len(rest) >= 3:
                out.append((rest[0], _unescape(fields[4]), rest[2], _unescape(fields[3])))
    return out


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field          # most are plain (mountinfo is read often while a job is frozen)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


_PROC_PID = re.compile(r"^/proc/\d+(/|$)")

_FD_REFUSALS = inventory.fd_refusals()     # pipes, sockets and event files agent.fdtable carries come first


def classify_fd(info: FdInfo) -> tuple[str | None, str]:
    """("file" | "dir" | "chr", "") for what we carry, or (None, reason) for what we refuse."""
    target = info.target
    for prefix, what in _FD_REFUSALS:
        if target.startswith(prefix):
            return None, what
    if not target.startswith("/"):
        return None, f"an unsupported file ({target})"
    if info.fs_type == MQUEUE_MAGIC:
        return None, f"a POSIX message queue ({target})"
    if info.fs_type == SECRETMEM_MAGIC:
        return None, "a memfd_secret() area (memory no other process may read)"
    if target.endswith(" (deleted)"):
        return None, f"a deleted file ({target[:-10]})"
    if _PROC_PID.match(target):
        # It names one process's file by pid: on the destination (or after a restore) that
        # pid is another process, or none.
        return None, f"a file of a process under /proc ({target}), which restore could not open again"
    st = info.st
    if st is None:
        return None, f"a file that cannot be inspected ({target})"
    if stat_mod.S_ISREG(st.st_mode):
        return "file", ""
    if stat_mod.S_ISDIR(st.st_mode):
        return "dir", ""
    if stat_mod.S_ISCHR(st.st_mode):
        if target.startswith("/dev/pts/") or target.startswith("/dev/tty") or target == "/dev/ptmx" \
                or target.startswith("/dev/console"):
            return None, f"a terminal ({target})"
        if target in CHAR_DEVICES:
            return "chr", ""
        return None, f"a device ({target})"
    if stat_mod.S_ISFIFO(st.st_mode):
        return None, f"a FIFO ({target})"      # agent.fdtable carries those it can name
    return None, f"an unsupported file ({target})"


def held_deleted(pids: Iterable[int]) -> set[int]:
    """The inodes of the deleted files (memfds among them) these processes hold open as fds:
    their contents are carried whole (``agent.fdtable``), mapped or not."""
    out: set[int] = set()
    for p in pids:
        for fd, target in fd_links(p):
            if not target.endswith(" (deleted)"):
                continue
            try:
                st = os.stat(proc_path(p, "fd", str(fd)))
            except OSError:
                continue
            if stat_mod.S_ISREG(st.st_mode) and not st.st_nlink:
                out.add(st.st_ino)
    return out


@frozen
class MappedOnly:
    """A deleted file or memfd a process maps but no fd of the job holds: carried whole, as a
    held one is (``agent.fdtable``), read through the mapping's /proc/PID/map_files link."""

    pid: int
    ino: int
    name: str        # as the mapping shows it, without " (deleted)": /memfd:NAME, or the path it had
    source: str      # /proc/PID/map_files/START-END
    start: int


def mapped_only(pid: int, maps: Iterable[MapEntry], held: set[int]) -> dict[int, MappedOnly]:
    """By inode, the memfds (mapped shared or privately) and deleted files mapped privately
    that ``pid`` maps and no fd of ``held`` (inodes of deleted files the job holds) names. A
    deleted file mapped shared (not a memfd) is carried as the memory it maps instead."""
    out: dict[int, MappedOnly] = {}
    for m in maps:
        if not m.inode or m.inode in held or m.inode in out or not m.name.endswith(" (deleted)"):
            continue
        if m.name.startswith("/memfd:") or (m.kind == "file" and m.deleted):
            out[m.inode] = MappedOnly(pid, m.inode, m.name[:-len(" (deleted)")],
                                      proc_path(pid, "map_files", f"{m.start:x}-{m.end:x}"), m.start)
    return out


def check_mapped_only(m: MappedOnly) -> os.stat_result:
    """Refuse one that cannot be made again as it was: linked under another name, or of huge
    pages. Returns its stat."""
    try:
        st = os.stat(m.source)
    except FileNotFoundError:
        raise NoSuchProcess(f"process {m.pid} unmapped {m.name} while it was being checked", pid=m.pid) from None
    if st.st_nlink:
        raise UnsupportedResource(f"pid {m.pid} maps {m.name}, deleted under that name but still linked under "
                                  f"another (inode {st.st_ino}): kcr-migrate cannot move it yet (see README, Limits)",
                                  pid=m.pid)
    if m.name.startswith("/memfd:") and st.st_blksize > os.sysconf("SC_PAGE_SIZE"):
        raise UnsupportedResource(f"pid {m.pid} maps the memfd {m.name} of huge pages (MFD_HUGETLB) at "
                                  f"{m.start:#x}: kcr-migrate cannot move it yet (see README, Limits)", pid=m.pid)
    return st


def _check_deleted_shared(pid: int, maps: list[MapEntry], held: set[int]) -> None:
    """A deleted file mapped MAP_SHARED and not held open is carried as the memory the process
    maps of it: refuse one that holds more than that (the rest would be lost)."""
    extent: dict[int, tuple[int, MapEntry]] = {}
    for m in maps:
        if m.shared_anon and m.name != "/dev/zero (deleted)" and m.inode not in held and not m.name.startswith("/SYSV"):
            end = m.offset + m.end - m.start
            if end > extent.get(m.inode, (0, m))[0]:
                extent[m.inode] = (end, m)
    for end, m in extent.values():
        try:
            st = os.stat(proc_path(pid, "map_files", f"{m.start:x}-{m.end:x}"))
        except OSError:
            continue
        if st.st_nlink and is_shm_path(m.name[:-10]):
            from agent.shm_files import linked_name     # (it reads this module's tables)
            if linked_name(st) is None:
                raise UnsupportedResource(
                    f"pid {pid} maps {m.name[:-10]} shared, deleted under that name but still linked under another "
                    f"(inode {st.st_ino}) outside {SHM_DIR}: kcr-migrate cannot move it yet (see README, Limits)",
                    pid=pid)
            continue        # a file of /dev/shm under its own name (sem_open's): carried whole by that name
        size = st.st_size
        if size > end:
            raise UnsupportedResource(
                f"pid {pid} maps part of the deleted file {m.name[:-10]} ({end} of its {size} bytes): "
                "kcr-migrate carries only the part a process maps; it cannot move it yet", pid=pid)


def _check_sysv(pid: int) -> None:
    """SysV segments are carried (``precopy.sysv``), but for those of huge pages."""
    from precopy.layout import read_smaps

    for m in read_smaps(pid):
        if m.name.startswith("/SYSV") and "ht" in m.vmflags:
            raise UnsupportedResource(
                f"pid {pid} attaches a SysV shared memory segment of huge pages (SHM_HUGETLB, id {m.inode}) at "
                f"{m.start:#x}: kcr-migrate cannot move it yet (see README, Limits)", pid=pid)


# What a thread shares with its process unless it unshared it (or set it for itself alone, with
# the raw system calls: glibc's set*id() sets every thread's): restore gives every thread its
# process's. The credentials' lines of /proc/PID/task/TID/status, and kcmp's kinds.
THREAD_CREDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
_CREDS_KEYS = tuple(k.encode() for k in THREAD_CREDS)


def thread_statuses(pid: int, tids: list[int]) -> dict[int, dict[bytes, bytes]]:
    """/proc/PID/task/TID/status of each thread but the leader, as raw key: value pairs (one
    read each: this runs frozen, per thread); a thread gone meanwhile is left out."""
    out: dict[int, dict[bytes, bytes]] = {}
    for tid in tids:
        if tid == pid:
            continue
        try:
            fd = os.open(proc_path(pid, "task", str(tid), "status"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                text = os.read(fd, 1 << 14)
            finally:
                os.close(fd)
        except OSError:
            continue
        out[tid] = {k: v.strip() for k, _, v in (line.partition(b":") for line in text.splitlines())}
    return out


def _check_threads_share(pid: int, threads: Mapping[int, Mapping[bytes, bytes]], status: Mapping[str, str]) -> None:
    """Refuse a thread with credentials, an fd table or a working directory of its own (as
    Samba's threads switch ids with raw setresuid): restored, it would take its process's,
    and a thread that had dropped root would have it again. ``threads``: ``thread_statuses``."""
    from precopy.kernel import KCMP_FILES, KCMP_FS, kcmp
    ours = {k.encode(): status.get(k, "").encode() for k in THREAD_CREDS}
    for tid, own in threads.items():
        differ = [k for k in _CREDS_KEYS if own.get(k, b"") != ours[k]]
        if differ:
            key = differ[0]
            raise UnsupportedResource(
                f"thread {tid} of pid {pid} runs under credentials of its own ({key.decode()} "
                f"{' '.join(own.get(key, b'').decode().split())} where its process has "
                f"{' '.join(ours[key].decode().split())}), set for it alone: restored, it would take its "
                "process's; kcr-migrate cannot move it yet (see README, Limits)", pid=pid)
        for kind, what, how in ((KCMP_FILES, "an fd table", "CLONE_FILES"),
                                (KCMP_FS, "a working directory, root and umask", "CLONE_FS")):
            try:
                same = kcmp(pid, tid, kind, 0, 0) == 0
            except OSError:
                continue         # gone meanwhile
            if not same:
                raise UnsupportedResource(
                    f"thread {tid} of pid {pid} has {what} of its own (unshare({how})): restored, it would share "
                    "its process's; kcr-migrate cannot move it yet (see README, Limits)", pid=pid)


AIO_RING = "/[aio] (deleted)"        # /proc/PID/maps's name of a kernel AIO context's ring


def check_supported(pid: int, *, maps: list | None = None, redirect: Mapping[int, str] | None = None,
                    tree: list[int] | None = None) -> None:
    """Refuse what we cannot carry yet; every message names the resource and what to do.
    ``redirect`` (fd -> path) names fds to the outside that become files on the destination.
    ``tree``: the processes that move with ``pid`` (its descendants among them); their fd
    tables are checked together by the caller (``agent.fdtable.describe_tree``)."""
    from agent.fdtable import describe  # it reads fds through this module
    from precopy.layout import file_maps  # precopy is below agent

    fix = "kcr-migrate cannot move it yet (see README, Limits)"
    if tree is None:
        describe(pid, redirect)
    # Only mappings that name something are refused (files, devices, SysV, memfd, anon
    # inodes): the anonymous rest, maybe tens of thousands, is not parsed (this runs frozen).
    every = maps if maps is not None else file_maps(pid)
    for m in every:
        if m.name == AIO_RING:
            # Not memory of its own: the ring of a kernel AIO context, whose id is this address
            # and whose requests and completions live in the kernel. Carried as the deleted
            # shared file it looks like, the restored process's io_getevents() fails (EINVAL).
            raise UnsupportedResource(f"pid {pid} has a Linux AIO context (io_setup) at {m.start:#x}: its requests "
                                      f"and completions are the kernel's; {fix}", pid=pid)
    deleted = any(m.name.endswith(" (deleted)") and m.inode and m.name != "/dev/zero (deleted)" for m in every)
    held = held_deleted({pid, *(tree or ())}) if deleted else set()
    only = mapped_only(pid, every, held) if deleted else {}
    for o in only.values():
        check_mapped_only(o)
    _check_deleted_shared(pid, every, held | set(only))
    for m in every:
        if m.inode in only and m.name.endswith(" (deleted)") and not m.name.startswith("/SYSV"):
            continue        # carried whole, made again by its name
        if m.name.startswith("/SYSV") and not m.shared:
            raise UnsupportedResource(f"pid {pid} maps SysV shared memory privately at {m.start:#x}: {fix}", pid=pid)
        if m.name.startswith(SHM_DIR) and not m.shared_anon and not is_shm_path(m.name):
            raise UnsupportedResource(f"pid {pid} maps {m.name}, in a directory of {SHM_DIR}, at {m.start:#x}: "
                                      f"kcr-migrate carries the files directly in {SHM_DIR} only", pid=pid)
        if m.name.startswith("/dev/") and not m.shared_anon and m.name != "/dev/zero" and not is_shm_path(m.name):
            raise UnsupportedResource(f"pid {pid} maps the device {m.name} at {m.start:#x}: {fix}", pid=pid)
        if m.name.startswith("anon_inode:"):
            raise UnsupportedResource(f"pid {pid} maps {m.name} at {m.start:#x}: {fix}", pid=pid)
    if any(m.name.startswith("/SYSV") for m in every):
        _check_sysv(pid)
    for what in ("cwd", "root"):
        try:
            place = os.readlink(proc_path(pid, what))
        except OSError:
            continue
        if place.endswith(" (deleted)") or _PROC_PID.match(place):
            raise UnsupportedResource(
                f"pid {pid}'s {'working directory' if what == 'cwd' else 'root directory'} is {place}, which "
                f"restore could not enter again: {fix}", pid=pid)
    tids = thread_ids(pid)
    sched.check_process(pid, tids)
    status = read_status(pid)
    threads = thread_statuses(pid, tids)
    _check_threads_share(pid, threads, status)
    if int(status.get("SigIgn", "0"), 16) & 1 << 4:          # SIGTRAP
        raise UnsupportedResource(
            f"pid {pid} ignores SIGTRAP: kcr-migrate's injected system calls would reset that to the "
            "default (agent/inject.py); kcr-migrate cannot move it yet", pid=pid)
    from agent import seccomp    # it reads /proc through this module
    if status.get("TracerPid", "0") == "0":
        seccomp.check_running(pid, tids)      # not frozen by us: the filters are read here
    else:
        modes = [int(status.get("Seccomp", "0"))] + [int(t.get(b"Seccomp", b"0")) for t in threads.values()]
        seccomp.check_rights(pid, modes, status)      # frozen: the dump reads them
    ours = namespace_ids("self")
    theirs = namespace_ids(pid)
    timens.check(pid, tree[0] if tree else None)        # its own time namespace moves with it
    for ns, ident in theirs.items():
        if ns != "time" and ns in ours and ours[ns] != ident:
            raise UnsupportedResource(
                f"pid {pid} lives in another {ns} namespace than kcr-migrate: run kcr-migrate inside the "
                f"process's namespaces (e.g. with nsenter)", pid=pid)
