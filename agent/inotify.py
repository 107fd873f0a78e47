"""inotify instances: their watches read on the source, made again under the same numbers.

The kernel shows each watch in the instance's fdinfo as the watched inode's file handle
(``inotify wd:2 ino:20cf6f sdev:fe00000 mask:fff ... f_handle:6fcf...``), not as a path. The
source opens the handle (``open_by_handle_at`` on a directory of the mount with that device)
and names the path it finds; a watched inode no longer reachable by a path (deleted) is
refused. The destination watches the same paths with the same masks.

A program knows its watches by their numbers (wd), so each is made again under its own:
the kernel hands out wds cyclically (the next one above the last handed out, even if that
one was removed since), so before each watch a throwaway watch on the same path is added and
removed until the counter stands just below its wd. The ``IN_IGNORED`` events that leaves,
and anything else that happens before the process runs, are read out of the new instance
before the process takes it. Events queued on the source at the freeze cannot be made again
(they came from the filesystem): restore says how many bytes of them were dropped.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import termios

from agent.procfs import mounts
from transport.errors import RestoreError, UnsupportedResource
from transport.schema import InotifyWatch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.open_by_handle_at.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)

IN_MASK_CREATE = 0x10000000      # add-only flags: never kept in a watch's mask
IN_MASK_ADD = 0x20000000
IN_DONT_FOLLOW = 0x02000000
O_PATH = 0o10000000
# The most add/remove rounds one restore spends to reach a watch's number (a program that has
# watched and unwatched a million times since its instance was made is refused instead).
MAX_SKIPPED_WDS = 1 << 20


def _mount_dirs(pid: int) -> dict[int, list[str]]:
    """Device (the kernel's internal MAJOR << 20 | MINOR, as fdinfo's sdev) -> mount points in
    ``pid``'s mount namespace, as paths this agent can open."""
    out: dict[int, list[str]] = {}
    for major, minor, point in mounts(pid):
        out.setdefault(major << 20 | minor, []).append(f"/proc/{pid}/root{point}")
    return out


def path_of(pid: int, ino: int, sdev: int, handle_type: int, handle: bytes, mounts: dict[int, list[str]],
            what: str) -> str:
    """The path of the inode a watch or mark (``what``) shows by its file handle."""
    buf = struct.pack("<Ii", len(handle), handle_type) + handle
    raw = ctypes.create_string_buffer(buf, len(buf))
    for point in mounts.get(sdev, []):
        try:
            mount_fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # not O_PATH: refused there
        except OSError:
            continue
        try:
            fd = _libc.open_by_handle_at(mount_fd, ctypes.addressof(raw), O_PATH | os.O_CLOEXEC)
        finally:
            os.close(mount_fd)
        if fd < 0:
            continue
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.fstat(fd).st_ino != ino:
                continue
        finally:
            os.close(fd)
        if path.endswith(" (deleted)") or not path.startswith("/"):
            break
        return path
    raise UnsupportedResource(
        f"pid {pid}'s {what} is on inode {ino}, which no path reaches any more (deleted, or on a "
        "filesystem this host cannot open by handle): restore could not watch it again; remove it "
        "or move the process when it watches only files that exist", pid=pid)


def watches(pid: int, fdinfo: str) -> tuple[InotifyWatch, ...]:
    """The watches of an inotify instance, from its fdinfo text, with the paths they watch."""
    mounts: dict[int, list[str]] | None = None
    out: list[InotifyWatch] = []
    for line in fdinfo.splitlines():
        if not line.startswith("inotify "):
            continue
        fields = dict(part.split(":", 1) for part in line.split()[1:] if ":" in part)
        mounts = mounts if mounts is not None else _mount_dirs(pid)
        wd = int(fields["wd"])
        path = path_of(pid, int(fields["ino"], 16), int(fields["sdev"], 16), int(fields["fhandle-type"], 16),
                       bytes.fromhex(fields["f_handle"]), mounts, f"inotify watch {wd}")
        out.append(InotifyWatch(wd=wd, mask=int(fields["mask"], 16), path=path))
    return tuple(sorted(out, key=lambda w: w.wd))


def queued_bytes(fd: int) -> int:
    """Bytes of events waiting to be read on an inotify fd (FIONREAD; reads nothing)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def make(watched: tuple[InotifyWatch, ...]) -> int:
    """A new inotify instance (close-on-exec) with these watches under their numbers."""
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise RestoreError(f"cannot make an inotify instance: {os.strerror(ctypes.get_errno())}")
    try:
        last = 0
        for w in sorted(watched, key=lambda w: w.wd):
            path = os.fsencode(w.path)
            mask = w.mask & ~(IN_MASK_CREATE | IN_MASK_ADD)
            if os.path.islink(path):
                # The source named the watched inode by its own path: the link itself was
                # watched (IN_DONT_FOLLOW, an add-only flag no mask keeps), not its target.
                mask |= IN_DONT_FOLLOW
            skipped = 0
            while True:
                got = _libc.inotify_add_watch(fd, path, mask)
                if got < 0:
                    err = ctypes.get_errno()
                    hint = " (it is not on this host: share it, or bring it with --fs)" if err == errno.ENOENT else ""
                    raise RestoreError(f"cannot watch {w.path} again for inotify watch {w.wd}: "
                                       f"{os.strerror(err)}{hint}")
                if got == w.wd:
                    break
                if got > w.wd or got <= last or skipped >= MAX_SKIPPED_WDS:
                    raise RestoreError(f"inotify watch {w.wd} on {w.path} came back as watch {got}: this kernel "
                                       "does not hand out watch numbers in order")
                _libc.inotify_rm_watch(fd, got)
                last = got
                skipped += 1
            last = got
        _drain(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _drain(fd: int) -> None:
    """Read out the IN_IGNORED events the throwaway watches left (and anything since)."""
    while True:
        try:
            if not os.read(fd, 1 << 16):
                return
        except BlockingIOError:
            return
