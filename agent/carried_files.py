"""Files whose contents travel whole: deleted files and memfds the job holds open or maps,
and files of /dev/shm (``agent.shm_files``). None of them can be found again on the
destination by a path, so their bytes go with the job, read while it is frozen.

The dump names each one (``CarriedFile``: which process's fd or mapping under /proc to read
it through) and its bytes are read only as they are sent (``read``), a slice
(``FileContents``) at a time, so a file of any size streams from the frozen job to the
image or the destination without being held in memory whole; the holder hands the agent
names, not bytes.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import asdict
from typing import Any, Generator

from precopy.kernel import boot_id
from precopy.layout import MEMFD_PREFIX
from transport.errors import UnsupportedResource
from transport.frozen import frozen
from transport.records import MAX_BYTES
from transport.schema import MEMFD_SEALS, FileContents

F_GET_SEALS = 1034


@frozen
class CarriedFile:
    pid: int            # the process whose records carry it (the first of the job to have it)
    ino: int
    source: str         # /proc/PID/fd/FD or /proc/PID/map_files/START-END
    path: str = ""      # a file of /dev/shm: its path (made again there)
    name: str = ""      # deleted, mapped by no fd of the job: the name its mappings show

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> CarriedFile:
        return cls(pid=int(wire["pid"]), ino=int(wire["ino"]), source=str(wire["source"]),
                   path=str(wire.get("path", "")), name=str(wire.get("name", "")))


def read(c: CarriedFile) -> Generator[FileContents, None, None]:
    """``c``'s contents in slices of at most ``MAX_BYTES``, read through its /proc link as
    they are asked for; the first always (it makes the file, even an empty one), the others
    where they hold more than zeros."""
    what = c.path or c.name or f"pid {c.pid}'s deleted file {c.source}"
    try:
        own = os.open(c.source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnsupportedResource(f"{what} was closed while the job was being read: try again", pid=c.pid) from None
    try:
        st = os.fstat(own)
        if st.st_ino != c.ino:
            raise UnsupportedResource(f"{what} changed while the job was being read: try again", pid=c.pid)
        common: dict[str, Any] = {"id": c.ino, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
                                  "uid": st.st_uid, "gid": st.st_gid,
                                  "atime_ns": max(0, st.st_atime_ns), "mtime_ns": max(0, st.st_mtime_ns)}
        if c.path:
            common.update(path=c.path, dev=st.st_dev, boot=boot_id())
        else:
            memfd, seals = _memfd_seals(c.source, own)
            common.update(memfd=memfd, seals=seals, name=c.name)
        offset = 0
        while True:
            data = os.pread(own, min(MAX_BYTES, st.st_size - offset), offset)
            if not offset or data != ZEROS[:len(data)]:
                yield FileContents(offset=offset, data=data, **common)
            offset += len(data)
            if not data or offset >= st.st_size:
                return
            offset = _next_data(own, offset, st.st_size)
            if offset >= st.st_size:
                return
    finally:
        os.close(own)


# The file is made again at its size, which reads as zeros: slices of zeros (the holes of a
# sparse file, pages never written) need not go, but the first, which makes the file.
ZEROS = bytes(MAX_BYTES)


def _next_data(fd: int, offset: int, size: int) -> int:
    """Where the data at or after ``offset`` begins (``SEEK_DATA``: holes are skipped unread);
    ``size`` if none does."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        return size if exc.errno == errno.ENXIO else offset


BLOCK = 4096


def write_sparse(fd: int, data: bytes, offset: int) -> None:
    """``data`` written at ``offset`` into a file made at its size (reading as zeros), its
    blocks of zeros left unwritten: a sparse file's holes (inside a slice too) stay holes, as
    programs that map their extents (FIEMAP, SEEK_HOLE) expect."""
    view = memoryview(data)
    start = None                     # where the run of blocks with data being gathered starts
    for at in range(0, len(data), BLOCK):
        block = view[at:at + BLOCK]
        zero = block == ZEROS[:len(block)]
        if zero and start is not None:
            _pwrite_all(fd, view[start:at], offset + start)
            start = None
        elif not zero and start is None:
            start = at
    if start is not None:
        _pwrite_all(fd, view[start:], offset + start)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _memfd_seals(source: str, own: int) -> tuple[bool, int]:
    """(is a memfd, its seals): a memfd's link reads /memfd:NAME and it takes F_GET_SEALS
    (a file of /dev/shm takes it too, but is named by its path)."""
    if not os.readlink(source).startswith(MEMFD_PREFIX):
        return False, 0
    try:
        return True, fcntl.fcntl(own, F_GET_SEALS) & MEMFD_SEALS
    except OSError:
        return False, 0     # a file of that name on a filesystem without seals


def set_times(fd: int, times: tuple[int, int] | None) -> None:
    """A carried file's access and modification times (ns) again, once written."""
    if times is not None:
        try:
            os.utime(fd, ns=times)
        except OSError:
            pass       # (ours, made by us: only a filesystem without times refuses)
