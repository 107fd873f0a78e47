"""fanotify instances: their marks read on the source, the instance made again with them.

The kernel shows an instance's ``fanotify_init`` flags and each mark in its fdinfo:
``fanotify flags:10 event-flags:8000``, then per mark ``fanotify ino:20c603 sdev:fe00000
mflags:0 mask:2a ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:...`` (an inode),
``fanotify mnt_id:1b ...`` (a mount) or ``fanotify sdev:fe00000 ...`` (a filesystem). An inode
mark's file is found by its handle, as an inotify watch's is (``agent.inotify``); a mount's
by its id in mountinfo, a filesystem's by any mount of its device. The destination marks the
same paths with the same masks and flags.

Only notification groups are carried: a group of the content classes (``FAN_CLASS_CONTENT``,
``FAN_CLASS_PRE_CONTENT``) makes other processes wait for its answers, and those waiting at
the freeze cannot be handed to another instance: refused. Making an instance needs
``CAP_SYS_ADMIN`` in the restorer (the kernel's rule); one that lacks it fails the restore.
Events queued at the freeze are not carried (they came from the filesystem): restore warns.
"""
from __future__ import annotations

import ctypes
import os

from agent import inotify
from agent.procfs import mounts, read_text
from transport.errors import RestoreError, UnsupportedResource
from transport.schema import FanotifyMark

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = (ctypes.c_uint, ctypes.c_uint)
_libc.fanotify_mark.argtypes = (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p)

FAN_CLOEXEC = 0x1
FAN_CLASS_BITS = 0xC             # FAN_CLASS_CONTENT 0x4, FAN_CLASS_PRE_CONTENT 0x8
FAN_MARK_ADD = 0x1
FAN_MARK_DONT_FOLLOW = 0x4
FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORED_SURV_MODIFY = 0x20, 0x40
FAN_MARK_EVICTABLE, FAN_MARK_IGNORE = 0x200, 0x400
KIND_FLAGS = {"inode": 0, "mount": 0x10, "filesystem": 0x100}   # FAN_MARK_MOUNT, FAN_MARK_FILESYSTEM
AT_FDCWD = -100


def _mount_points(pid: int) -> dict[int, str]:
    """Mount id (as mountinfo's first field) -> mount point, in ``pid``'s mount namespace."""
    out: dict[int, str] = {}
    for line in read_text(pid, "mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 4:
            out[int(fields[0])] = fields[4].replace("\\040", " ")
    return out


def read(pid: int, fd: int, fdinfo: str) -> tuple[int, int, tuple[FanotifyMark, ...]]:
    """(fanotify_init flags, event flags, marks) of the instance at ``fd``, from its fdinfo."""
    init_flags = event_flags = 0
    marks: list[FanotifyMark] = []
    devices: dict[int, list[tuple[str, str]]] | None = None
    points: dict[int, str] | None = None
    for line in fdinfo.splitlines():
        if not line.startswith("fanotify "):
            continue
        fields = dict(part.split(":", 1) for part in line.split()[1:] if ":" in part)
        if "flags" in fields and "event-flags" in fields:
            init_flags, event_flags = int(fields["flags"], 16), int(fields["event-flags"], 16)
            if init_flags & FAN_CLASS_BITS:
                raise UnsupportedResource(
                    f"pid {pid}'s fd {fd} is a fanotify instance of a permission class (FAN_CLASS_CONTENT or "
                    "FAN_CLASS_PRE_CONTENT): processes waiting on its answers cannot be handed to another "
                    "instance; kcr-migrate carries notification groups (FAN_CLASS_NOTIF) only", pid=pid)
            continue
        mask, ignored, mflags = int(fields["mask"], 16), int(fields["ignored_mask"], 16), int(fields["mflags"], 16)
        if "mnt_id" in fields:
            points = points if points is not None else _mount_points(pid)
            mnt = int(fields["mnt_id"], 16)
            if mnt not in points:
                raise UnsupportedResource(f"pid {pid}'s fanotify instance (fd {fd}) marks mount {mnt}, which its "
                                          "mount namespace does not show", pid=pid)
            marks.append(FanotifyMark("mount", points[mnt], mask, ignored, mflags))
            continue
        if devices is None:
            devices = _devices(pid)
        sdev = int(fields["sdev"], 16)
        if "ino" not in fields:
            where = devices.get(sdev)
            if not where:
                raise UnsupportedResource(f"pid {pid}'s fanotify instance (fd {fd}) marks a filesystem no mount of "
                                          "its namespace shows", pid=pid)
            marks.append(FanotifyMark("filesystem", where[0][1], mask, ignored, mflags))
            continue
        path = inotify.path_of(pid, int(fields["ino"], 16), sdev, int(fields["fhandle-type"], 16),
                               bytes.fromhex(fields["f_handle"]),
                               {dev: [here for here, _ in places] for dev, places in devices.items()},
                               f"fanotify mark (fd {fd})")
        marks.append(FanotifyMark("inode", path, mask, ignored, mflags))
    return init_flags, event_flags, tuple(sorted(marks, key=lambda m: (m.kind, m.path)))


def _devices(pid: int) -> dict[int, list[tuple[str, str]]]:
    """Device (MAJOR << 20 | MINOR) -> (path this agent opens, mount point as the process names it)."""
    out: dict[int, list[tuple[str, str]]] = {}
    for major, minor, point in mounts(pid):
        out.setdefault(major << 20 | minor, []).append((f"/proc/{pid}/root{point}", point))
    return out


def make(init_flags: int, event_flags: int, marks: tuple[FanotifyMark, ...]) -> int:
    """A new fanotify instance (close-on-exec) with these marks."""
    fd = _libc.fanotify_init(init_flags | FAN_CLOEXEC, event_flags)
    if fd < 0:
        err = ctypes.get_errno()
        hint = ": the restorer needs CAP_SYS_ADMIN (restore as root)" if err == 1 else ""
        raise RestoreError(f"cannot make a fanotify instance here: {os.strerror(err)}{hint}")
    try:
        for m in marks:
            path = os.fsencode(m.path)
            kind = KIND_FLAGS[m.kind] | (m.mflags & FAN_MARK_EVICTABLE)
            if m.kind == "inode" and os.path.islink(path):
                kind |= FAN_MARK_DONT_FOLLOW        # the source named the marked inode: the link itself
            calls = [(kind, m.mask)] if m.mask else []
            if m.ignored_mask:
                how = FAN_MARK_IGNORE if m.mflags & FAN_MARK_IGNORE else FAN_MARK_IGNORED_MASK
                calls.append((kind | how | (m.mflags & FAN_MARK_IGNORED_SURV_MODIFY), m.ignored_mask))
            for flags, mask in calls:
                if _libc.fanotify_mark(fd, FAN_MARK_ADD | flags, mask, AT_FDCWD, path) < 0:
                    err = ctypes.get_errno()
                    hint = " (it is not on this host: share it, or bring it with --fs)" if err == 2 else ""
                    raise RestoreError(f"cannot mark {m.path} again for fanotify ({m.kind}, mask {mask:#x}): "
                                       f"{os.strerror(err)}{hint}")
        return fd
    except BaseException:
        os.close(fd)
        raise
