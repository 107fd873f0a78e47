"""Opening and making files for a restored process with its rights, never the restorer's.

A restore runs as root (or with CAP_CHECKPOINT_RESTORE), but what it opens and makes for a
process is the process's business: an image (forged, or edited and trusted) or a stream that
claims a uid-1000 process with an fd on /etc/shadow must not get it. So every open on the
restore path, and every file it makes (FIFOs at their paths, /dev/shm files, unix socket
files, deleted files made again), happens inside ``Identity.acting()``: the calling thread
takes the process's filesystem uid and gid and its supplementary groups, which the kernel
uses for every permission check of an open, mknod, bind or chown; a non-zero fsuid also
takes CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN and the other filesystem capabilities out of
the thread's effective set, and setting it back to 0 puts them back (capabilities(7)).
Linux credentials are per thread and the raw system calls (not glibc's ``setgroups``, which
broadcasts to every thread) change only the caller's, so the agent's other threads (the
trio loop, the page writers) never run as the process, and a switch costs three system calls
each way (none where the restorer already is who the process is).

Paths an image names were read from ``/proc/PID/fd`` and ``maps``: canonical, no symbolic
link in them. ``open_path`` opens them with ``openat2(RESOLVE_NO_SYMLINKS)`` (Linux 5.6;
where the kernel lacks it, ``O_NOFOLLOW``, which guards the last component only), so a link
swapped in after preflight is not followed: the restore refuses, naming the path. Our own
objects (``/proc/self/fd/N`` of a pipe or a file this restore made) are reopened through
that magic link on purpose, still as the process.

Files a restore makes are created by the process's identity (so they are its own) and then
given the owner the image records only where the process itself could have given it
(``give``): the kernel decides, as it would for the process's own ``fchown``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from contextlib import contextmanager
from typing import Iterator

from transport.errors import RestoreError
from transport.frozen import frozen
from transport.schema import Creds

SYS_SETGROUPS, SYS_SETFSUID, SYS_SETFSGID, SYS_OPENAT2, SYS_FACCESSAT2 = 116, 122, 123, 437, 439
RESOLVE_NO_SYMLINKS = 0x04
AT_FDCWD, AT_EMPTY_PATH, AT_EACCESS = -100, 0x1000, 0x200
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_thread = threading.local()        # .acting: the identity this thread acts as now (in ``acting``)
_openat2_missing = False          # probed on first use: ENOSYS once, O_NOFOLLOW from then on


@frozen
class Identity:
    """Whom the kernel checks a file operation against: fsuid, fsgid, supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of(cls, creds: Creds) -> "Identity":
        return cls(creds.uids[3], creds.gids[3], tuple(sorted(set(creds.groups))))

    @classmethod
    def mine(cls) -> "Identity":
        """The calling thread's own."""
        return cls(_setfsuid(-1), _setfsgid(-1), tuple(sorted(set(os.getgroups()))))

    def __str__(self) -> str:
        groups = ",".join(map(str, self.groups)) or "none"
        return f"uid {self.uid} (gid {self.gid}, groups {groups})"

    @contextmanager
    def acting(self) -> Iterator[None]:
        """The calling thread checks file access as this identity until the block ends."""
        outer = getattr(_thread, "acting", None)
        if outer == self:             # inside a block of ours already: nothing to switch
            yield
            return
        before = Identity.mine()
        if before == self:
            yield
            return
        _thread.acting = self
        try:
            if before.groups != self.groups:
                _setgroups(self.groups)
            _setfsgid(self.gid)
            _setfsuid(self.uid)
            if _setfsuid(-1) != self.uid or _setfsgid(-1) != self.gid:
                raise RestoreError(f"cannot open files as {self}, whom the process runs as: the restorer runs as "
                                   f"{before} and may not act as another user (that needs root)")
            yield
        finally:
            _thread.acting = outer
            _setfsuid(before.uid)
            _setfsgid(before.gid)
            if before.groups != self.groups:
                _setgroups(before.groups)

    def open_path(self, path: str, flags: int, mode: int = 0o666, *, dir_fd: int = AT_FDCWD,
                  follow: bool = False) -> int:
        """``path`` opened as this identity; no symbolic link in it is followed unless ``follow``
        (our own ``/proc/self/fd`` links). OSError as the kernel says."""
        with self.acting():
            return _open(path, flags, mode, dir_fd, follow)

    def may_enter(self, path: str) -> os.stat_result:
        """The directory ``path`` (reached without symbolic links) if this identity may make
        it its working directory (search permission all the way, as chdir checks); OSError
        otherwise."""
        return self._may(path, os.O_DIRECTORY)

    def may_run(self, path: str) -> os.stat_result:
        """The file ``path`` (reached without symbolic links) if this identity may execute it."""
        return self._may(path, 0)

    def may_open(self, path: str, flags: int) -> os.stat_result:
        """The file ``path`` (reached without symbolic links) if this identity may open it with
        ``flags``' access mode (an O_PATH handle: only the walk to it), asked without opening
        it: no lease on it is broken, no FIFO waits. OSError otherwise."""
        access = 0 if flags & os.O_PATH else {os.O_RDONLY: os.R_OK, os.O_WRONLY: os.W_OK}.get(
            flags & os.O_ACCMODE, os.R_OK | os.W_OK)
        return self._may(path, flags & os.O_DIRECTORY, access)

    def _may(self, path: str, flags: int, access: int = os.X_OK) -> os.stat_result:
        with self.acting():
            fd = _open(path, os.O_PATH | os.O_CLOEXEC | flags, 0, AT_FDCWD, False)
            try:
                if access and _libc.syscall(SYS_FACCESSAT2, fd, b"", access, AT_EMPTY_PATH | AT_EACCESS) < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), path)
                return os.fstat(fd)
            finally:
                os.close(fd)

    def give(self, fd: int, uid: int, gid: int) -> None:
        """The file ``fd`` (which this restore made, as this identity) to owner ``uid:gid``
        where this identity may give it away (root; or its own uid and one of its groups):
        otherwise it stays this identity's, as the kernel would leave the process's own chown."""
        with self.acting():
            try:
                os.fchown(fd, uid, gid)
            except PermissionError:
                pass

    def refusal(self, what: str, path: str, exc: OSError) -> RestoreError:
        """The one line a failed open of ``path`` for ``what`` ends the restore with."""
        return RestoreError(f"cannot open {path} ({what}) as the process's {self}: {problem(exc)}")


def problem(exc: OSError) -> str:
    """What an OSError from ``open_path`` means for the user."""
    if exc.errno == errno.ELOOP:
        return ("a symbolic link is in its path here, which restore never follows (the image names real paths): "
                "restore where the path is the same real file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ("Permission denied: the process could not open it itself here, and restore grants it nothing more "
                "(an fd a more privileged process gave it cannot be reopened for it)")
    if exc.errno == errno.ENOENT:
        return "No such file or directory: the file must exist here at the same path"
    return exc.strerror or str(exc)


def _open(path: str, flags: int, mode: int, dir_fd: int, follow: bool) -> int:
    global _openat2_missing
    if follow:
        return os.open(path, flags, mode, dir_fd=None if dir_fd == AT_FDCWD else dir_fd)
    if not _openat2_missing:
        creating = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
        how = struct.pack("<QQQ", flags, mode if creating else 0, RESOLVE_NO_SYMLINKS)   # else openat2 wants 0
        fd = _libc.syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), how, len(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _openat2_missing = True
    return os.open(path, flags | os.O_NOFOLLOW, mode, dir_fd=None if dir_fd == AT_FDCWD else dir_fd)


def _setfsuid(uid: int) -> int:
    return int(_libc.syscall(SYS_SETFSUID, ctypes.c_uint(uid & 0xFFFFFFFF)))


def _setfsgid(gid: int) -> int:
    return int(_libc.syscall(SYS_SETFSGID, ctypes.c_uint(gid & 0xFFFFFFFF)))


def _setgroups(groups: tuple[int, ...]) -> None:
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _libc.syscall(SYS_SETGROUPS, len(groups), arr) < 0:
        err = ctypes.get_errno()
        raise RestoreError(f"cannot take the groups {', '.join(map(str, groups)) or '(none)'} to open files as the "
                           f"process: {os.strerror(err)} (acting as another user needs root)")


CAP_SETGID, CAP_SETUID = 6, 7


def check_grantable(creds: Creds) -> None:
    """Refuse, in one line, credentials the restorer cannot give: a restorer that may not take
    on other ids (without CAP_SETUID and CAP_SETGID: a user restoring with only
    CAP_CHECKPOINT_RESTORE) gives a process its own uid, gids, groups and capabilities only,
    whatever the image claims."""
    mine = _status()
    effective = int(mine["CapEff"], 16)
    if effective >> CAP_SETUID & 1 and effective >> CAP_SETGID & 1:
        return
    uids = {int(x) for x in mine["Uid"].split()}
    gids = {int(x) for x in mine["Gid"].split()}
    groups = {int(x) for x in mine["Groups"].split()}
    permitted, inheritable = int(mine["CapPrm"], 16), int(mine["CapInh"], 16)
    wanted_caps = creds.cap_permitted | creds.cap_effective | creds.cap_ambient
    if set(creds.uids) <= uids and set(creds.gids) <= gids and set(creds.groups) == groups \
            and not wanted_caps & ~permitted and not creds.cap_inheritable & ~(inheritable | permitted):
        return
    claimed = Identity(creds.uids[1], creds.gids[1], tuple(sorted(set(creds.groups))))
    caps = f", capabilities {wanted_caps:#x}" if wanted_caps & ~permitted else ""
    raise RestoreError(f"the image's process runs as {claimed}{caps}, but this restore runs as "
                       f"uid {os.getuid()} without the right to take on other ids (CAP_SETUID, CAP_SETGID): it gives a "
                       "process only its own credentials; restore it as root, or as the user it belongs to")


def _status() -> dict[str, str]:
    with open("/proc/thread-self/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


CAP_IPC_OWNER = 15


def may_attach(creds: Creds, mode: int, owner: tuple[int, int], creator: tuple[int, int], want: int) -> bool:
    """Whether a process with ``creds`` may attach a SysV segment of permissions ``mode``,
    owner and creator (uid, gid) with access ``want`` (4 read, 2 write, 1 execute), as the
    kernel's ipcperms decides for shmat: by effective uid, then fsgid and groups."""
    granted = mode
    if creds.uids[1] in (owner[0], creator[0]):
        granted >>= 6
    elif {owner[1], creator[1]} & {creds.gids[3], *creds.groups}:
        granted >>= 3
    return not want & ~granted & 0o7 or bool(creds.cap_effective >> CAP_IPC_OWNER & 1)
