"""A process's fd table as restore rebuilds it: open file descriptions, pipes, redirections.

- fds that share one open file description (``dup``, ``fork``, ``2>&1``) are found with
  ``kcmp(KCMP_FILE)`` and restored as one description, dup'd: one offset, one set of status
  flags, as before (two separate opens would let stdout and stderr overwrite each other);
- a pipe is carried when nothing outside the process holds either of its ends (a self-pipe,
  a pipe whose writer has exited): its capacity and the bytes in it travel, read without
  consuming them (``tee(2)`` from a dup taken with ``pidfd_getfd``), so a process that runs on
  (a rollback, ``--leave-running``) loses nothing;
- an fd whose other end is outside (a pipe to the launcher, a terminal) is refused with the
  process at the other end named, unless the user said what it becomes on the destination:
  ``redirect`` maps fd -> PATH, opened there for appending (or reading, for a read end).

``describe`` is the one place that decides, for preflight and dump alike.
"""
from __future__ import annotations

import errno
import fcntl
import os
import termios
from dataclasses import dataclass, replace
from typing import Mapping

from agent.procfs import FdInfo, classify_fd, list_fds
from precopy.kernel import KCMP_FILE, kcmp, pidfd_getfd, pidfd_open, tee
from transport.errors import UnsupportedResource
from transport.schema import O_CLOEXEC_FLAG, FileDesc, Files, PipeBuffer, Pipes

O_ACCMODE = 3
READ_MODES = (os.O_RDONLY, os.O_RDWR)
# What a redirected fd may have referred to: things whose other end is outside the process.
_REDIRECTABLE = ("a pipe", "a socket", "a terminal", "a FIFO")


@dataclass(frozen=True)
class Peer:
    """A process outside the migrated set that holds an fd on the same object."""

    pid: int
    comm: str
    fd: int

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm})"


def pipe_inode(target: str) -> int | None:
    """The inode of an fd's pipe, from its /proc link ("pipe:[1234]"), or None."""
    if target.startswith("pipe:[") and target.endswith("]"):
        return int(target[6:-1])
    return None


def outside_holders(inodes: set[int], inside: set[int]) -> dict[int, list[Peer]]:
    """Processes other than ``inside`` (and this one) holding any of these pipes."""
    found: dict[int, list[Peer]] = {}
    skip = inside | {os.getpid()}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue          # gone, or a kernel thread
        with fds:
            for fd in fds:
                try:
                    ino = pipe_inode(os.readlink(fd.path))
                except OSError:
                    continue
                if ino in inodes:
                    found.setdefault(ino, []).append(Peer(pid, _comm(pid), int(fd.name)))
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def describe(pid: int, redirect: Mapping[int, str] | None = None) -> list[FileDesc]:
    """The fd table as records, or UnsupportedResource naming the first fd we cannot carry."""
    redirect = dict(redirect or {})
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
    pipes: dict[int, list[FdInfo]] = {}
    for info in infos:
        if info.fd in redirect:
            out.append(FileDesc(fd=info.fd, kind="redirect", path=redirect[info.fd], flags=info.flags, pos=0))
            continue
        ino = pipe_inode(info.target)
        if ino is not None:
            pipes.setdefault(ino, []).append(info)
            out.append(FileDesc(fd=info.fd, kind="pipe", path="", flags=info.flags, pos=0, pipe=ino))
            continue
        kind, why = classify_fd(info)
        if kind is None:
            hint = f", or give --redirect {info.fd}=PATH to open PATH in its place on the destination" \
                if why.startswith(_REDIRECTABLE) else ""
            raise UnsupportedResource(
                f"pid {pid} has {why} open as fd {info.fd}: kcr-migrate cannot move it yet (see README, Limits)"
                f"{hint}", pid=pid)
        st = info.st
        out.append(FileDesc(fd=info.fd, kind=kind, path=info.target, flags=info.flags, pos=info.pos,
                            size=st.st_size if st is not None and kind == "file" else -1,
                            mtime_ns=st.st_mtime_ns if st is not None and kind == "file" else 0))
    if pipes:
        for ino, peers in outside_holders(set(pipes), {pid}).items():
            fd = pipes[ino][0].fd
            raise UnsupportedResource(
                f"pid {pid}'s fd {fd} is a pipe shared with {peers[0]}, which does not move with it: give "
                f"--redirect {fd}=PATH to open PATH in its place on the destination", pid=pid)
    return _share_descriptions(pid, out)


def _share_descriptions(pid: int, fds: list[FileDesc]) -> list[FileDesc]:
    """Give fds that are one open file description the same ``desc`` (the lowest fd + 1)."""
    by_look: dict[tuple[object, ...], list[FileDesc]] = {}
    for f in fds:
        if f.kind != "redirect":
            by_look.setdefault((f.kind, f.path, f.pipe, f.flags & ~O_CLOEXEC_FLAG, f.pos), []).append(f)
    desc: dict[int, int] = {}
    for group in by_look.values():
        heads: list[FileDesc] = []
        for f in group:
            head = next((h for h in heads if _same_description(pid, h.fd, f.fd)), None)
            if head is None:
                heads.append(f)
            else:
                desc[head.fd] = desc[f.fd] = head.fd + 1
    return [replace(f, desc=desc.get(f.fd, 0)) for f in fds]


def _same_description(pid: int, fd1: int, fd2: int) -> bool:
    try:
        return kcmp(pid, pid, KCMP_FILE, fd1, fd2) == 0
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return False          # closed while we looked: the dump, frozen, looks again
        raise UnsupportedResource(
            f"cannot tell whether pid {pid}'s fds {fd1} and {fd2} share one open file ({exc.strerror}): "
            "this kernel lacks kcmp(2) (CONFIG_KCMP)", pid=pid) from None


def collect(pid: int, redirect: Mapping[int, str] | None = None) -> tuple[Files, Pipes]:
    """The fd table and its pipes' contents, from a frozen process (it is left as it was)."""
    fds = describe(pid, redirect)
    readers: dict[int, int] = {}
    ends: dict[int, int] = {}
    for f in fds:
        if f.kind == "pipe":
            ends.setdefault(f.pipe, f.fd)
            if f.flags & O_ACCMODE in READ_MODES:
                readers.setdefault(f.pipe, f.fd)
    buffers = []
    if ends:
        pidfd = pidfd_open(pid)
        try:
            for ino, fd in ends.items():
                size, data = _pipe_contents(pidfd, readers.get(ino, fd), ino in readers)
                buffers.append(PipeBuffer(id=ino, size=size, data=data))
        finally:
            os.close(pidfd)
    return Files(tuple(fds)), Pipes(tuple(buffers))


def _pipe_contents(pidfd: int, fd: int, readable: bool) -> tuple[int, bytes]:
    """(capacity, bytes in it). A pipe nobody can read (only write ends left) keeps no bytes:
    its writers get EPIPE, as before."""
    dup = pidfd_getfd(pidfd, fd)
    try:
        size = fcntl.fcntl(dup, fcntl.F_GETPIPE_SZ)
        if not readable:
            return size, b""
        queued = int.from_bytes(fcntl.ioctl(dup, termios.FIONREAD, b"\0\0\0\0"), "little")
        if not queued:
            return size, b""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
            copied = tee(dup, w, queued)
            data = b"".join(_read_all(r, copied))
        finally:
            os.close(r)
            os.close(w)
        if len(data) != queued:
            raise UnsupportedResource(f"could read only {len(data)} of the {queued} bytes in a pipe of fd {fd}")
        return size, data
    finally:
        os.close(dup)


def _read_all(fd: int, n: int) -> list[bytes]:
    parts: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return parts
